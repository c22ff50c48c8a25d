"""Stage `build_ig_index` (not built yet)."""

from igdrec.errors import StageNotBuilt


def run(config, run_dir, force: bool = False):
    raise StageNotBuilt("stage build_ig_index is not built yet")
