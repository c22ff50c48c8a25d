"""One module per CLI stage, each with `plan(config, run)` and `compute(plan, out)`, run by `igdrec.runner`
(see its docstring). Stages never import each other."""
