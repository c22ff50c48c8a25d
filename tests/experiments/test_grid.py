"""The grid runner end to end on the tiny random model: plan, dry run, run, resume, reports, figures."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fixtures import synthetic_run
from igdrec.experiments import dryrun, grid_config, plan as planning, report, select
from igdrec.experiments import rows as table_rows, run as grid_run
from igdrec.cli import app
from igdrec.errors import IgdrecError

ALPHAS = [0.0, 0.4]


def grid_yaml(tmp_path: Path, model_dir: Path, **changes) -> Path:
    spec = {
        "scale": "test",
        "run_root": str(tmp_path / "grid"),
        "datasets": {"toy": {}},  # no preprocess section: the run directory already holds its data stage
        "stages": {
            "build-ig-index": {"model": str(model_dir), "catalog": "train"},
            "sft": {"model": str(model_dir), "sample": 16, "valid_sample": 4, "batch_size": 8, "micro_batch_size": 4,
                    "epochs": 1, "warmup_steps": 1, "lr": 1e-3},
            "decode": {"limit": 6, "num_beams": 10, "batch_size": 8},
            "metrics": {"bootstrap": 50},
        },
        "weightings": {"pos": {"beta": 0.5}, "cft": {"beta": 0.5, "alpha": 0.1}, "igd": {"beta": [0.1, 0.3]}},
        "selection": {"alphas": ALPHAS, "valid_limit": 4},
    } | changes
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("grid")
    synthetic_run(tmp / "grid" / "toy")
    config = grid_yaml(tmp, tiny_model_dir)
    plan = planning.plan_grid(grid_config.load_grid(config))
    before = {r["path"]: r["state"] for r in dryrun.dry_run(plan)}
    grid_run.run_grid(plan)
    return tmp, config, plan, before


def _csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_dry_run_before_the_run_has_nothing_cached_but_the_data(finished):
    _, _, _, before = finished
    assert before["ig"] == "to run" and before["sft/plain-s16"] == "to run"
    assert all(state in ("to run", "pending") for state in before.values())
    # the rows whose α is chosen on valid cannot name their test decode yet
    assert before["(α chosen on valid)"] == "pending"


def test_every_available_row_is_in_table1_and_equals_its_metrics_artifact(finished):
    tmp, _, plan, _ = finished
    rows = _csv(tmp / "grid" / "reports" / "table1.csv")
    scores = [r for r in rows if r["kind"] == "score"]
    available = [r for r in table_rows.TABLE1_ROWS if planning.row_unavailable(r) is None]
    assert [r["row"] for r in scores] == available
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
    # rows whose stage is missing are reported as such, never silently dropped
    for row in table_rows.TABLE1_ROWS:
        if planning.row_unavailable(row):
            assert row in plan.unavailable
            assert "n/a" in (tmp / "grid" / "reports" / "table1.md").read_text()


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


def test_tables_2_to_4_and_figures(finished):
    tmp, _, _, _ = finished
    out = tmp / "grid" / "reports"
    table2 = _csv(out / "table2.csv")
    assert [r["method"] for r in table2] == ["IGD", "w/o w_d", "w/o w_t", "w/o both"]
    table1 = {r["row"]: r for r in _csv(out / "table1.csv")}
    assert table2[0]["NDCG@10"] == table1["d3+igd"]["NDCG@10"] and table2[3]["NDCG@10"] == table1["d3"]["NDCG@10"]
    assert float(table2[1]["alpha"]) == 0.0
    table3 = _csv(out / "table3.csv")
    assert {r["weighting"] for r in table3} == {"plain", "pos", "cft", "igd"}
    plain = next(r for r in table3 if r["weighting"] == "plain")
    assert float(plain["ratio_to_plain"]) == 1.0
    for r in table3:
        manifest = json.loads((tmp / "grid" / "toy" / "sft" / r["sft"] / "stage.json").read_text())
        assert float(r["s_per_step"]) == manifest["stats"]["train_seconds"] / manifest["stats"]["steps"]
    ig_stats = json.loads((tmp / "grid" / "toy" / "ig" / "stage.json").read_text())["stats"]
    table4 = _csv(out / "table4.csv")[0]
    assert int(table4["tokens"]) == ig_stats["tokens"] and int(table4["zero_ig_tokens"]) == ig_stats["zero_ig_tokens"]
    readme = (out / "README.md").read_text()
    assert "validation" in readme and "we do not" in readme and "git commit" in readme and "Wall time" in readme
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("toy-fig1-2-entropy-by-step.png", "toy-fig3-entropy-difference.png", "toy-ce-by-ig-group.png", "toy-NDCG10-vs-alpha.png"):
            assert (out / name).stat().st_size > 1000 and name in readme
    else:
        assert "matplotlib" in readme


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
    if planning.row_unavailable("sasrec"):
        with pytest.raises(IgdrecError, match="baseline"):
            planning.plan_grid(grid_config.load_grid(config), only="sasrec")
    result = CliRunner().invoke(app, ["grid", str(config), "--dry-run", "--only", "d3"])
    assert result.exit_code == 0 and "cached" in result.output


def test_bad_grid_configs_name_the_key(tmp_path, tiny_model_dir):
    path = grid_yaml(tmp_path, tiny_model_dir, selction={"alphas": [0]})
    with pytest.raises(IgdrecError, match="unknown key.*selction"):
        grid_config.load_grid(path)
    path = grid_yaml(tmp_path, tiny_model_dir, weightings={"igdd": {"beta": 0.1}})
    with pytest.raises(IgdrecError, match="unknown weighting 'igdd'"):
        grid_config.load_grid(path)
    path = grid_yaml(tmp_path, tiny_model_dir, stages={"sft": {"epoch": 1}})
    with pytest.raises(IgdrecError, match="unknown key.*epoch"):
        planning.plan_grid(grid_config.load_grid(path))


def test_paper_numbers_appear_only_in_columns_labelled_paper(finished, tmp_path):
    tmp, config, _, _ = finished
    spec = yaml.safe_load(config.read_text())
    spec["datasets"]["toy"]["paper"] = "Games"
    labelled = tmp_path / "paper.yaml"
    labelled.write_text(yaml.safe_dump(spec))
    out = report.write_reports(planning.run_root_plan(tmp / "grid", config=labelled))
    rows = _csv(out / "table1.csv")
    d3 = next(r for r in rows if r["row"] == "d3")
    assert float(d3["paper_NDCG@10"]) == 0.0477 and float(d3["NDCG@10"]) != 0.0477
    summary = json.loads((tmp / "grid" / "toy" / "metrics" / f"{d3['metrics']}.json").read_text())
    assert float(d3["NDCG@10"]) == summary["NDCG@10"]
    header = (out / "table1.md").read_text().splitlines()
    assert any("paper N@10 (Games)" in line for line in header)
    assert "paper: Games" in (out / "table4.md").read_text() and "201,613" in (out / "table4.md").read_text()
    assert "1.035" in (out / "table3.md").read_text()
    with pytest.raises(IgdrecError, match="not one of the paper's datasets"):
        spec["datasets"]["toy"]["paper"] = "Movies"
        labelled.write_text(yaml.safe_dump(spec))
        grid_config.load_grid(labelled)
    report.write_reports(planning.run_root_plan(tmp / "grid"))  # back to the run's own config


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
    assert {p.parent.parent.name for p in finished if p.parent.parent != run} == {"sft", "decode"}
    states = {r["stage"]: r["state"] for r in dryrun.dry_run(plan)}
    assert states == {"build-ig-index": "cached", "sft": "cached", "decode": "cached", "rerank": "to run", "metrics": "to run"}
    grid_run.run_grid(plan, report=False)
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert {r["state"] for r in dryrun.dry_run(plan)} == {"cached"}


def test_improvement_note_says_what_its_interval_covers(finished):
    tmp, _, _, _ = finished
    table1 = (tmp / "grid" / "reports" / "table1.md").read_text()
    assert "test-sample noise only" in table1 and "one seed" in table1 and "resampled in pairs" in table1
    assert "one fine-tuning seed only" in (tmp / "grid" / "reports" / "README.md").read_text()


def test_report_renders_an_older_grid_whose_metrics_lack_a_printed_cut_off(finished, tmp_path):
    """A run root made before the cut-off check (ks without 5) renders, the missing columns as —;
    `igdrec grid` refuses the same config before running anything."""
    import shutil

    tmp, _, _, _ = finished
    old = tmp_path / "old"
    shutil.copytree(tmp / "grid", old, ignore=shutil.ignore_patterns("reports"))
    spec = yaml.safe_load((old / grid_config.CONFIG_COPY).read_text())
    spec["stages"]["metrics"]["ks"] = [1, 10]
    (old / grid_config.CONFIG_COPY).write_text(yaml.safe_dump(spec))
    for summary_path in (old / "toy" / "metrics").glob("*/metrics.json"):  # what such a grid's metrics held
        summary = json.loads(summary_path.read_text())
        summary = {k: v for k, v in summary.items() if not k.endswith("@5")}
        summary_path.write_text(json.dumps(summary))
        manifest_path = summary_path.parent / "stage.json"  # keep the artifact intact in its manifest's eyes
        manifest = json.loads(manifest_path.read_text())
        from igdrec.rundir import fingerprint_file, manifest_digest

        manifest["outputs"]["metrics.json"] = {**manifest["outputs"]["metrics.json"], "bytes": summary_path.stat().st_size,
                                               "fingerprint": fingerprint_file(summary_path)}
        manifest["digest"] = manifest_digest(manifest)
        manifest_path.write_text(json.dumps(manifest))
    result = CliRunner().invoke(app, ["grid", str(old / grid_config.CONFIG_COPY), "--dry-run", "--run-root", str(old)])
    assert result.exit_code != 0 and "would lack NDCG@5, HR@5" in result.output
    result = CliRunner().invoke(app, ["report", str(old)])
    assert result.exit_code == 0, result.output
    rows = {r["row"]: r for r in _csv(old / "reports" / "table1.csv")}
    before = {r["row"]: r for r in _csv(tmp / "grid" / "reports" / "table1.csv")}
    assert rows["d3"]["NDCG@5"] == "" and rows["d3"]["NDCG@10"] == before["d3"]["NDCG@10"] != ""
    improvement = rows["improvement:d3+igd"]
    assert improvement["diff_NDCG@5"] == "" and improvement["diff_NDCG@10"] == before["improvement:d3+igd"]["diff_NDCG@10"]
    d3_line = next(line for line in (old / "reports" / "table1.md").read_text().splitlines() if line.startswith("| D3 |"))
    assert d3_line.split(" | ")[1] == "—" and d3_line.split(" | ")[2] == f"{float(before['d3']['NDCG@10']):.4f}"
