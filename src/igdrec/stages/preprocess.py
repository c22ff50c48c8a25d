"""Stage `preprocess` (not built yet)."""

from igdrec.errors import StageNotBuilt


def run(config, run_dir, force: bool = False):
    raise StageNotBuilt("stage preprocess is not built yet")
