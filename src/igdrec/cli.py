"""The `igdrec` command line. Each command only parses options and calls its stage's `run`.

The stage commands are derived from the stage configs (`config.py`): every field declared there with
`option()` becomes an option of its stage's command (`stage_command`), so a field or a stage is added in
one place. A stage is registered by naming its config class in `config.STAGE_CONFIGS`; its module
`igdrec.stages.<name>` is run by `igdrec.runner`. Commands that are not stages (`run`, `prompt`, `ig show`, ...) are written by hand
below the derived ones, as ordinary Typer commands.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.text import Text

from igdrec import config as cfg
from igdrec import options, runner
from igdrec.console import err_console, shown
from igdrec.errors import IgdrecError
from igdrec.rundir import RunDir
from igdrec.runner import STAGE_MODULES

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

COMMON_PANEL = "Run directory and config"
RUN_SETTINGS_PANEL = "Run settings (not part of the cache key)"
RunDirOpt = Annotated[
    Optional[Path],
    typer.Option("--run-dir", envvar="IGDREC_RUN_DIR", help="Run directory (default: runs/default).", rich_help_panel=COMMON_PANEL),
]
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML config; its section for this stage is the base, flags override it.", rich_help_panel=COMMON_PANEL),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun even if the stage is cached.", rich_help_panel=COMMON_PANEL)]
# Where a value came from (click's ParameterSource names; typer may ship its own copy of click).
_TYPED = ("COMMANDLINE", "ENVIRONMENT")
_COMMON = {"run_dir": (RunDirOpt, None), "config": (ConfigOpt, None), "force": (ForceOpt, False)}


def _fail(exc: IgdrecError) -> None:
    # Messages quote titles and paths: shown escaped, so they stay one line and no bracket reads as markup.
    err_console.print(Text.assemble(("error:", "bold red"), " ", shown(exc)), soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def run_stage(stage: str, config, run_dir: Path | None, force: bool):
    return runner.run_stage(stage, config, RunDir(run_dir), force)


# ---------------------------------------------------------------------------------------------------
# Stage commands, derived from the stage configs


def _metavar(opt: options.Option) -> str:
    if opt.choices:
        return "|".join([*map(str, opt.choices), *([opt.pattern[1]] if opt.pattern else [])])
    names = {int: "INT", float: "FLOAT", str: "TEXT"}
    if opt.kind is list:
        return f"{names.get(opt.element, 'TEXT')},..."
    return names.get(opt.kind, "VALUE")


def _default_text(opt: options.Option) -> str | None:
    """The field's default as the user would type it (what `--help` shows)."""
    if opt.default is None:
        return None
    if opt.kind is list:
        return ",".join(map(str, opt.default))
    return str(opt.default)


def _panel(opt: options.Option) -> str | None:
    """Options that only act under a setting of another option get a heading of their own."""
    if opt.role == options.RUN_SETTING:
        return RUN_SETTINGS_PANEL
    if isinstance(opt.only, dict):
        conditions = []
        for other, wanted in opt.only.items():
            flag = "--" + other.replace("_", "-")
            if wanted is True:
                conditions.append(flag)
            else:
                values = wanted if isinstance(wanted, (tuple, list, set)) else (wanted,)
                conditions.append(f"{flag} {'|'.join(map(str, values))}")
        return "With " + ", ".join(conditions)
    return None


def _parameter(opt: options.Option) -> inspect.Parameter:
    """The Typer option of one config field. Only values the user typed are used (see `command`); they
    arrive as raw strings and are parsed by `options.parse`, the code that reads YAML, so both give the
    same one-line errors."""
    if opt.kind is bool:
        flags = opt.flags or f"{opt.cli_name}/--no-{opt.cli_name[2:]}"
        info = typer.Option(flags, help=opt.help, rich_help_panel=_panel(opt))
        return inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, default=opt.default, annotation=Annotated[bool, info])
    if opt.kind is list:  # comma-separated, repeatable: --report-to tensorboard --report-to wandb (joined in `command`)
        info = typer.Option(opt.cli_name, help=opt.help, metavar=_metavar(opt), rich_help_panel=_panel(opt))
        default = [_default_text(opt)] if opt.default else None  # shown by --help only, as for the other options
        return inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[Optional[list[str]], info])
    info = typer.Option(opt.cli_name, help=opt.help, metavar=_metavar(opt), show_default=opt.default is not None, rich_help_panel=_panel(opt))
    return inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, default=_default_text(opt), annotation=Annotated[Optional[str], info])


