"""`igdrec report` on a finished tiny grid: tables 2 to 4, figures, paper columns, notes, older grids."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml
from grid_helpers import ALPHAS, _csv
from typer.testing import CliRunner

from igdrec.cli import app
from igdrec.errors import IgdrecError
from igdrec.experiments import grid_config, plan as planning, report
from igdrec.metrics import POPULARITY


def test_tables_2_to_4_and_figures(finished):
    tmp, _, _, _ = finished
    out = tmp / "grid" / "reports"
    table2 = _csv(out / "table2.csv")
    assert [r["method"] for r in table2] == ["IGD", "w/o w_d", "w/o w_t", "w/o both"]
    table1 = {r["row"]: r for r in _csv(out / "table1.csv")}
    assert table2[0]["NDCG@10"] == table1["d3+igd"]["NDCG@10"] and table2[3]["NDCG@10"] == table1["d3"]["NDCG@10"]
    assert float(table2[1]["alpha"]) == 0.0
    table3 = _csv(out / "table3.csv")
    assert {r["weighting"] for r in table3} == {"plain", "pos", "cft", "igd", "msl", "msl-igd"}
    assert all((r["paper_ratio"] == "") == r["weighting"].startswith("msl") for r in table3)  # MSL: beyond the paper
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
    with pytest.raises(IgdrecError, match="datasets.toy.paper 'Movies': expected one of Books, Games, Toys, CDs"):
        spec["datasets"]["toy"]["paper"] = "Movies"
        labelled.write_text(yaml.safe_dump(spec))
        grid_config.load_grid(labelled)
    report.write_reports(planning.run_root_plan(tmp / "grid"))  # back to the run's own config


def test_improvement_note_says_what_its_interval_covers(finished):
    tmp, _, _, _ = finished
    table1 = (tmp / "grid" / "reports" / "table1.md").read_text()
    assert "test-sample noise only" in table1 and "one seed" in table1 and "resampled in pairs" in table1
    assert "one fine-tuning seed only" in (tmp / "grid" / "reports" / "README.md").read_text()


def test_beyond_accuracy_table_reads_every_table1_row_from_its_metrics(finished):
    tmp, _, _, _ = finished
    out = tmp / "grid" / "reports"
    rows = {r["row"]: r for r in _csv(out / "beyond_accuracy.csv")}
    assert list(rows) == [r["row"] for r in _csv(out / "table1.csv") if r["kind"] == "score"]
    assert {"sasrec", "gru4rec", "d3", "d3+igd"} <= set(rows)  # baseline and LLM rows alike
    for r in rows.values():
        summary = json.loads((tmp / "grid" / "toy" / "metrics" / f"{r['metrics']}.json").read_text())
        assert all(float(r[m]) == summary["popularity"][m] for m in POPULARITY), r
        assert float(r["item_coverage"]) == summary["diversity"]["item_coverage"] and int(r["k"]) == summary["diversity_k"]
        assert float(r["head_share"]) == 0.2 and 0 <= float(r["long_tail_share"]) <= 1
    md = (out / "beyond_accuracy.md").read_text()
    sasrec = next(line for line in md.splitlines() if line.startswith("| SASRec |")).split(" | ")
    assert sasrec[3] == f"{float(rows['sasrec']['average_popularity']):.2f}" and "long-tail share" in md
    assert "beyond_accuracy.md" in (out / "README.md").read_text()


def test_report_renders_an_older_grid_whose_metrics_lack_a_printed_cut_off(finished, tmp_path):
    """A run root made before the cut-off check (ks without 5) and the popularity metrics renders, the missing
    columns as —; `igdrec grid` refuses the same config before running anything."""
    import shutil

    tmp, _, _, _ = finished
    old = tmp_path / "old"
    shutil.copytree(tmp / "grid", old, ignore=shutil.ignore_patterns("reports"))
    spec = yaml.safe_load((old / grid_config.CONFIG_COPY).read_text())
    spec["stages"]["metrics"]["ks"] = [1, 10]
    (old / grid_config.CONFIG_COPY).write_text(yaml.safe_dump(spec))
    for summary_path in (old / "toy" / "metrics").glob("*/metrics.json"):  # what such a grid's metrics held
        summary = json.loads(summary_path.read_text())
        summary = {k: v for k, v in summary.items() if not k.endswith("@5") and k != "popularity"}
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
    beyond = {r["row"]: r for r in _csv(old / "reports" / "beyond_accuracy.csv")}
    assert beyond["d3"]["novelty"] == "" and beyond["d3"]["item_coverage"] != ""


def test_search_error_table_has_every_alpha_candidate_and_the_test_decode(finished):
    """Beyond the paper: the D3 and +IGD rows' search errors, read from each decode's search-errors artifact."""
    tmp, _, plan, _ = finished
    out = tmp / "grid" / "reports"
    records = _csv(out / "search_errors.csv")
    assert {r["row"] for r in records} == {"d3", "bigrec+igd", "d3+igd"}
    for row in ("bigrec+igd", "d3+igd"):
        valid = [r for r in records if r["row"] == row and r["split"] == "valid"]
        assert sorted(float(r["alpha"]) for r in valid) == sorted(a for a in ALPHAS for _ in range(2))  # β 0.1 and 0.3
        assert len([r for r in records if r["row"] == row and r["split"] == "test"]) == 1
    for r in records:
        stats = json.loads((tmp / "grid" / "toy" / "search-errors" / r["decode"] / "stage.json").read_text())["stats"]
        assert float(r["search_error"]) == stats["rates"]["search_error"] and int(r["n_samples"]) == stats["n_samples"]
        assert float(r["alpha"]) == stats["alpha"]
        assert sum(float(r[c]) for c in ("hit", "search_error", "model_error", "unreachable")) == pytest.approx(1.0)
    assert "Search errors by α" in (out / "search_errors.md").read_text()
    readme = (out / "README.md").read_text()
    assert "search_errors.md" in readme
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "toy-search-errors-vs-alpha.png").stat().st_size > 1000 and "toy-search-errors-vs-alpha.png" in readme
