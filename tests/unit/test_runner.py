"""The one stage runner: every registered stage speaks its protocol, and a plan's key is the cache's key."""

from __future__ import annotations

import dataclasses

from fixtures import synthetic_run
from igdrec import config as cfg
from igdrec import runner
from igdrec.config import BaselineConfig


def test_every_registered_stage_has_a_module_with_plan_and_compute():
    assert list(runner.STAGE_MODULES) == list(cfg.STAGE_CONFIGS)
    for stage in cfg.STAGE_CONFIGS:
        module = runner.stage_module(stage)
        assert callable(module.plan) and callable(module.compute), stage


def test_a_plan_is_cached_exactly_when_the_stage_would_report_it_cached(tmp_path, capsys):
    run = synthetic_run(tmp_path)
    config = BaselineConfig(model="pop", top_k=5)
    before = runner.plan_stage("baseline", config, run)
    assert before.path == "baseline/pop" and not runner.is_cached(before)

    manifest = runner.run_stage("baseline", config, run)
    after = runner.plan_stage("baseline", config, run)
    assert after.key == manifest["key"] and runner.is_cached(after) and after.writer().cached

    capsys.readouterr()
    assert runner.run_stage("baseline", config, run) == manifest  # found cached: nothing recomputed
    assert "baseline/pop: cached in" in capsys.readouterr().out

    other = runner.plan_stage("baseline", dataclasses.replace(config, top_k=3), run)
    assert other.path == after.path and not runner.is_cached(other) and not other.writer().cached
