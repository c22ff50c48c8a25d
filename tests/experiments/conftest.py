"""The tiny grid, run once for the grid and report tests."""

from __future__ import annotations

import pytest
from fixtures import synthetic_run
from grid_helpers import grid_yaml

from igdrec.experiments import dryrun, grid_config, plan as planning
from igdrec.experiments import run as grid_run


@pytest.fixture(scope="session")  # session, not module: test_grid.py and test_report.py share one run of the grid
def finished(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("grid")
    synthetic_run(tmp / "grid" / "toy")
    config = grid_yaml(tmp, tiny_model_dir)
    plan = planning.plan_grid(grid_config.load_grid(config))
    before = {r["path"]: r["state"] for r in dryrun.dry_run(plan)}
    grid_run.run_grid(plan)
    return tmp, config, plan, before
