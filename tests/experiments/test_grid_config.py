"""Grid configs: every bad input is one line naming the file and key, before anything runs; Pos and CFT
candidates are planned and chosen on the validation split (the shipped paper grid lists them)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from igdrec.experiments import dryrun, grid_config, plan as planning, select
from igdrec.experiments import rows as table_rows
from igdrec.cli import app
from igdrec.rundir import RunDir, StageWriter, write_json_atomic

REPO = Path(__file__).resolve().parents[2]
BASE = {"scale": "t", "datasets": {"toy": {}}, "stages": {"sft": {"model": "m"}}}


def write(tmp_path: Path, spec: dict | str, name: str = "g.yaml") -> Path:
    path = tmp_path / name
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(BASE | spec))
    return path


BAD = [  # (config changes, the key the message names, what it says): the grid's sections are read by options.build
    ({"selection": {"alphas": 3}}, ":selection.alphas 3:", "must lie in [0, 1]"),  # one value is a list of one
    ({"selection": {"alphas": "abc"}}, ":selection.alphas:", "expected a number, got 'abc'"),
    ({"selection": {"alphas": {"a": 1}}}, ":selection.alphas:", "expected a comma-separated list of numbers, got {'a': 1}"),
    ({"selection": {"alphas": ["abc"]}}, ":selection.alphas:", "expected a number, got 'abc'"),
    ({"selection": {"alphas": [0.2, 1.5]}}, ":selection.alphas 1.5:", "must lie in [0, 1]"),
    ({"selection": {"alphas": [0.1, 0.1]}}, ":selection.alphas:", "[0.1, 0.1] lists 0.1 twice"),
    ({"selection": {"alphas": []}}, ":selection.alphas:", "expected at least one value"),
    ({"selection": {"valid_limit": "abc"}}, ":selection.valid_limit:", "expected an integer"),
    ({"selection": {"valid_limit": 0}}, ":selection.valid_limit 0:", "must be ≥ 1"),  # decode --limit's bound
    ({"selection": {"alpha": [0.1]}}, ":selection:", "unknown key 'alpha' (did you mean 'alphas'?)"),
    ({"selection": 5}, ":selection:", "expected a mapping (`name: value` lines), got 5"),
    ({"selection": {"metric": "FOO@7"}}, ":selection.metric:", "'FOO@7' is not a metric this grid computes; known: HR@1"),
    ({"selection": {"metric": "ndcg@10"}}, ":selection.metric:", "(did you mean 'NDCG@10'?)"),
    ({"selection": {"metric": "NDCG@20"}}, ":selection.metric:", "is not a metric this grid computes (did you mean 'NDCG@10'?)"),
    ({"rows": 5}, ":rows '5':", "expected one of gru4rec, sasrec, bigrec"),
    ({"rows": ["bigrec", "d3+igdd"]}, ":rows 'd3+igdd':", "(did you mean 'd3+igd'?)"),
    ({"rows": ["d3", "d3"]}, ":rows:", "['d3', 'd3'] lists 'd3' twice"),
    ({"rows": ["all", "d3"]}, ":rows:", "`all` stands alone"),
    ({"stages": {1: {"limit": 3}}}, ":stages:", "unknown key '1'; known: build-ig-index, sft"),
    ({"stages": {"decod": {}}}, ":stages:", "unknown key 'decod' (did you mean 'decode'?)"),
    ({"stages": {"sft": 5}}, ":stages.sft:", "expected a mapping (`name: value` lines), got 5"),
    ({"datasets": {"toy": {"stages": {7: {}}}}}, ":datasets.toy.stages:", "unknown key '7'"),
    ({"datasets": {"toy": {3: 1}}}, ":datasets.toy:", "unknown key '3'; known: preprocess"),
    ({"datasets": {"toy": {"paper": "Game"}}}, ":datasets.toy.paper 'Game':", "expected one of Books, Games, Toys, CDs (did you mean 'Games'?)"),
    ({"datasets": {"toy": {"preprocess": {"histroy_len": 3}}}}, ":datasets.toy.preprocess:", "unknown key 'histroy_len' (did you mean 'history_len'?)"),
    ({"datasets": {"toy": {"cost": {"baseline_best_epoch": {"sasrec": "x"}}}}}, ":datasets.toy.cost.baseline_best_epoch.sasrec:",
     "expected a number, got 'x'"),
    ({"datasets": {}}, ": `datasets` is empty", "name at least one dataset"),
    ({4: 1}, ": unknown key '4'", "known: scale, description, run_root"),
    ({"tfa_guidance": "abc"}, ":tfa_guidance:", "expected a number, got 'abc'"),
    ({"tfa_guidance": 2}, ":tfa_guidance 2:", "must lie in [0, 1]"),
    ({"run_root": ["a"]}, ":run_root:", "expected a string, got ['a']"),
    ({"cost": {"decode_s_per_samples": 1}}, ":cost:", "(did you mean 'decode_s_per_sample'?)"),
    ({"cost": {"decode_s_per_sample": "abc"}}, ":cost.decode_s_per_sample:", "expected a number, got 'abc'"),
    ({"cost": {"decode_s_per_sample": -1}}, ":cost.decode_s_per_sample -1:", "must be ≥ 0"),
    ({"weightings": {"idg": {}}}, ":weightings:", "unknown key 'idg' (did you mean 'igd'?)"),
    ({"weightings": {"pos": {"beta": []}}}, ":weightings.pos.beta:", "needs at least one value"),
    ({"weightings": {"pos": {"beta": [0.5, 0.5]}}}, ":weightings.pos.beta:", "each once"),
    # the report prints NDCG/HR @5 and @10: a grid whose metrics lack one is refused before its cells run
    ({"stages": {"sft": {"model": "m"}, "decode": {"num_beams": 4}}}, ":datasets.toy:",
     "would lack NDCG@5, NDCG@10, HR@5, HR@10 (metrics.ks [1, 3, 5, 10, 20], lists of at most 4 items (decode num_beams 4))"),
    ({"stages": {"sft": {"model": "m"}, "metrics": {"ks": [1, 10]}}}, ":datasets.toy:", "would lack NDCG@5, HR@5"),
    ({"stages": {"sft": {"model": "m"}, "rerank": {"top_k": 8}}}, ":datasets.toy:", "would lack NDCG@10, HR@10"),
]


@pytest.mark.parametrize(("changes", "key", "says"), BAD, ids=[f"{k}{s[:20]}" for _, k, s in BAD])
def test_bad_grid_config_is_one_line_naming_file_and_key(tmp_path, changes, key, says):
    path = write(tmp_path, changes)
    result = CliRunner().invoke(app, ["grid", str(path), "--dry-run", "--run-root", str(tmp_path / "runs")])
    assert result.exit_code != 0
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert f"{path}{key}" in result.output and says in result.output, result.output
    assert not (tmp_path / "runs").exists()  # nothing written


def test_unreadable_grid_configs_are_one_line(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"scale: \xff\xfe\n")
    cases = [(binary, "cannot read the config file"), (tmp_path, "is a directory, not a YAML config file"),
             (tmp_path / "none.yaml", "config file not found"), (write(tmp_path, "rows: [a\n", "broken.yaml"), "is not valid YAML")]
    for path, says in cases:
        result = CliRunner().invoke(app, ["grid", str(path), "--dry-run"])
        assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1, result.output
        assert str(path) in result.output and says in result.output, result.output


def test_the_checks_accept_every_shipped_grid_and_a_metric_the_grid_computes(tmp_path):
    for path in sorted((REPO / "configs" / "grid").glob("*.yaml")):
        grid_config.load_grid(path, run_root=tmp_path)
    grid = grid_config.load_grid(write(tmp_path, {"selection": {"metric": "HR@5", "alphas": [0, 0.3]}, "rows": "bigrec, d3"}))
    assert grid.selection.metric == "HR@5" and grid.selection.alphas == [0.0, 0.3] and grid.rows == ["bigrec", "d3"]
    # a stage section's name may be spelt with '_' as its YAML keys are; an empty section is an empty mapping
    grid = grid_config.load_grid(write(tmp_path, {"stages": {"build_ig_index": {"catalog": "train"}, "sft": {"model": "m"}},
                                                  "datasets": {"toy": None}, "selection": None}))
    assert grid.datasets[0].stages["build-ig-index"] == {"catalog": "train"} and grid.selection.alphas == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert grid.rows == list(table_rows.ROWS) and grid.datasets[0].cost == {} and grid.cost == {}


def test_every_shipped_grid_loads_to_the_values_the_hand_written_loader_gave(tmp_path):
    """shipped_grids.json holds each shipped grid as loaded by the loader before the grid's sections were
    declared with options.option() (main at bffc757): the declared schema reads every shipped grid the same
    (a deliberate change to a shipped grid updates the file)."""
    expected = json.loads((Path(__file__).parent / "shipped_grids.json").read_text())
    paths = sorted((REPO / "configs" / "grid").glob("*.yaml"))
    assert sorted(expected) == [p.name for p in paths]
    for path in paths:
        loaded = dataclasses.asdict(grid_config.load_grid(path))
        del loaded["path"]
        assert json.loads(json.dumps(loaded, default=str)) == expected[path.name], path.name


# ------------------------------------------------------------------------------------ Pos / CFT selection


def paper_plan(tmp_path: Path) -> planning.Plan:
    return planning.plan_grid(grid_config.load_grid(REPO / "configs" / "grid" / "paper.yaml", run_root=tmp_path / "paper"))


def test_paper_grid_lists_pos_and_cft_candidate_fine_tunes_per_dataset_chosen_on_valid(tmp_path):
    spec = yaml.safe_load((REPO / "configs" / "grid" / "paper.yaml").read_text())
    pos_betas, cft = spec["weightings"]["pos"]["beta"], spec["weightings"]["cft"]
    assert len(pos_betas) > 1 and len(cft["beta"]) * len(cft["cft_alpha"]) > 1
    expected = {"pos": {f"sft/pos-b{b:g}" for b in pos_betas},
                "cft": {f"sft/cft-b{b:g}-a{a:g}" for b in cft["beta"] for a in cft["cft_alpha"]}}
    plan = paper_plan(tmp_path)
    records = dryrun.dry_run(plan)
    for dataset in ("games", "toys", "cds", "books"):
        for weighting, paths in expected.items():
            for row in (f"bigrec+{weighting}", f"d3+{weighting}"):
                row_plan = next(r for r in plan.rows if r.dataset == dataset and r.row == row)
                assert row_plan.fixed is None and select.selected_over(row_plan) == "fine-tune"
                assert {f"sft/{c.candidate['sft']}" for c in row_plan.candidates} == paths
                assert all(c.split == "valid" and c.candidate["alpha"] == 0.0 for c in row_plan.candidates)
                assert all(next(s for s in c.steps if s.stage == "decode").config.split == "valid" for c in row_plan.candidates)
            # each candidate fine-tune is listed once, in the valid phase, marked as chosen on valid
            sfts = [r for r in records if r["dataset"] == dataset and r["stage"] == "sft" and r["path"] in paths]
            assert {r["path"] for r in sfts} == paths and len(sfts) == len(paths)
            assert all(r["role"] == "select on valid" and "chosen on valid by NDCG@10" in r["note"] for r in sfts)
            assert all(r["estimate_s"] for r in sfts)  # the cost shows
            # no test decode before the choice: a pending line per row
            for row in (f"bigrec+{weighting}", f"d3+{weighting}"):
                pending = [r for r in records if r["dataset"] == dataset and r["row"] == row and r["role"] == "test"]
                assert [(r["path"], r["state"]) for r in pending] == [("(fine-tune chosen on valid)", "pending")]
    result = CliRunner().invoke(app, ["grid", str(REPO / "configs" / "grid" / "paper.yaml"), "--dry-run", "--run-root", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "sft/pos-b0.16" in result.output and f"candidate 1 of {len(pos_betas)}, chosen on valid" in result.output
    assert "books d3+cft: fine-tune among" in result.output and "estimated cost of what is left" in result.output


def test_smoke_grid_keeps_one_untuned_pos_and_cft_point(tmp_path):
    plan = planning.plan_grid(grid_config.load_grid(REPO / "configs" / "grid" / "smoke.yaml", run_root=tmp_path))
    for row in ("bigrec+pos", "d3+pos", "bigrec+cft", "d3+cft"):
        row_plan = next(r for r in plan.rows if r.row == row)
        assert not row_plan.candidates and row_plan.fixed.split == "test"


def fake_valid_metrics(run_dir: Path, name: str, ndcg10: float) -> None:
    """A finished metrics artifact with one score (what `choose` reads)."""
    run = RunDir(run_dir)
    summary = {"split": "valid", "NDCG@10": ndcg10, "NDCG@5": 0.0}
    with StageWriter(run, f"metrics/{name}", stage="metrics", params={"fake": name}) as out:
        write_json_atomic(out.path("metrics.json"), summary)
    write_json_atomic(run.stage_dir("metrics") / f"{name}.json", summary)


@pytest.mark.parametrize(("row", "scores", "winner"), [
    ("bigrec+pos", [0.10, 0.30, 0.30, 0.20], 1),  # a tie: the earlier listed β
    ("d3+pos", [0.40, 0.10, 0.20, 0.40], 0),
    ("bigrec+cft", [0.05, 0.05, 0.07, 0.06], 2),
    ("d3+cft", [0.20, 0.20, 0.20, 0.20], 0),      # all equal: the first candidate
])
def test_pos_and_cft_winner_is_the_best_valid_score_earliest_on_ties(tmp_path, row, scores, winner):
    plan = paper_plan(tmp_path)
    row_plan = next(r for r in plan.rows if r.dataset == "toys" and r.row == row)
    run_dir = row_plan.candidates[0].steps[0].run_dir
    assert len(row_plan.candidates) == len(scores)
    for cell, score in zip(row_plan.candidates[:-1], scores):
        fake_valid_metrics(run_dir, cell.metrics, score)
    assert select.resolve_test_cell(row_plan, "NDCG@10") is None  # one candidate unscored: no choice yet
    fake_valid_metrics(run_dir, row_plan.candidates[-1].metrics, scores[-1])
    chosen, table = select.choose(run_dir, row_plan.candidates, "NDCG@10")
    assert [s["NDCG@10"] for s in table] == scores
    assert chosen["sft"] == row_plan.candidates[winner].candidate["sft"]
    test = select.resolve_test_cell(row_plan, "NDCG@10")
    decode = next(s for s in test.steps if s.stage == "decode").config
    sft = next(s for s in test.steps if s.stage == "sft")
    assert test.split == "test" and decode.split == "test" and decode.limit is None
    assert decode.sft == chosen["sft"] and sft.path == f"sft/{chosen['sft']}" and decode.alpha == 0.0
    lp = table_rows.ROWS[row]["lp"]
    assert decode.length_penalty == lp and all(
        next(s for s in c.steps if s.stage == "decode").config.length_penalty == lp for c in row_plan.candidates)
    assert json.loads((run_dir / "metrics" / f"{row_plan.candidates[winner].metrics}.json").read_text())["NDCG@10"] == max(scores)


def test_method_doc_states_what_each_shipped_scale_selects():
    """docs/method.md §6.7's table is the shipped grids' selection, value for value."""
    section = (REPO / "docs" / "method.md").read_text().split("### §6.7", 1)[1].split("\n## ", 1)[0]

    def shown(value) -> str:
        return "{" + ", ".join(f"{v:g}" for v in value) + "}" if isinstance(value, list) else f"{value:g}"

    for scale in ("smoke", "mini", "gpu", "paper"):
        grid = grid_config.load_grid(REPO / "configs" / "grid" / f"{scale}.yaml", run_root="unused")
        w = grid.datasets[0].weightings
        line = next(line for line in section.splitlines() if line.startswith(f"| {scale} |"))
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        assert cells[0] == shown(grid.selection.alphas)
        if scale != "paper":  # the paper's IGD β differs per dataset
            assert cells[1] == shown(w["igd"]["beta"])
        assert cells[2] == shown(w["pos"]["beta"])
        assert cells[3] == f"{shown(w['cft']['beta'])} × {shown(w['cft']['cft_alpha'])}"
