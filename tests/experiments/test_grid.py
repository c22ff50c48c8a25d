"""The grid runner end to end on the tiny random model: plan, dry run, run, resume (the reports: test_report.py)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from fixtures import synthetic_run
from grid_helpers import ALPHAS, _csv, grid_yaml
from igdrec.experiments import dryrun, grid_config, plan as planning, report, select
from igdrec.experiments import rows as table_rows, run as grid_run
from igdrec.cli import app
from igdrec.errors import IgdrecError

def test_dry_run_before_the_run_has_nothing_cached_but_the_data(finished):
    _, _, _, before = finished
    assert before["ig"] == "to run" and before["sft/plain-s16"] == "to run"
    assert all(state in ("to run", "pending") for state in before.values())
    # the rows whose α is chosen on valid cannot name their test decode yet
    assert before["(α chosen on valid)"] == "pending"


def test_search_error_cells_add_steps_and_change_no_other_step(finished, monkeypatch):
    """Only the D3 and +IGD rows' decodes get a search-errors step; every other step (path and config, hence its
    cache key) is the plan's without them, so a grid run before them stays cached."""
    _, config, plan, before = finished
    scored = {(s.dataset, s.path, s.after) for r in plan.rows for c in [*r.candidates, *([r.fixed] if r.fixed else [])]
              for s in c.steps if s.stage == "search-errors"}
    assert {r.row for r in plan.rows if any(s.stage == "search-errors" for c in r.candidates for s in c.steps)
            or (r.fixed and any(s.stage == "search-errors" for s in r.fixed.steps))} == set(table_rows.SEARCH_ERROR_ROWS)
    assert all(path.replace("search-errors/", "decode/", 1) in after for _, path, after in scored)
    assert any(path.startswith("search-errors/") for path in before)  # the dry run lists them
    monkeypatch.setattr(planning, "SEARCH_ERROR_ROWS", [])
    without = planning.plan_grid(grid_config.load_grid(config))

    def steps(p):
        return [(s.path, s.config) for r in p.rows for c in [*r.candidates, *([r.fixed] if r.fixed else [])] for s in c.steps]
    assert steps(without) == [s for s in steps(plan) if not s[0].startswith("search-errors/")]


def test_every_available_row_is_in_table1_and_equals_its_metrics_artifact(finished):
    tmp, _, plan, _ = finished
    rows = _csv(tmp / "grid" / "reports" / "table1.csv")
    scores = [r for r in rows if r["kind"] == "score"]
    assert [r["row"] for r in scores] == table_rows.TABLE1_ROWS
    for r in scores:
        summary = json.loads((tmp / "grid" / "toy" / "metrics" / f"{r['metrics']}.json").read_text())
        assert summary["split"] == "test" and int(r["n_samples"]) == summary["n_samples"] == 6
        for m in report.METRICS:
            assert float(r[m]) == summary[m]
        if "baseline" in summary:  # GRU4Rec / SASRec: scored on the same first test samples as the LLM rows
            assert r["row"] == summary["baseline"] and summary["limited"]
            continue
        decode = json.loads((tmp / "grid" / "toy" / "decode" / summary["decode"] / "stage.json").read_text())["params"]
        assert float(r["alpha"]) == decode["alpha"] and r["sft"] == decode["source"]
        sft = json.loads((tmp / "grid" / "toy" / "sft" / r["sft"] / "stage.json").read_text())["params"]
        assert r["beta"] == ("" if "beta" not in sft else repr(sft["beta"]))
    improvements = [r for r in rows if r["kind"] == "improvement"]
    assert [r["row"] for r in improvements] == ["improvement:bigrec+igd", "improvement:d3+igd"]
    for r in improvements:
        for m in report.METRICS:
            assert float(r[f"ci_low_{m}"]) <= float(r[f"diff_{m}"]) <= float(r[f"ci_high_{m}"])


def test_alpha_and_beta_are_chosen_on_valid_by_ndcg10(finished):
    tmp, _, plan, _ = finished
    run = tmp / "grid" / "toy"
    for row in plan.rows:
        if not row.candidates:
            continue
        valid = []
        for cell in row.candidates:
            summary = json.loads((run / "metrics" / f"{cell.metrics}.json").read_text())
            assert summary["split"] == "valid" and summary["n_samples"] == 4
            valid.append((summary["NDCG@10"], cell.candidate))
        best = max(v for v, _ in valid)
        first_best = next(c for v, c in valid if v == best)
        test = select.resolve_test_cell(row, "NDCG@10")
        assert test.split == "test" and test.candidate == first_best
    d3_igd = next(r for r in plan.rows if r.row == "d3+igd")
    assert len(d3_igd.candidates) == 2 * len(ALPHAS)  # two IGD β × the α grid


def test_rerun_is_fully_cached_and_report_rerenders_the_same_tables(finished):
    tmp, config, plan, _ = finished
    states = dryrun.dry_run(planning.plan_grid(grid_config.load_grid(config)))
    assert {r["state"] for r in states} == {"cached"}
    out = tmp / "grid" / "reports"
    before = (out / "table1.csv").read_text()
    manifests = {p: p.stat().st_mtime_ns for p in (tmp / "grid" / "toy").rglob("stage.json")}
    result = CliRunner().invoke(app, ["grid", str(config)])
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in (tmp / "grid" / "toy").rglob("stage.json")} == manifests
    (out / "table1.csv").unlink()
    result = CliRunner().invoke(app, ["report", str(tmp / "grid")])
    assert result.exit_code == 0, result.output
    assert (out / "table1.csv").read_text() == before


