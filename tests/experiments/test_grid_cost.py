"""The dry run's cost model prices baseline steps: epochs (early stopping or the config's cap) × training
windows × the measured seconds per epoch per 1,000 windows, plus the overhead; its rates are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from igdrec import options
from igdrec.cli import app
from igdrec.experiments import cost as grid_cost, dryrun, grid_config, plan as planning
from igdrec.rundir import MANIFEST

REPO = Path(__file__).resolve().parents[2]
COST = {"train_samples": 5000, "baseline_overhead_s": 7, "baseline_epoch_s_per_1k_windows": {"gru4rec": 2.0, "sasrec": 3.5},
        "baseline_best_epoch": {"gru4rec": 6, "sasrec": 30}}


def write(tmp_path: Path, baseline: dict, cost: dict = COST, dataset: dict | None = None) -> Path:
    spec = {"scale": "t", "run_root": str(tmp_path / "runs"), "datasets": {"toy": dataset or {}},
            "stages": {"sft": {"model": "m"}, "baseline": baseline}, "rows": ["gru4rec", "sasrec"], "cost": cost}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def baseline_estimates(path: Path) -> dict[str, float]:
    records = dryrun.dry_run(planning.plan_grid(grid_config.load_grid(path)))
    return {r["path"]: r["estimate_s"] for r in records if r["stage"] == "baseline"}


def test_dry_run_prices_a_baseline_by_its_expected_epochs(tmp_path):
    # patience 4: early stopping runs best + 4 + 1 epochs; GRU4Rec 6 + 5 = 11 of at most 40, SASRec 35 of 40
    estimates = baseline_estimates(write(tmp_path, {"epochs": 40, "patience": 4}))
    assert estimates == {"baseline/gru4rec": pytest.approx(7 + 11 * 5.0 * 2.0), "baseline/sasrec": pytest.approx(7 + 35 * 5.0 * 3.5)}
    # the config's epochs cap the run: SASRec's 35 expected epochs become 20, GRU4Rec's 11 stay
    estimates = baseline_estimates(write(tmp_path, {"epochs": 20, "patience": 4}))
    assert estimates == {"baseline/gru4rec": pytest.approx(7 + 11 * 10.0), "baseline/sasrec": pytest.approx(7 + 20 * 17.5)}
    # RecBole's defaults (300 epochs, patience 10) when the grid sets none
    estimates = baseline_estimates(write(tmp_path, {}))
    assert estimates["baseline/sasrec"] == pytest.approx(7 + (30 + 11) * 5.0 * 3.5)
    result = CliRunner().invoke(app, ["grid", str(write(tmp_path, {"epochs": 40, "patience": 4})), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"baseline/gru4rec  ~{117 / 60:.1f} min" in result.output and "0 steps without an estimate" in result.output


def test_a_dataset_overrides_one_model_rate_and_keeps_the_others(tmp_path):
    dataset = {"cost": {"baseline_epoch_s_per_1k_windows": {"sasrec": 1.0}, "train_samples": 2000}}
    estimates = baseline_estimates(write(tmp_path, {"epochs": 40, "patience": 4}, dataset=dataset))
    assert estimates == {"baseline/gru4rec": pytest.approx(7 + 11 * 2.0 * 2.0), "baseline/sasrec": pytest.approx(7 + 35 * 2.0 * 1.0)}


def test_the_windows_come_from_the_data_stage_once_it_ran(tmp_path):
    grid = grid_config.load_grid(write(tmp_path, {"epochs": 40, "patience": 4}))
    step = next(s for r in planning.plan_grid(grid).rows for c in [r.fixed] if c for s in c.steps if s.stage == "baseline")
    (step.run_dir / "data").mkdir(parents=True)
    (step.run_dir / "data" / MANIFEST).write_text(json.dumps({"rows": {"train": 1234}}))
    assert grid_cost.estimate_seconds(step, grid) == pytest.approx(7 + 11 * 1.234 * 2.0)


def test_a_baseline_without_its_model_rate_is_left_unestimated(tmp_path):
    cost = {**COST, "baseline_epoch_s_per_1k_windows": {"gru4rec": 2.0}}
    assert baseline_estimates(write(tmp_path, {}, cost=cost))["baseline/sasrec"] is None


def test_every_shipped_grid_prices_its_baseline_steps(tmp_path):
    for path in sorted((REPO / "configs" / "grid").glob("*.yaml")):
        records = dryrun.dry_run(planning.plan_grid(grid_config.load_grid(path, run_root=tmp_path / path.stem)))
        baselines = [r for r in records if r["stage"] == "baseline"]
        assert baselines and all(r["estimate_s"] and r["estimate_s"] > 0 for r in baselines), (path.name, baselines)


def test_every_stage_a_grid_runs_has_its_declared_overhead_rate():
    declared = {o.name for o in options.options(grid_config.CostSection)}
    assert {f"{s.replace('-', '_')}_overhead_s" for s in ("preprocess", *grid_config._GRID_STAGES)} <= declared
    assert grid_config.PER_MODEL_COST_KEYS == ("baseline_epoch_s_per_1k_windows", "baseline_best_epoch")


BAD = [  # (cost section, the key the message names, what it says)
    ({"baseline_best_epoch": 40}, ":cost.baseline_best_epoch:", "expected a mapping (`name: value` lines), got 40"),
    ({"baseline_best_epoch": {"gru4ec": 40}}, ":cost.baseline_best_epoch:", "unknown key 'gru4ec' (did you mean 'gru4rec'?)"),
    ({"baseline_epoch_s_per_1k_windows": {"sasrec": -1}}, ":cost.baseline_epoch_s_per_1k_windows.sasrec -1:", "must be ≥ 0"),
    ({"baseline_epoch_s_per_1k_window": {"sasrec": 1}}, ":cost:", "(did you mean 'baseline_epoch_s_per_1k_windows'?)"),
]


@pytest.mark.parametrize(("cost", "key", "says"), BAD, ids=[k for _, k, _ in BAD])
def test_bad_baseline_cost_is_one_line_naming_the_key(tmp_path, cost, key, says):
    path = write(tmp_path, {}, cost=cost)
    result = CliRunner().invoke(app, ["grid", str(path), "--dry-run"])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"{path}{key}" in result.output and says in result.output, result.output
    assert not (tmp_path / "runs").exists()
