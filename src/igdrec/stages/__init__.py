"""One module per CLI stage, each with `run(config, run_dir, force=False) -> manifest`. Stages never import each other."""