def _former_parameter(former: str, opt: options.Option) -> inspect.Parameter:
    """The hidden option that still accepts a renamed field's former name (options.py warns when it is used)."""
    info = typer.Option("--" + former.replace("_", "-"), help=f"Deprecated: {opt.cli_name}.", metavar=_metavar(opt), hidden=True)
    return inspect.Parameter(former, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[str], info])


def field_option(config_cls: type, name: str, panel: str | None = None):
    """A stage-config field as an option of a hand-written command (same name, help and metavar):

        alpha: cli.field_option(cfg.DecodeConfig, "alpha") = None

    The value arrives raw (None = not given); `options.apply_cli(cfg.DecodeConfig(), {"alpha": alpha}, "decode")` parses
    and checks it with the stage's own rules and one-line errors."""
    opt = options.option_named(config_cls, name)
    if opt.kind is bool:
        flags = opt.flags or f"{opt.cli_name}/--no-{opt.cli_name[2:]}"
        return Annotated[Optional[bool], typer.Option(flags, help=opt.help, show_default=False, rich_help_panel=panel)]
    return Annotated[Optional[str], typer.Option(opt.cli_name, help=opt.help, metavar=_metavar(opt), show_default=False, rich_help_panel=panel)]


def stage_command(
    stage: str, *, extra: tuple[inspect.Parameter, ...] = (), handler: Callable | None = None, target: typer.Typer = app
) -> None:
    """Register `igdrec STAGE` on `target`: one option per field of the stage's config, `extra`
    parameters, and --run-dir/--config/--force. The command loads the `--config` section, applies the
    options given and calls `handler(config, run_dir, force, **extra values)` (default: `run_stage`)."""
    config_cls = cfg.STAGE_CONFIGS[stage]
    opts = options.options(config_cls)
    extra_names = [p.name for p in extra]
    clash = ({o.name for o in opts} | set(options.renamed(config_cls))) & (set(_COMMON) | set(extra_names))
    if clash:
        raise TypeError(f"{config_cls.__name__}: field(s) {', '.join(sorted(clash))} clash with options of the `{stage}` command")
    common = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a) for n, (a, d) in _COMMON.items()]
    context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    former = [_former_parameter(name, o) for name, o in options.renamed(config_cls).items()]
    parameters = [context] + [_parameter(o) for o in opts] + former + list(extra) + common

    def command(ctx: typer.Context, **values: Any) -> None:
        settings = {name: values.pop(name) for name in _COMMON}
        extras = {name: values.pop(name) for name in extra_names}
        # Defaults are for --help only: an option left out keeps the --config value (or the default).
        given = {name: ",".join(value) if isinstance(value, list) else value
                 for name, value in values.items() if getattr(ctx.get_parameter_source(name), "name", None) in _TYPED}
        _invoke(stage, given, settings, handler, extras)

    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__name__ = command.__qualname__ = stage.replace("-", "_")
    command.__doc__ = options.describe(config_cls)
    target.command(stage)(command)


def _invoke(stage: str, given: dict, settings: dict, handler: Callable | None = None, extras: dict | None = None) -> None:
    try:
        stage_config = options.apply_cli(cfg.load_stage_config(stage, settings["config"]), given, stage)
        if handler is None:
            run_stage(stage, stage_config, settings["run_dir"], settings["force"])
        else:
            handler(stage_config, settings["run_dir"], settings["force"], **(extras or {}))
    except IgdrecError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print(f"[bold red]interrupted:[/] {stage} stopped; nothing half-written was published")
        raise typer.Exit(130)