def test_changed_settings_show_as_to_run(finished, tmp_path, tiny_model_dir):
    tmp, _, _, _ = finished
    changed = grid_yaml(tmp_path, tiny_model_dir, run_root=str(tmp / "grid"))
    spec = yaml.safe_load(changed.read_text())
    spec["stages"]["decode"]["num_beams"] = 12
    changed.write_text(yaml.safe_dump(spec))
    states = {(r["row"], r["stage"], r["path"]): r["state"] for r in dryrun.dry_run(planning.plan_grid(grid_config.load_grid(changed)))}
    assert states[("bigrec", "sft", "sft/plain-s16")] == "cached"
    assert states[("bigrec", "decode", "decode/plain-s16-test-lp1-a0-n6")] == "to run"


def test_only_runs_one_row_and_refuses_unknown_or_unavailable_rows(finished, tiny_model_dir):
    tmp, config, _, _ = finished
    plan = planning.plan_grid(grid_config.load_grid(config), only="d3")
    assert [r.row for r in plan.rows] == ["d3"]
    with pytest.raises(IgdrecError, match="--only 'd4': unknown row \\(did you mean 'd3'\\?\\)"):
        planning.plan_grid(grid_config.load_grid(config), only="d4")
    result = CliRunner().invoke(app, ["grid", str(config), "--dry-run", "--only", "d3"])
    assert result.exit_code == 0 and "cached" in result.output


def test_bad_grid_configs_name_the_key(tmp_path, tiny_model_dir):
    path = grid_yaml(tmp_path, tiny_model_dir, selction={"alphas": [0]})
    with pytest.raises(IgdrecError, match="unknown key.*selction"):
        grid_config.load_grid(path)
    path = grid_yaml(tmp_path, tiny_model_dir, weightings={"igdd": {"beta": 0.1}})
    with pytest.raises(IgdrecError, match="weightings: unknown key 'igdd' \\(did you mean 'igd'\\?\\)"):
        grid_config.load_grid(path)
    path = grid_yaml(tmp_path, tiny_model_dir, stages={"sft": {"epoch": 1}})
    with pytest.raises(IgdrecError, match="unknown key.*epoch"):
        planning.plan_grid(grid_config.load_grid(path))


def test_several_gpus_launch_sft_through_torchrun_with_the_same_config(monkeypatch, tmp_path, tiny_model_dir):
    from igdrec import config as cfg

    plan = planning.plan_grid(grid_config.load_grid(grid_yaml(tmp_path, tiny_model_dir)), only="bigrec+pos")
    step = next(s for s in plan.rows[0].fixed.steps if s.stage == "sft")
    assert step.config.resume  # a killed grid picks an interrupted fine-tune up from its checkpoint
    launched = {}

    def fake_run(command, check):
        config_path = command[command.index("--config") + 1]
        launched["command"] = command
        launched["config"] = cfg.load_stage_config("sft", config_path)

        class Done:
            returncode = 0

        return Done()

    monkeypatch.setattr(grid_run, "_gpu_count", lambda: 4)
    monkeypatch.setattr(grid_run.subprocess, "run", fake_run)
    grid_run.run_step(step)
    command = launched["command"]
    assert "--nproc_per_node=4" in command and command[command.index("-m") + 1:command.index("-m") + 3] == ["igdrec.cli", "sft"]
    assert command[command.index("--run-dir") + 1] == str(step.run_dir)
    assert launched["config"] == step.config
    monkeypatch.setattr(grid_run.subprocess, "run", lambda command, check: type("Failed", (), {"returncode": 3})())
    with pytest.raises(IgdrecError, match="torchrun .4 GPUs. failed with exit code 3"):
        grid_run.run_step(step)


def test_a_killed_grid_resumes_without_redoing_finished_steps(monkeypatch, tmp_path, tiny_model_dir):
    synthetic_run(tmp_path / "grid" / "toy")
    plan = planning.plan_grid(grid_config.load_grid(grid_yaml(tmp_path, tiny_model_dir)), only="d3")
    real_run_step = grid_run.run_step

    def killed_at_rerank(step, force=False):
        if step.stage == "rerank":
            raise KeyboardInterrupt
        real_run_step(step, force)

    monkeypatch.setattr(grid_run, "run_step", killed_at_rerank)
    with pytest.raises(KeyboardInterrupt):
        grid_run.run_grid(plan, report=False)
    monkeypatch.setattr(grid_run, "run_step", real_run_step)
    run = tmp_path / "grid" / "toy"
    finished = {p: p.stat().st_mtime_ns for p in run.rglob("stage.json")}
    assert {p.parent.parent.name for p in finished if p.parent.parent != run} == {"sft", "decode", "search-errors"}
    states = {r["stage"]: r["state"] for r in dryrun.dry_run(plan)}
    assert states == {"build-ig-index": "cached", "sft": "cached", "decode": "cached", "search-errors": "cached",
                      "rerank": "to run", "metrics": "to run"}
    grid_run.run_grid(plan, report=False)
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert {r["state"] for r in dryrun.dry_run(plan)} == {"cached"}
