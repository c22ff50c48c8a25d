"""The `igdrec` command line. Each command only parses options and calls its stage's `run`."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from igdrec import config as cfg
from igdrec.console import err_console
from igdrec.errors import IgdrecError
from igdrec.rundir import RunDir

app = typer.Typer(
    name="igdrec",
    help="LLM sequential recommendation with Information-Gain Debiasing (IGD). "
    "Stages, in order: preprocess, build-ig-index, sft, decode, rerank, metrics.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
ig_app = typer.Typer(help="Inspect the information-gain index.", no_args_is_help=True)
app.add_typer(ig_app, name="ig")

STAGE_MODULES = {
    "preprocess": "igdrec.stages.preprocess",
    "build-ig-index": "igdrec.stages.build_ig_index",
    "sft": "igdrec.stages.sft",
    "decode": "igdrec.stages.decode",
    "rerank": "igdrec.stages.rerank",
    "metrics": "igdrec.stages.metrics",
}

RunDirOpt = Annotated[
    Optional[Path], typer.Option("--run-dir", envvar="IGDREC_RUN_DIR", help="Run directory (default: runs/default).")
]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config; its section for this stage is the base, flags override it.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun even if the stage is cached.")]
_COMMON = ("run_dir", "config", "force")


def _default(stage: str, name: str) -> str:
    value = getattr(cfg.STAGE_CONFIGS[stage](), name)
    return f" (default: {value})"


def _fail(exc: IgdrecError) -> None:
    err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def run_stage(stage: str, config, run_dir: Path | None, force: bool):
    module = importlib.import_module(STAGE_MODULES[stage])
    return module.run(config, RunDir(run_dir), force=force)


def _invoke(stage: str, options: dict) -> None:
    common = {k: options.pop(k) for k in _COMMON}
    try:
        stage_config = cfg.override(cfg.load_stage_config(stage, common["config"]), **options)
        run_stage(stage, stage_config, common["run_dir"], common["force"])
    except IgdrecError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print(f"[bold red]interrupted:[/] {stage} stopped; nothing half-written was published")
        raise typer.Exit(130)


@app.command()
def preprocess(
    source: Annotated[Optional[str], typer.Option(help="ml-100k | amazon2018 | d3-csv | interactions" + _default("preprocess", "source"))] = None,
    reviews: Annotated[Optional[str], typer.Option(help="amazon2018: reviews JSON lines ({Category}.json[.gz]).")] = None,
    meta: Annotated[Optional[str], typer.Option(help="amazon2018: metadata JSON lines (meta_{Category}.json[.gz]).")] = None,
    category: Annotated[Optional[str], typer.Option(help="amazon2018: category name, e.g. Video_Games.")] = None,
    start: Annotated[Optional[str], typer.Option(help="amazon2018: window start date" + _default("preprocess", "start"))] = None,
    end: Annotated[Optional[str], typer.Option(help="amazon2018: window end date" + _default("preprocess", "end"))] = None,
    k_core: Annotated[Optional[int], typer.Option(help="amazon2018: iterative K-core" + _default("preprocess", "k_core"))] = None,
    min_items: Annotated[Optional[int], typer.Option(help="amazon2018: extend the window a year back while fewer items remain" + _default("preprocess", "min_items"))] = None,
    seed: Annotated[Optional[int], typer.Option(help="amazon2018: item-id shuffle seed" + _default("preprocess", "seed"))] = None,
    train: Annotated[Optional[str], typer.Option(help="d3-csv: train CSV.")] = None,
    valid: Annotated[Optional[str], typer.Option(help="d3-csv: valid CSV.")] = None,
    test: Annotated[Optional[str], typer.Option(help="d3-csv: test CSV.")] = None,
    info: Annotated[Optional[str], typer.Option(help="d3-csv: info file (title<TAB>id per line).")] = None,
    interactions: Annotated[Optional[str], typer.Option(help="interactions: CSV or Parquet of user, item, timestamp.")] = None,
    items: Annotated[Optional[str], typer.Option(help="interactions: CSV or Parquet of item, title.")] = None,
    user_col: Annotated[Optional[str], typer.Option(help="interactions: user column" + _default("preprocess", "user_col"))] = None,
    item_col: Annotated[Optional[str], typer.Option(help="interactions: item column" + _default("preprocess", "item_col"))] = None,
    time_col: Annotated[Optional[str], typer.Option(help="interactions: timestamp column" + _default("preprocess", "time_col"))] = None,
    title_col: Annotated[Optional[str], typer.Option(help="interactions: title column" + _default("preprocess", "title_col"))] = None,
    drop_unknown: Annotated[Optional[bool], typer.Option("--drop-unknown", help="Drop interactions whose item has no title (default: error).")] = None,
    history_len: Annotated[Optional[int], typer.Option(help="Most recent items in a history" + _default("preprocess", "history_len"))] = None,
    category_word: Annotated[Optional[str], typer.Option(help="Word for the items in the prompt (default per dataset, e.g. movies).")] = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
):
    """Turn a dataset into items.parquet and temporally split train/valid/test windows (<run>/data)."""
    _invoke("preprocess", dict(locals()))


@app.command("build-ig-index")
def build_ig_index(
    model: Annotated[Optional[str], typer.Option(help="Model whose tokenizer defines the item tokens" + _default("build-ig-index", "model"))] = None,
    reference: Annotated[Optional[str], typer.Option(help="Reference distribution: train (target frequencies) | uniform" + _default("build-ig-index", "reference"))] = None,
    smoothing: Annotated[Optional[float], typer.Option(help="Additive smoothing of reference counts" + _default("build-ig-index", "smoothing"))] = None,
    catalog: Annotated[Optional[str], typer.Option(help="Catalog: all items | train (items seen as training targets)" + _default("build-ig-index", "catalog"))] = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
):
    """Build the catalog trie with entropy and information gain per token (<run>/ig)."""
    _invoke("build-ig-index", dict(locals()))


@app.command()
def sft(
    weighting: Annotated[Optional[str], typer.Option(help="plain | pos | cft | igd" + _default("sft", "weighting"))] = None,
    beta: Annotated[Optional[float], typer.Option(help="IGD: weight of zero-IG tokens; Pos/CFT: weight of the last token" + _default("sft", "beta"))] = None,
    alpha: Annotated[Optional[float], typer.Option(help="CFT: weight of the causal loss" + _default("sft", "alpha"))] = None,
    model: Annotated[Optional[str], typer.Option(help="smollm2-135m, a Hugging Face id or a local directory" + _default("sft", "model"))] = None,
    name: Annotated[Optional[str], typer.Option(help="Name of this fine-tune (default from weighting and parameters).")] = None,
    sample: Annotated[Optional[int], typer.Option(help="Train on a seeded random subset of N training samples.")] = None,
    valid_sample: Annotated[Optional[int], typer.Option(help="Validate on a seeded subset of N valid samples" + _default("sft", "valid_sample"))] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs" + _default("sft", "epochs"))] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after N optimiser steps.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate" + _default("sft", "lr"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Effective batch size (samples per step)" + _default("sft", "batch_size"))] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option(help="Samples per forward pass" + _default("sft", "micro_batch_size"))] = None,
    cutoff_len: Annotated[Optional[int], typer.Option(help="Max tokens of prompt + target" + _default("sft", "cutoff_len"))] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear warm-up steps, at most a tenth of the run" + _default("sft", "warmup_steps"))] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed" + _default("sft", "seed"))] = None,
    lora: Annotated[Optional[bool], typer.Option("--lora/--full", help="LoRA adapters (default) or full fine-tuning.")] = None,
    lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank" + _default("sft", "lora_r"))] = None,
    lora_alpha: Annotated[Optional[int], typer.Option(help="LoRA alpha" + _default("sft", "lora_alpha"))] = None,
    lora_dropout: Annotated[Optional[float], typer.Option(help="LoRA dropout" + _default("sft", "lora_dropout"))] = None,
    lora_target_modules: Annotated[Optional[str], typer.Option(help="Comma-separated LoRA target modules (default: all linear layers).")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Steps between resumable checkpoints" + _default("sft", "save_every"))] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue from the last checkpoint of an interrupted run.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda" + _default("sft", "device"))] = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
):
    """Fine-tune the LLM on next-item titles with plain, Pos, CFT or IGD token weights (<run>/sft/NAME)."""
    options = dict(locals())
    if options["lora_target_modules"] is not None:
        options["lora_target_modules"] = [m.strip() for m in options["lora_target_modules"].split(",") if m.strip()]
    _invoke("sft", options)


@app.command()
def decode(
    sft: Annotated[Optional[str], typer.Option(help="Name of a fine-tune in this run directory.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Decode with an un-fine-tuned model instead of --sft.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Name of this decode (default from the model and parameters).")] = None,
    split: Annotated[Optional[str], typer.Option(help="test | valid" + _default("decode", "split"))] = None,
    limit: Annotated[Optional[int], typer.Option(help="Decode only the first N samples in sample_id order.")] = None,
    num_beams: Annotated[Optional[int], typer.Option(help="Beams = items returned" + _default("decode", "num_beams"))] = None,
    length_penalty: Annotated[Optional[float], typer.Option(help="1.0 = BIGRec, 0.0 = D3" + _default("decode", "length_penalty"))] = None,
    alpha: Annotated[Optional[float], typer.Option(help="IGD decoding calibration w_d = 1 - alpha*IG~ (0 = off)" + _default("decode", "alpha"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Samples per batch" + _default("decode", "batch_size"))] = None,
    shard_size: Annotated[Optional[int], typer.Option(help="Samples per resumable shard" + _default("decode", "shard_size"))] = None,
    jump_forward: Annotated[Optional[bool], typer.Option("--jump-forward/--no-jump-forward", help="Feed forced token chains in one forward pass (same results).")] = None,
    constrained: Annotated[Optional[bool], typer.Option("--constrained/--unconstrained", help="Constrain beams to catalog titles (default) or generate freely (then rerank --grounding).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Unconstrained: most tokens generated (default: longest catalog title).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda" + _default("decode", "device"))] = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
):
    """Constrained, IG-calibrated beam search over the catalog (<run>/decode/NAME)."""
    _invoke("decode", dict(locals()))


@app.command()
def rerank(
    decode: Annotated[Optional[str], typer.Option(help="Name of a decode in this run directory.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Name of this rerank (default: the decode's name + options).")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Items kept per sample" + _default("rerank", "top_k"))] = None,
    tfa_scores: Annotated[Optional[str], typer.Option(help="D3 text-free assistant: Parquet of sample_id, item_id, score from a traditional model.")] = None,
    tfa_guidance: Annotated[Optional[float], typer.Option(help="D3 guidance g in g*(llm - tfa) + tfa" + _default("rerank", "tfa_guidance"))] = None,
    grounding: Annotated[Optional[bool], typer.Option("--grounding", help="BIGRec L2 grounding for unconstrained generations.")] = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
):
    """Turn beams into the final deduplicated top-K per sample (<run>/rerank/NAME)."""
    _invoke("rerank", dict(locals()))


@app.command()
def metrics(
    rerank: Annotated[Optional[str], typer.Option(help="Name of a rerank in this run directory.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Name of the metrics file (default: the rerank's name).")] = None,
    ks: Annotated[Optional[str], typer.Option(help="Comma-separated cut-offs" + _default("metrics", "ks"))] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Compare the two metrics results named as arguments: `igdrec metrics --compare A B`.")] = False,
    names: Annotated[Optional[list[str]], typer.Argument(help="With --compare: the two metrics names A B.", show_default=False)] = None,
    bootstrap: Annotated[Optional[int], typer.Option(help="Paired bootstrap resamples for --compare" + _default("metrics", "bootstrap"))] = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
):
    """NDCG@K, HR@K, diversity and per-step entropy of a rerank (<run>/metrics/NAME.json)."""
    options = dict(locals())
    if options["ks"] is not None:
        options["ks"] = [int(k) for k in options["ks"].split(",")]
    comparing, names = options.pop("compare"), options.pop("names")
    if comparing or names:
        try:
            from igdrec.stages import metrics as metrics_stage

            if not comparing:
                raise IgdrecError(f"unexpected arguments {' '.join(names)}; to compare two results: igdrec metrics --compare A B")
            metrics_stage.compare(names or [], RunDir(run_dir), bootstrap=bootstrap)
        except IgdrecError as exc:
            _fail(exc)
        return
    _invoke("metrics", options)


@app.command("run")
def run_pipeline(
    config_file: Annotated[Path, typer.Argument(help="YAML config with a section per stage and `stages` to run in order.")],
    run_dir: RunDirOpt = None,
    force: ForceOpt = False,
):
    """Run the stages a YAML config names, in order (each one cached as if run on its own)."""
    try:
        pipeline = cfg.load_pipeline(config_file)
        directory = run_dir or (Path(pipeline.run_dir) if pipeline.run_dir else None)
        for stage in pipeline.stages:
            err_console.rule(f"[bold]{stage}")
            run_stage(stage, pipeline.stage_config(stage), directory, force)
    except IgdrecError as exc:
        _fail(exc)


@app.command()
def prompt(
    split: Annotated[str, typer.Option(help="train | valid | test")] = "test",
    sample_id: Annotated[int, typer.Option(help="sample_id of the sample to show.")] = 0,
    ids: Annotated[bool, typer.Option("--ids", help="Print the token ids as one JSON list instead of the text.")] = False,
    model: Annotated[Optional[str], typer.Option(help="Model whose tokenizer encodes the prompt (default: the IG index's).")] = None,
    run_dir: RunDirOpt = None,
):
    """Print the exact prompt the model sees for a sample (the contract between SFT and decode)."""
    try:
        from igdrec import inspect

        inspect.show_prompt(RunDir(run_dir), split=split, sample_id=sample_id, as_ids=ids, model=model)
    except IgdrecError as exc:
        _fail(exc)


@ig_app.command("show")
def ig_show(
    item_id: Annotated[Optional[int], typer.Option(help="Item id to show.")] = None,
    title: Annotated[Optional[str], typer.Option(help="Or the item's title.")] = None,
    run_dir: RunDirOpt = None,
):
    """Show an item's token path with each token's IG, normalised IG and prefix entropy."""
    try:
        from igdrec import inspect

        inspect.show_item_ig(RunDir(run_dir), item_id=item_id, title=title)
    except IgdrecError as exc:
        _fail(exc)


@app.command("grid")
def grid_command(
    config_file: Annotated[Path, typer.Argument(help="Grid YAML (configs/grid/<scale>.yaml): datasets, shared stage settings, variants, selection.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, each step's cache state and the cost estimate; run nothing.")] = False,
    only: Annotated[Optional[str], typer.Option("--only", help="Run one row only (e.g. d3+igd); its upstream steps run as needed.")] = None,
    run_root: Annotated[Optional[Path], typer.Option("--run-root", help="Where the run directories and reports go (default: the config's run_root).")] = None,
    force: ForceOpt = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write the tables and figures when the grid is done.")] = True,
):
    """Run the paper's grid (Tables 1–4, figures): every cell a cached stage chain; resumable after a kill."""
    try:
        from igdrec import grid

        plan = grid.plan_grid(grid.load_grid(config_file, run_root=run_root), only=only)
        if dry_run:
            grid.print_dry_run(plan)
            return
        grid.run_grid(plan, force=force, report=report)
    except IgdrecError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted:[/] the grid stopped; finished cells are cached, rerun the same command to go on")
        raise typer.Exit(130)


@app.command("report")
def report_command(
    run_root: Annotated[Path, typer.Argument(help="A grid's run root (holds grid-config.yaml).")],
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Grid YAML to use instead of the run root's copy.")] = None,
):
    """Re-render a grid's tables, figures and README from its artifacts (recomputes nothing)."""
    try:
        from igdrec import report as report_module

        report_module.write_reports(run_root, config=config)
    except IgdrecError as exc:
        _fail(exc)


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="igdrec")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
