"""Stage configs, each option written once: YAML loading, the derived CLI options, cache-key roles, checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from igdrec import cli, options
from igdrec import config as cfg
from igdrec.cli import app
from igdrec.errors import IgdrecError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    path = tmp_path / "igdrec.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def captured(monkeypatch):
    """Stage configs that the CLI would run, without running anything."""
    seen = []
    monkeypatch.setattr(cli, "run_stage", lambda stage, config, run_dir, force: seen.append((stage, config)))
    return seen


# --------------------------------------------------------------------------------------------------
# YAML


def test_yaml_sections_are_typed(tmp_path):
    path = write(tmp_path, "run_dir: runs/x\nstages: [preprocess, sft]\npreprocess:\n  history_len: '5'\n  drop_unknown: yes\nsft:\n  beta: 0.2\n  lora_target_modules: q_proj, v_proj\n")
    pipeline = cfg.load_pipeline(path)
    assert pipeline.run_dir == "runs/x" and pipeline.stages == ["preprocess", "sft"]
    pre = pipeline.stage_config("preprocess")
    assert (pre.history_len, pre.drop_unknown, pre.source) == (5, True, "ml-100k")
    assert pipeline.stage_config("sft").lora_target_modules == ["q_proj", "v_proj"]
    assert pipeline.stage_config("decode") == cfg.DecodeConfig()


def test_stages_default_to_the_sections_given_in_pipeline_order(tmp_path):
    assert cfg.load_pipeline(write(tmp_path, "metrics:\n  ks: [1]\nsft:\n  epochs: 1\n")).stages == ["sft", "metrics"]
    assert cfg.load_pipeline(write(tmp_path, "stages: preprocess\n")).stages == ["preprocess"]
    assert cfg.load_pipeline(write(tmp_path, "stages: preprocess, build_ig_index\n")).stages == ["preprocess", "build-ig-index"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("preprocess:\n  histroy_len: 5\n", "unknown key 'histroy_len' (did you mean 'history_len'?)"),
        ("preprocess:\n  colour: red\n", "unknown key 'colour'; known: source, history_len"),
        ("preprocesss:\n  history_len: 5\n", "unknown section 'preprocesss' (did you mean 'preprocess'?)"),
        ("preprocess:\n  history_len: ten\n", "preprocess.history_len: expected an integer, got 'ten'"),
        ("stages: [preprocess, train]\n", "unknown stage 'train'"),
        ("stages: [preprocess, metric]\n", "unknown stage 'metric' in `stages` (did you mean 'metrics'?)"),
        ("stages: [sft, sft]\n", "sft listed more than once"),
        ("stages: {a: 1}\n", "stages: expected a list of stage names"),
        ("preprocess: [1\n", "is not valid YAML"),
        ("", "empty config"),
        ("# nothing but a comment\n", "empty config"),
        ("- sft\n", "top level must be a mapping"),
        ("sft: 5\n", "sft: expected a mapping of sft options"),
        ("sft: [beta]\n", "sft: expected a mapping of sft options"),
        ("sft:\n  weighting: idg\n", "sft.weighting 'idg': expected one of plain, pos, cft, igd, msl, msl-igd (did you mean 'igd'?)"),
        ("sft:\n  max_steps: 0\n", "sft.max_steps 0: must be ≥ 1"),
        ("sft:\n  lr: -1\n", "sft.lr -1: must be > 0"),
        ("sft:\n  cft_alpha: 0.1\n", "--cft-alpha 0.1: only the cft weighting"),
        ("sft:\n  lora: maybe\n", "sft.lora: expected true or false"),
        ("decode:\n  alpha: 2\n", "decode.alpha 2: must lie in [0, 1]"),
        ("metrics:\n  ks: [1, a]\n", "metrics.ks: expected an integer, got 'a'"),
        ("metrics:\n  ks: []\n", "metrics.ks: expected at least one value"),
        ("metrics:\n  ks: [0, 5]\n", "metrics.ks 0: must be ≥ 1"),
        ("build-ig-index:\n  smoothing: .nan\n", "smoothing nan: must be a finite number"),
        ("run_dir: [a]\n", "run_dir: expected a path"),
    ],
)
def test_bad_configs_name_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(IgdrecError) as info:
        cfg.load_pipeline(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_a_directory_or_a_missing_file_as_config(tmp_path):
    with pytest.raises(IgdrecError, match="is a directory"):
        cfg.load_pipeline(tmp_path)
    with pytest.raises(IgdrecError, match="config file not found"):
        cfg.load_pipeline(tmp_path / "nope.yaml")


def test_every_config_in_the_repository_loads():
    from igdrec.experiments import grid_config, plan as planning

    files = sorted((REPO / "configs").rglob("*.y*ml"))
    assert files, "no configs found"
    grids = [p for p in files if p.parent.name == "grid"]
    assert {p.stem for p in grids} >= {"smoke", "mini", "gpu", "paper"}
    for path in grids:  # grid configs: every cell's stage config is built (and checked) by the plan
        plan = planning.plan_grid(grid_config.load_grid(path, run_root=REPO / "runs" / "never-written"))
        assert plan.rows, path
    for path in (p for p in files if p not in grids):
        pipeline = cfg.load_pipeline(path)
        assert pipeline.stages, path
        for stage in pipeline.stages:
            options.check(pipeline.stage_config(stage))


def test_cli_flag_overrides_yaml(tmp_path, captured):
    path = write(tmp_path, "preprocess:\n  history_len: 5\n  seed: 7\n")
    result = CliRunner().invoke(app, ["preprocess", "--config", str(path), "--history-len", "3"])
    assert result.exit_code == 0, result.output
    assert (captured[0][1].history_len, captured[0][1].seed) == (3, 7)
    # an option left out keeps the YAML value even where the YAML value differs from the default
    result = CliRunner().invoke(app, ["sft", "--config", str(write(tmp_path, "sft:\n  lora: false\n  max_steps: 4\n")), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert (captured[1][1].lora, captured[1][1].max_steps, captured[1][1].seed) == (False, 4, 1)
    # "none" unsets an optional value the YAML set
    result = CliRunner().invoke(app, ["sft", "--config", str(tmp_path / "igdrec.yaml"), "--max-steps", "none"])
    assert result.exit_code == 0 and captured[2][1].max_steps is None


def test_cli_reports_unknown_yaml_key_on_one_line(tmp_path):
    path = write(tmp_path, "preprocess:\n  colour: red\n")
    result = CliRunner().invoke(app, ["preprocess", "--config", str(path)])
    assert result.exit_code != 0 and str(path) in result.output and len(result.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# Every field of every stage config: settable from the CLI and from YAML, with a cache-key role


def other_value(opt: options.Option, cls: type | None = None):
    """A valid value of the field that differs from its default (with `cls`: one its config's rules accept too)."""
    if opt.kind is list:
        if opt.choices:
            return [next(c for c in opt.choices if [c] != opt.default)]
        return [2, 3] if opt.element is int else ["alpha_proj", "beta_proj"]
    if opt.choices:
        return next(c for c in opt.choices if c != opt.default)
    if opt.kind is bool:
        return not opt.default
    if opt.kind is str:
        candidates = ["some-value", "2"]  # "2": a text option that takes a count too (decode --batch-size)
    else:
        base = opt.default if opt.default is not None else (opt.min if opt.min is not None else 1)
        low = opt.min if opt.min is not None else opt.gt
        candidates = [base + 1, base + 0.5, base / 2, (low or 0) + 0.25]
    for value in candidates:
        value = value if opt.kind is str else int(value) if opt.kind is int else float(value)
        try:
            options.check_value(opt, value, opt.cli_name)
            if cls is not None:
                options.check(dataclasses.replace(config_where_it_applies(cls, opt), **{opt.name: value}))
        except IgdrecError:
            continue
        if value != opt.default:
            return value
    raise AssertionError(f"no valid non-default value for {opt.name}")


def cli_args(opt: options.Option, value) -> list[str]:
    if opt.kind is bool:
        on, off = (opt.flags or f"{opt.cli_name}/--no-{opt.cli_name[2:]}").split("/")
        return [on if value else off]
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return [opt.cli_name, text]


def config_where_it_applies(cls, opt: options.Option):
    """A config of `cls` for which `opt` has an effect (its `only` condition holds)."""
    config = cls()
    if isinstance(opt.only, dict):
        config = dataclasses.replace(config, **{k: v[0] if isinstance(v, tuple) else v for k, v in opt.only.items()})
    if not opt.applies(config):  # a callable condition: try setting one field (the option itself: a flag keyed only when on)
        for other in options.options(cls):
            candidate = dataclasses.replace(config, **{other.name: other_value(other)})
            if opt.applies(candidate):
                return candidate
        # an option keyed only off its own default (metrics --head-share: results cached before it existed)
        config = dataclasses.replace(config, **{opt.name: other_value(opt)})
    assert opt.applies(config), opt.name
    return config


def test_stages_commands_and_configs_are_registered_together():
    assert set(cfg.STAGE_CONFIGS) == set(cli.STAGE_MODULES)
    commands = {c.name for c in app.registered_commands}
    assert set(cfg.STAGE_CONFIGS) <= commands
    assert cfg.STAGE_ORDER == tuple(cfg.STAGE_CONFIGS)


@pytest.mark.parametrize("stage", list(cfg.STAGE_CONFIGS))
def test_every_field_is_settable_from_cli_and_yaml_and_has_a_key_role(stage, tmp_path, captured):
    cls = cfg.STAGE_CONFIGS[stage]
    runner = CliRunner()
    for opt in options.options(cls):
        assert opt.declared, f"{cls.__name__}.{opt.name}: declare it with option(default, help, key=...)"
        assert opt.role in (options.KEY, options.RUN_SETTING, options.INPUT_FILE)
        value = other_value(opt, cls)

        # the settings under which the option acts (e.g. --weighting cft for --cft-alpha)
        conditions = {k: v[0] if isinstance(v, tuple) else v for k, v in opt.only.items()} if isinstance(opt.only, dict) else {}
        by_name = {o.name: o for o in options.options(cls)}
        condition_args = [arg for k, v in conditions.items() for arg in cli_args(by_name[k], v)]

        # command line
        captured.clear()
        result = runner.invoke(app, [stage, *condition_args, *cli_args(opt, value), "--run-dir", str(tmp_path)])
        assert result.exit_code == 0, f"{stage} {opt.cli_name}: {result.output}"
        assert getattr(captured[0][1], opt.name) == value, opt.name
        # YAML
        path = write(tmp_path, yaml.safe_dump({stage: {**conditions, opt.name: value}}))
        assert getattr(cfg.load_pipeline(path).stage_config(stage), opt.name) == value, opt.name
        # cache key: a key field changes the key wherever it has an effect; anything else never does
        base = config_where_it_applies(cls, opt)
        changed = dataclasses.replace(base, **{opt.name: value if value != getattr(base, opt.name) else opt.default})
        if opt.role == options.KEY:
            assert options.key_params(base)[opt.in_key_as] != options.key_params(changed).get(opt.in_key_as), f"{stage}.{opt.name}"
        else:  # a run setting or an input file (keyed by its content fingerprint) never is a key parameter
            assert opt.in_key_as not in options.key_params(base) and opt.in_key_as not in options.key_params(changed), f"{stage}.{opt.name}"


NUMERIC = [(stage, opt) for stage, cls in cfg.STAGE_CONFIGS.items() for opt in options.options(cls)
           if opt.kind in (int, float) or (opt.kind is list and opt.element in (int, float))]


def out_of_range(opt: options.Option) -> list:
    """The nearest values beyond each declared bound."""
    kind = opt.element if opt.kind is list else opt.kind
    step = 1 if kind is int else 0.5
    values = [opt.min - step if opt.min is not None else opt.gt, opt.max + step if opt.max is not None else opt.lt]
    return [kind(v) for v in values if v is not None]


@pytest.mark.parametrize("stage, opt", NUMERIC, ids=[f"{stage}.{opt.name}" for stage, opt in NUMERIC])
def test_every_number_declares_its_bounds_and_the_cli_refuses_values_beyond_them(stage, opt, captured):
    assert opt.min is not None or opt.gt is not None, f"{stage} {opt.cli_name}: declare a lower bound (min= or gt=)"
    assert opt.max is None or opt.lt is None, opt.name
    for value in out_of_range(opt):
        text = f"{value:g}" if isinstance(value, float) else str(value)
        result = CliRunner().invoke(app, [stage, opt.cli_name, text])
        assert result.exit_code != 0 and not captured, f"{stage} {opt.cli_name} {text}: {result.output}"
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and f"{opt.cli_name} {text}: must " in lines[0], result.output


@pytest.mark.parametrize("args, message", [
    (["sft", "--lora-dropout", "1"], "--lora-dropout 1: must lie in [0, 1)"),
    (["sft", "--seed", "-1"], "--seed -1: must lie in [0, 4294967295]"),
    (["metrics", "--compare", "a", "b", "--seed", "-1"], "--seed -1: must lie in [0, 4294967295]"),
    (["baseline", "--seed", "4294967296"], "--seed 4294967296: must lie in [0, 4294967295]"),
    (["decode", "--length-penalty", "1000"], "--length-penalty 1000: must lie in [0, 10]"),
    (["decode", "--device", "tpu"], "--device 'tpu': expected one of auto, cpu, cuda, mps or cuda:N (did you mean 'cpu'?)"),
    (["sft", "--device", "CUDA"], "--device 'CUDA': expected one of auto, cpu, cuda, mps or cuda:N (did you mean 'cuda'?)"),
    (["rerank", "--device", "cuda:x"], "--device 'cuda:x': expected one of auto, cpu, cuda, mps or cuda:N (did you mean 'cuda'?)"),
    (["sft", "--lr-schedule", "linaer"], "--lr-schedule 'linaer': expected one of cosine, linear (did you mean 'linear'?)"),
])
def test_bad_option_values_are_refused_on_one_line(args, message, captured):
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and not captured, result.output
    assert result.output.strip().splitlines() == [f"error: {message}"]


def test_device_strings_that_name_a_device_are_accepted(captured):
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"):
        result = CliRunner().invoke(app, ["decode", "--device", device])
        assert result.exit_code == 0 and captured[-1][1].device == device, result.output


def test_a_device_this_machine_lacks_is_refused_on_one_line(monkeypatch):
    import torch

    from igdrec.modeling import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(IgdrecError, match=r"^--device cuda:1: CUDA is not available on this machine$"):
        pick_device("cuda:1")
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(IgdrecError, match=r"^--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1$"):
        pick_device("cuda:2")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(IgdrecError, match=r"^--device mps: MPS .* is not available on this machine$"):
        pick_device("mps")


def test_cut_offs_are_a_set_sorted_without_repeats(tmp_path, captured):
    result = CliRunner().invoke(app, ["metrics", "--ks", "5,5,1,1"])
    assert result.exit_code == 0 and captured[-1][1].ks == [1, 5], result.output
    from_yaml = cfg.load_pipeline(write(tmp_path, "metrics:\n  ks: [10, 1, 10]\n")).stage_config("metrics")
    assert from_yaml.ks == [1, 10]
    # one value, one cache key: also for a config built in Python with the cut-offs in any order
    assert options.key_params(cfg.MetricsConfig(ks=[1])) == options.key_params(cfg.MetricsConfig(ks=[1, 1]))
    assert options.key_params(cfg.MetricsConfig(ks=[5, 1, 5]))["ks"] == [1, 5]


def test_min_lr_ratio_acts_only_on_the_cosine_schedule():
    linear = cfg.SFTConfig(lr_schedule="linear")
    assert "min_lr_ratio" not in options.key_params(linear)
    assert options.key_params(linear) == options.key_params(dataclasses.replace(linear, min_lr_ratio=0.5))
    assert options.key_params(cfg.SFTConfig())["min_lr_ratio"] == 0.1 and cfg.SFTConfig().lr_schedule == "cosine"


def test_inert_fields_stay_out_of_the_key():
    plain = options.key_params(cfg.SFTConfig(weighting="plain"))
    assert "beta" not in plain and "alpha" not in plain
    assert "alpha" in options.key_params(cfg.SFTConfig(weighting="cft"))
    full = options.key_params(cfg.SFTConfig(lora=False))
    assert not any(k.startswith("lora_") for k in full) and full["lora"] is False
    assert set(options.key_params(cfg.PreprocessConfig())) == {"source", "history_len", "category_word"}
    d3 = options.key_params(cfg.PreprocessConfig(source="d3-csv", train="a.csv"))
    assert set(d3) == {"source", "category_word"}  # d3-csv keeps its histories; files enter by content
    assert "grounding_model" not in options.key_params(cfg.RerankConfig())
    assert options.key_params(cfg.RerankConfig(grounding=True, grounding_model="m"))["grounding_model"] == "m"


def test_a_new_stage_gets_its_command_from_its_config(monkeypatch):
    """What another engineer does to add a stage: a config class with option() fields, registered."""
    import typer

    @dataclasses.dataclass
    class ToyConfig:
        """Do toy things."""

        size: int = options.option(3, "How big.", min=1)
        mode: str = options.option("fast", "How.", choices=("fast", "slow"))
        tags: list[str] = options.option(factory=lambda: ["a"], help="Tags.")
        verbose: bool = options.option(False, "Talk.", key=False)
        limit: float | None = options.option(None, "Cap.", gt=0.0)

    monkeypatch.setitem(cfg.STAGE_CONFIGS, "toy", ToyConfig)
    seen = []
    toy_app = typer.Typer()
    cli.stage_command("toy", target=toy_app, handler=lambda config, run_dir, force: seen.append(config))
    runner = CliRunner()
    ok = runner.invoke(toy_app, ["--size", "5", "--mode", "slow", "--tags", "x,y", "--verbose", "--limit", "0.5"])
    assert ok.exit_code == 0, ok.output
    assert seen == [ToyConfig(size=5, mode="slow", tags=["x", "y"], verbose=True, limit=0.5)]
    bad = runner.invoke(toy_app, ["--mode", "slwo"])
    assert bad.exit_code != 0 and "--mode 'slwo': expected one of fast, slow (did you mean 'slow'?)" in bad.output
    assert "How big." in runner.invoke(toy_app, ["--help"]).output
    assert options.key_params(ToyConfig()) == {"size": 3, "mode": "fast", "tags": ["a"], "limit": None}


def test_a_plain_dataclass_field_is_caught_by_the_coverage_test():
    @dataclasses.dataclass
    class Sloppy:
        forgotten: int = 3

    (opt,) = options.options(Sloppy)
    assert not opt.declared and opt.role == options.KEY  # counted in the key until declared otherwise


# --------------------------------------------------------------------------------------------------
# A renamed option: sft --cft-alpha, formerly --alpha (decode's --alpha is IGD's calibration)


def test_cft_alpha_keeps_alpha_as_its_cache_key_spelling():
    config = cfg.SFTConfig(weighting="cft", cft_alpha=0.2)
    params = options.key_params(config)
    assert params["alpha"] == 0.2 and "cft_alpha" not in params
    assert options.option_named(cfg.SFTConfig, "cft_alpha").in_key_as == "alpha"
    # the key of every other option is its field name
    assert all(o.in_key_as == o.name for cls in cfg.STAGE_CONFIGS.values() for o in options.options(cls) if o.name != "cft_alpha")
    for cls in cfg.STAGE_CONFIGS.values():  # one key spelling per option; a former name names no other field
        spellings = [o.in_key_as for o in options.options(cls)]
        assert len(set(spellings)) == len(spellings), cls.__name__
        assert not set(options.renamed(cls)) & {o.name for o in options.options(cls)}, cls.__name__


def test_yaml_alpha_of_sft_still_reads_as_cft_alpha_with_one_warning_line(tmp_path, capsys):
    options._warn.cache_clear()
    old = cfg.load_pipeline(write(tmp_path, "sft:\n  weighting: cft\n  alpha: 0.1\n")).stage_config("sft")
    warned = capsys.readouterr().err.strip().splitlines()
    assert len(warned) == 1 and warned[0].startswith("warning:") and "sft.alpha is deprecated" in warned[0]
    assert "sft.cft_alpha" in warned[0]
    new = cfg.load_pipeline(write(tmp_path, "sft:\n  weighting: cft\n  cft_alpha: 0.1\n")).stage_config("sft")
    assert old == new and old.cft_alpha == 0.1 and options.key_params(old) == options.key_params(new)
    assert capsys.readouterr().err == ""  # the new name warns about nothing
    with pytest.raises(IgdrecError, match=r"igdrec.yaml:sft.alpha and .*igdrec.yaml:sft.cft_alpha: .*give only the new one"):
        cfg.load_pipeline(write(tmp_path, "sft:\n  weighting: cft\n  alpha: 0.1\n  cft_alpha: 0.2\n"))


def test_cli_alpha_of_sft_still_sets_cft_alpha_with_one_warning_line(captured):
    options._warn.cache_clear()
    runner = CliRunner()
    result = runner.invoke(app, ["sft", "--weighting", "cft", "--alpha", "0.1"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines() == [
        "warning: sft --alpha is deprecated; it is now --cft-alpha (the same setting, the same cache key)"]
    assert runner.invoke(app, ["sft", "--weighting", "cft", "--cft-alpha", "0.1"]).exit_code == 0
    (_, old), (_, new) = captured
    assert old == new and old.cft_alpha == 0.1
    both = runner.invoke(app, ["sft", "--weighting", "cft", "--alpha", "0.1", "--cft-alpha", "0.2"])
    assert both.exit_code != 0 and both.output.strip().splitlines() == [
        "error: --alpha and --cft-alpha: --alpha is the former name of --cft-alpha; give only the new one"]
    # the old flag is hidden from --help, whose --beta names both of its meanings
    shown = runner.invoke(app, ["sft", "--help"], env={"COLUMNS": "200"}).output
    assert "--cft-alpha" in shown and "--alpha " not in shown and "pos and cft" in shown


def test_grid_weightings_cft_alpha_plans_the_same_fine_tunes_as_cft_alpha(tmp_path):
    from igdrec.experiments import grid_config
    from igdrec.experiments import plan as planning

    text = (REPO / "configs" / "grid" / "paper.yaml").read_text()
    assert "cft_alpha: [" in text
    old_path = tmp_path / "old.yaml"
    old_path.write_text(text.replace("cft_alpha: [", "alpha: ["))

    def fine_tunes(path):
        grid = grid_config.load_grid(path, run_root=tmp_path / "runs")
        return [(s.path, options.key_params(s.config)) for d in grid.datasets for s in planning.fine_tunes(grid, d, "cft")]

    new = fine_tunes(REPO / "configs" / "grid" / "paper.yaml")
    assert len(new) > 1 and fine_tunes(old_path) == new


def test_a_config_is_checked_once_however_many_layers_check_it(monkeypatch):
    calls = []
    original = cfg.DecodeConfig.check_fields
    monkeypatch.setattr(cfg.DecodeConfig, "check_fields", lambda self: (calls.append(self), original(self))[-1])
    monkeypatch.setattr(options, "_PASSED", set())
    config = options.apply_cli(cfg.DecodeConfig(), {"alpha": "0.2"}, "decode")
    options.check(config)
    options.check(dataclasses.replace(config))  # equal values: a copy is as checked as the original
    assert len(calls) == 1
    options.check(dataclasses.replace(config, alpha=0.3))  # other values are checked anew
    assert len(calls) == 2
    bad = dataclasses.replace(config, tfa="sasrec", constrained=False)
    for _ in range(2):  # a config that fails is never remembered as checked
        with pytest.raises(IgdrecError, match="--tfa scores catalog items"):
            options.check(bad)
    assert len(calls) == 4
