"""Stage `metrics` (not built yet)."""

from igdrec.errors import StageNotBuilt


def run(config, run_dir, force: bool = False):
    raise StageNotBuilt("stage metrics is not built yet")
