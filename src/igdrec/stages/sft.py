"""Stage `sft` (not built yet)."""

from igdrec.errors import StageNotBuilt


def run(config, run_dir, force: bool = False):
    raise StageNotBuilt("stage sft is not built yet")
