"""The command line on bad input (one line naming the option or file, non-zero exit, nothing run), `igdrec
run`, `metrics --compare` settings, the cut-offs a list can support, hints and the one "cached" wording."""

from __future__ import annotations

import json

import polars as pl
import pytest
from cli_helpers import one_line_error
from decode_helpers import publish_ig
from fixtures import synthetic_run
from typer.testing import CliRunner

from igdrec import cli, options, schema
from igdrec import config as cfg
from igdrec.cli import app
from igdrec.config import MetricsConfig
from igdrec.errors import IgdrecError
from igdrec.rundir import StageWriter
from igdrec.stages import metrics as metrics_stage


@pytest.fixture
def ran(monkeypatch):
    """The stages the CLI would run (nothing runs), and the --compare calls."""
    calls = []
    monkeypatch.setattr(cli, "run_stage", lambda stage, config, run_dir, force: calls.append((stage, config)))
    monkeypatch.setattr(metrics_stage, "compare", lambda names, run, **kwargs: calls.append(("compare", names, kwargs)))
    return calls


@pytest.mark.parametrize(
    "args, needles",
    [
        (["sft", "--max-steps", "0"], ["--max-steps 0: must be ≥ 1"]),
        (["sft", "--max-steps", "-3"], ["--max-steps -3: must be ≥ 1"]),
        (["sft", "--max-steps", "abc"], ["--max-steps: expected an integer, got 'abc'"]),
        (["sft", "--lr", "-1"], ["--lr -1: must be > 0"]),
        (["sft", "--lr", "0"], ["--lr 0: must be > 0"]),
        (["sft", "--beta", "1.5"], ["--beta 1.5: must lie in [0, 1]"]),
        (["sft", "--cft-alpha", "0.1"], ["--cft-alpha 0.1: only the cft weighting"]),
        (["sft", "--weighting", "igdd"], ["--weighting 'igdd': expected one of plain, pos, cft, igd", "did you mean 'igd'"]),
        (["sft", "--lora-target-modules", ","], ["--lora-target-modules: expected at least one value"]),
        (["metrics", "--ks", "a,b"], ["--ks: expected an integer, got 'a'"]),
        (["metrics", "--ks", "5,0"], ["--ks 0: must be ≥ 1"]),
        (["metrics", "--compare", "a", "b", "--bootstrap", "-5"], ["--bootstrap -5: must be ≥ 1"]),
        (["decode", "--alpha", "2"], ["--alpha 2: must lie in [0, 1]"]),
        (["decode", "--alpha", "-0.5"], ["--alpha -0.5: must lie in [0, 1]"]),
        (["decode", "--alpha", "nan"], ["--alpha nan: must be a finite number"]),
        (["decode", "--split", "tset"], ["did you mean 'test'"]),
        (["decode", "--jump-fill", "0"], ["--jump-fill 0: must lie in (0, 1]"]),
        (["build-ig-index", "--reference", "unifrom"], ["did you mean 'uniform'"]),
        (["preprocess", "--source", "ml100k"], ["--source 'ml100k'", "did you mean 'ml-100k'"]),
        (["rerank", "--top-k", "0"], ["--top-k 0: must be ≥ 1"]),
    ],
)
def test_bad_options_are_one_line_errors_and_run_nothing(args, needles, ran, tmp_path):
    one_line_error(CliRunner().invoke(app, [*args, "--run-dir", str(tmp_path)]), *needles)
    assert ran == []