def _metrics_or_compare(config, run_dir: Path | None, force: bool, *, compare: bool, names: list[str] | None) -> None:
    """`igdrec metrics` evaluates a rerank; `igdrec metrics --compare A B` compares two results."""
    if not compare and not names:
        run_stage("metrics", config, run_dir, force)
        return
    if not compare:
        raise IgdrecError(f"unexpected arguments {' '.join(names)}; to compare two results: igdrec metrics --compare A B")
    from igdrec.stages import metrics as metrics_stage

    metrics_stage.compare(names or [], RunDir(run_dir), bootstrap=config.bootstrap, seed=config.seed)


# Stage commands with parameters beyond their config's fields.
STAGE_COMMAND_EXTRAS: dict[str, dict] = {
    "metrics": {
        "extra": (
            inspect.Parameter("compare", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
                bool, typer.Option("--compare", help="Compare the two metrics results named as arguments: `igdrec metrics --compare A B`.")
            ]),
            inspect.Parameter("names", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
                Optional[list[str]], typer.Argument(help="With --compare: the two metrics names A B.", show_default=False)
            ]),
        ),
        "handler": _metrics_or_compare,
    },
}

# --help lists the main chain in pipeline order, then `baseline`, the side stage that feeds metrics and TFA.
for _stage in sorted(STAGE_MODULES, key=lambda stage: stage == "baseline"):
    stage_command(_stage, **STAGE_COMMAND_EXTRAS.get(_stage, {}))


# ---------------------------------------------------------------------------------------------------
# Hand-written commands


@app.command("run")
def run_pipeline(
    config_file: Annotated[Path, typer.Argument(help="YAML config with a section per stage and `stages` to run in order.")],
    run_dir: RunDirOpt = None,
    force: ForceOpt = False,
):
    """Run the stages a YAML config names, in order (each one cached as if run on its own)."""
    stage, number, total = None, 0, 0
    try:
        pipeline = cfg.load_pipeline(config_file)
        if not pipeline.stages:
            raise IgdrecError(f"{config_file}: no stages to run; list them in `stages: [...]`")
        directory = run_dir or (Path(pipeline.run_dir) if pipeline.run_dir else None)
        total = len(pipeline.stages)
        for number, stage in enumerate(pipeline.stages, 1):
            err_console.rule(f"[bold]{stage}[/] ({number}/{total})")
            run_stage(stage, pipeline.stage_config(stage), directory, force)
    except IgdrecError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        where = f"stage {stage} ({number} of {total}) stopped" if stage else "stopped before the first stage"
        err_console.print(
            f"[bold red]interrupted:[/] {where}; finished stages stay cached and nothing half-written was published; "
            f"`igdrec run {config_file}` again continues",
            soft_wrap=True,
        )
        raise typer.Exit(130)


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
        from igdrec import explain

        explain.show_prompt(RunDir(run_dir), split=split, sample_id=sample_id, as_ids=ids, model=model)
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
        from igdrec import explain

        explain.show_item_ig(RunDir(run_dir), item_id=item_id, title=title)
    except IgdrecError as exc:
        _fail(exc)


