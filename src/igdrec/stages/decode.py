"""Stage `decode` (not built yet)."""

from igdrec.errors import StageNotBuilt


def run(config, run_dir, force: bool = False):
    raise StageNotBuilt("stage decode is not built yet")