def test_drifted_options_reach_the_stage_config(ran, tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["sft", "--weight-decay", "0.01", "--max-grad-norm", "0", "--min-lr-ratio", "0.2",
                               "--patience", "2", "--log-every", "5", "--run-dir", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["decode", "--cutoff-len", "256", "--jump-fill", "0.5", "--run-dir", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["preprocess", "--seed", "3", "--earliest-year", "2000", "--run-dir", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["metrics", "--diversity-k", "5", "--run-dir", str(tmp_path)]).exit_code == 0
    sft, decode, preprocess, metrics = (config for _, config in ran)
    assert (sft.weight_decay, sft.max_grad_norm, sft.min_lr_ratio, sft.patience, sft.log_every) == (0.01, 0.0, 0.2, 2, 5)
    assert (decode.cutoff_len, decode.jump_fill) == (256, 0.5)
    assert (preprocess.seed, preprocess.earliest_year) == (3, 2000)
    assert metrics.diversity_k == 5


def test_compare_takes_seed_and_bootstrap_from_flags_and_config(ran, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["metrics", "--compare", "a", "b", "--seed", "3", "--bootstrap", "50", "--run-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    config = tmp_path / "c.yaml"
    config.write_text("metrics:\n  seed: 9\n  bootstrap: 20\n")
    assert runner.invoke(app, ["metrics", "--compare", "a", "b", "-c", str(config), "--run-dir", str(tmp_path)]).exit_code == 0
    assert [call[2] for call in ran] == [{"bootstrap": 50, "seed": 3}, {"bootstrap": 20, "seed": 9}]
    stray = runner.invoke(app, ["metrics", "a", "b", "--run-dir", str(tmp_path)])
    one_line_error(stray, "--compare")


# --------------------------------------------------------------------------------------------------
# igdrec run


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty config"),
        ("sft: 5\n", "sft: expected a mapping of sft options"),
        ("stages: []\n", "no stages to run"),
        ("stages: [preprocess, sfft]\n", "did you mean 'sft'"),
        ("decode:\n  alpha: 2\n", "decode.alpha 2: must lie in [0, 1]"),
    ],
)
def test_run_refuses_configs_that_name_nothing_or_nonsense(text, needle, ran, tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    one_line_error(CliRunner().invoke(app, ["run", str(path)]), str(path), needle)
    assert ran == []


def test_run_refuses_a_directory(ran, tmp_path):
    one_line_error(CliRunner().invoke(app, ["run", str(tmp_path)]), str(tmp_path), "is a directory")


def test_run_executes_exactly_the_stages_named(ran, tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("stages: preprocess\nsft:\n  epochs: 1\n")
    assert CliRunner().invoke(app, ["run", str(path)]).exit_code == 0
    assert [stage for stage, _ in ran] == ["preprocess"]
    path.write_text("sft:\n  epochs: 1\nmetrics:\n  ks: [1]\n")  # no `stages`: the sections, in pipeline order
    assert CliRunner().invoke(app, ["run", str(path)]).exit_code == 0
    assert [stage for stage, _ in ran[1:]] == ["sft", "metrics"] and ran[1][1].epochs == 1


def test_an_interrupted_run_says_which_stage_stopped(monkeypatch, tmp_path):
    def stage_runner(stage, config, run_dir, force):
        if stage == "sft":
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_stage", stage_runner)
    path = tmp_path / "pipeline.yaml"
    path.write_text("stages: [preprocess, sft, decode]\n")
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 130
    assert "interrupted: stage sft (2 of 3) stopped" in result.output and "igdrec run" in result.output
    single = CliRunner().invoke(app, ["sft", "--run-dir", str(tmp_path)])
    assert single.exit_code == 130 and "interrupted: sft stopped" in single.output


# --------------------------------------------------------------------------------------------------
# metrics: cut-offs, seed, hints (hand-made decode/rerank manifests on the synthetic run)


def publish(run, name: str, lists: dict[int, list[int]], num_beams: int = 10, top_k: int = 20):
    with StageWriter(run, f"decode/{name}", stage="decode", params={"split": "test", "limit": None, "num_beams": num_beams}) as out:
        out.path("beams.parquet").write_bytes(b"unused")
    rows = [(s, r, i, -float(r)) for s, items in lists.items() for r, i in enumerate(items)]
    topk = schema.conform(pl.DataFrame(rows, schema=["sample_id", "rank", "item_id", "score"], orient="row"), "topk")
    with StageWriter(run, f"rerank/{name}", stage="rerank", params={"decode": name, "top_k": top_k}) as out:
        topk.write_parquet(out.path("topk.parquet"))


@pytest.fixture
def scored_run(tmp_path, tiny_tokenizer):
    run = synthetic_run(tmp_path / "run")
    publish_ig(run, tiny_tokenizer, "tiny")
    test = schema.read(run.artifact("data", "test.parquet"), "samples").sort("sample_id")
    return run, test["sample_id"].to_list(), test["item_id"].to_list()


def test_cutoffs_beyond_the_list_length_are_dropped_with_a_note(scored_run, capsys):
    run, samples, targets = scored_run
    publish(run, "short", {s: [t, (t + 1) % 20] for s, t in zip(samples, targets)}, num_beams=2)
    metrics_stage.run(MetricsConfig(rerank="short", ks=[1, 2, 5, 10]), run)
    out = capsys.readouterr().out
    assert "dropped cut-off(s) 5, 10: lists hold at most 2 items (decode num_beams 2)" in out
    summary = json.loads((run.root / "metrics" / "short.json").read_text())
    assert summary["HR@2"] == 1.0 and "HR@5" not in summary and "NDCG@10" not in summary
    with pytest.raises(IgdrecError, match="--ks 5,10: every cut-off exceeds the 2 items"):
        metrics_stage.run(MetricsConfig(rerank="short", ks=[5, 10]), run)
    publish(run, "capped", {s: [t] for s, t in zip(samples, targets)}, num_beams=10, top_k=3)
    metrics_stage.run(MetricsConfig(rerank="capped", ks=[1, 3, 5]), run)
    assert "(rerank top_k 3)" in capsys.readouterr().out


def test_compare_seed_drives_the_bootstrap(scored_run):
    run, samples, targets = scored_run
    publish(run, "a", {s: [t] if i % 2 else [] for i, (s, t) in enumerate(zip(samples, targets))})
    publish(run, "b", {s: [t] if i % 3 else [] for i, (s, t) in enumerate(zip(samples, targets))})
    for name in ("a", "b"):
        metrics_stage.run(MetricsConfig(rerank=name, ks=[1]), run)
    first = metrics_stage.compare(["a", "b"], run, bootstrap=200, seed=1)["HR@1"]
    again = metrics_stage.compare(["a", "b"], run, bootstrap=200, seed=1)["HR@1"]
    other = metrics_stage.compare(["a", "b"], run, bootstrap=200, seed=2)["HR@1"]
    assert first == again
    assert (first["ci_low"], first["ci_high"]) != (other["ci_low"], other["ci_high"])
    assert first["diff"] == other["diff"]  # the point estimate does not depend on the resampling
    with pytest.raises(IgdrecError, match="--bootstrap 0: must be ≥ 1"):
        metrics_stage.compare(["a", "b"], run, bootstrap=0)


def test_hints_name_the_option_that_selects_the_input(scored_run):
    run, samples, targets = scored_run
    publish(run, "a", {s: [t] for s, t in zip(samples, targets)})
    metrics_stage.run(MetricsConfig(rerank="a", ks=[1]), run)
    publish(run, "b", {s: [t] for s, t in zip(samples, targets)})  # a rerank b, but no metrics b yet
    with pytest.raises(IgdrecError, match=r"run `igdrec metrics --rerank b` first"):
        metrics_stage.compare(["a", "b"], run)
    with pytest.raises(IgdrecError, match=r"run `igdrec metrics --rerank RERANK --name zz` first"):
        metrics_stage.compare(["a", "zz"], run)
    with pytest.raises(IgdrecError, match=r"run `igdrec rerank --decode DECODE --name nope` first"):
        metrics_stage.run(MetricsConfig(rerank="nope"), run)


def test_a_cached_stage_says_so_in_the_one_wording(scored_run):
    run, samples, targets = scored_run
    publish(run, "a", {s: [t] for s, t in zip(samples, targets)})
    runner = CliRunner()
    args = ["metrics", "--rerank", "a", "--ks", "1", "--run-dir", str(run.root)]
    assert "cached" not in runner.invoke(app, args).output
    again = runner.invoke(app, args)
    assert again.exit_code == 0
    assert f"metrics/a: cached in {run.root / 'metrics' / 'a'} (same parameters and inputs; --force reruns it)" in " ".join(again.output.split())


def test_help_of_every_command_is_readable():
    runner = CliRunner()
    for command in ["--help", "sft --help", "decode --help", "preprocess --help", "metrics --help", "run --help"]:
        result = runner.invoke(app, command.split())
        assert result.exit_code == 0, result.output
    sft_help = runner.invoke(app, ["sft", "--help"]).output
    for needle in ("--weight-decay", "--lora", "--full", "plain|pos|cft|igd", "With --weighting cft", "Run settings", "--run-dir"):
        assert needle in sft_help, needle
    assert "--compare" in runner.invoke(app, ["metrics", "--help"]).output


def test_a_hand_written_command_can_reuse_a_field_and_its_checks():
    import typer

    seen = []
    hand_app = typer.Typer()

    @hand_app.command()
    def recommend(alpha: cli.field_option(cfg.DecodeConfig, "alpha") = None, jump_forward: cli.field_option(cfg.DecodeConfig, "jump_forward") = None):
        try:
            seen.append(options.apply_cli(cfg.DecodeConfig(), {"alpha": alpha, "jump_forward": jump_forward}, "decode"))
        except IgdrecError as exc:
            cli._fail(exc)

    runner = CliRunner()
    assert runner.invoke(hand_app, ["--alpha", "0.3", "--no-jump-forward"]).exit_code == 0
    assert (seen[0].alpha, seen[0].jump_forward) == (0.3, False)
    one_line_error(runner.invoke(hand_app, ["--alpha", "3"]), "--alpha 3: must lie in [0, 1]")
    assert "IGD decoding" in runner.invoke(hand_app, ["--help"], env={"COLUMNS": "200"}).output