@app.command()
def recommend(
    sft: Annotated[Optional[str], typer.Option(help="Name of a fine-tune in this run directory (default: the only one).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Recommend with an un-fine-tuned model instead of --sft.")] = None,
    history: Annotated[Optional[list[str]], typer.Option("--history", help="A catalog title the user interacted with; repeat it, oldest first.")] = None,
    history_ids: Annotated[Optional[str], typer.Option(help="Or the history as comma-separated item ids, oldest first, e.g. 12,7,301.")] = None,
    top_k: Annotated[int, typer.Option(help="Items to recommend.")] = 10,
    alpha: field_option(cfg.DecodeConfig, "alpha") = None,
    length_penalty: field_option(cfg.DecodeConfig, "length_penalty") = None,
    exclude_history: Annotated[bool, typer.Option(
        "--exclude-history/--no-exclude-history",
        help="Leave out items of the history: the search never enters a title the user has seen, so its top-k "
        "beams (as `decode --num-beams K`) all go to unseen items, however long the history.")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print the list as JSON instead of a table.")] = False,
    device: field_option(cfg.DecodeConfig, "device") = None,
    run_dir: RunDirOpt = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config; its decode section gives the defaults (alpha, length penalty, cutoff).")] = None,
):
    """Recommend the next items for one user's history with a fine-tuned model of the run."""
    import json

    from rich.table import Table

    from igdrec.console import console

    try:
        if history and history_ids:
            raise IgdrecError("give the history as --history TITLE ... or as --history-ids, not both")
        entries: list = list(history or [])
        if history_ids:
            try:
                entries = [int(x) for x in history_ids.split(",") if x.strip()]
            except ValueError as exc:
                raise IgdrecError(f"--history-ids {history_ids!r}: expected comma-separated integers") from exc
        if not entries:
            raise IgdrecError("empty history: give at least one --history TITLE (or --history-ids 12,7,301)")
        if top_k < 1:
            raise IgdrecError(f"--top-k {top_k}: must be at least 1")
        from igdrec.api import Recommender

        settings = options.apply_cli(cfg.load_stage_config("decode", config),
                                     {"alpha": alpha, "length_penalty": length_penalty, "device": device}, "recommend")
        recommender = Recommender.load(run_dir, sft=sft, model=model, config=settings)
        prepared = recommender.prepare(entries)
        if prepared.dropped:
            err_console.print(
                f"[yellow]note:[/] the history has {len(prepared.item_ids)} items; the prompt holds the most recent "
                f"{prepared.kept}, as in training (older ones are still excluded from the list)", soft_wrap=True)
        found = recommender.recommend(prepared, k=top_k, exclude_history=exclude_history)
    except IgdrecError as exc:
        _fail(exc)
    if json_output:
        rows = [{"rank": r + 1, "item_id": x.item_id, "title": x.title, "score": x.score} for r, x in enumerate(found)]
        sys.stdout.write(json.dumps(rows, ensure_ascii=False) + "\n")
        return
    decoding = recommender.decoder.config
    table = Table(title=shown(f"{recommender.decoder.source.label}: next items after {len(prepared.item_ids)} "
                              f"(alpha {decoding.alpha:g}, length penalty {decoding.length_penalty:g})"))
    table.add_column("rank", justify="right")
    table.add_column("title")
    table.add_column("item id", justify="right")
    table.add_column("score", justify="right")
    for rank, item in enumerate(found, start=1):
        table.add_row(str(rank), shown(item.title), str(item.item_id), f"{item.score:.4f}")
    console.print(table)
    if len(found) < top_k:
        err_console.print(f"[yellow]note:[/] only {len(found)} items left after leaving out the history")


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
        from igdrec.experiments import dryrun, grid_config, plan as planning, run

        plan = planning.plan_grid(grid_config.load_grid(config_file, run_root=run_root), only=only)
        if dry_run:
            dryrun.print_dry_run(plan)
            return
        run.run_grid(plan, force=force, report=report)
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
        from igdrec.experiments import plan as planning, report as report_module

        report_module.write_reports(planning.run_root_plan(run_root, config=config))
    except IgdrecError as exc:
        _fail(exc)


@app.command("ls")
def ls_command(
    run_dir: Annotated[Optional[Path], typer.Argument(
        help="A run directory, or a grid's run root (lists each dataset's run); default: $IGDREC_RUN_DIR or runs/default.",
        metavar="RUN_DIR", show_default=False)] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the rows as JSON instead of a table.")] = False,
):
    """List every artifact of a run: stage, name, parameters that differ from the defaults, status (done, stale,
    partial, broken), wall time and the headline metrics."""
    from igdrec import listing
    from igdrec.rundir import resolve_run_dir

    root = resolve_run_dir(run_dir)
    try:
        rows = listing.list_runs(root)
    except IgdrecError as exc:
        _fail(exc)
    if json_output:
        sys.stdout.write(listing.to_json(root, rows) + "\n")
    else:
        listing.print_listing(root, rows)


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="igdrec")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
