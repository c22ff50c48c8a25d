"""YAML configs: sections per stage, typed values, unknown keys rejected by file name, CLI flags win."""

import pytest
from typer.testing import CliRunner

from igdrec import config as cfg
from igdrec.cli import app
from igdrec.errors import IgdrecError


def write(tmp_path, text):
    path = tmp_path / "igdrec.yaml"
    path.write_text(text)
    return path


def test_yaml_sections_are_typed(tmp_path):
    path = write(tmp_path, "run_dir: runs/x\nstages: [preprocess, sft]\npreprocess:\n  history_len: '5'\n  drop_unknown: yes\nsft:\n  beta: 0.2\n  lora_target_modules: q_proj, v_proj\n")
    pipeline = cfg.load_pipeline(path)
    assert pipeline.run_dir == "runs/x" and pipeline.stages == ["preprocess", "sft"]
    pre = pipeline.stage_config("preprocess")
    assert (pre.history_len, pre.drop_unknown, pre.source) == (5, True, "ml-100k")
    assert pipeline.stage_config("sft").lora_target_modules == ["q_proj", "v_proj"]
    assert pipeline.stage_config("decode") == cfg.DecodeConfig()


@pytest.mark.parametrize(
    "text, message",
    [
        ("preprocess:\n  histroy_len: 5\n", "unknown key(s) histroy_len"),
        ("preprocesss:\n  history_len: 5\n", "unknown section 'preprocesss'"),
        ("preprocess:\n  history_len: ten\n", "preprocess.history_len: expected int"),
        ("stages: [preprocess, train]\n", "unknown stage 'train'"),
        ("preprocess: [1\n", "is not valid YAML"),
    ],
)
def test_bad_configs_name_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(IgdrecError) as info:
        cfg.load_pipeline(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_cli_flag_overrides_yaml(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("igdrec.cli.run_stage", lambda stage, config, run_dir, force: seen.update(config=config))
    path = write(tmp_path, "preprocess:\n  history_len: 5\n  seed: 7\n")
    assert CliRunner().invoke(app, ["preprocess", "--config", str(path), "--history-len", "3"]).exit_code == 0
    assert (seen["config"].history_len, seen["config"].seed) == (3, 7)


def test_cli_reports_unknown_yaml_key_on_one_line(tmp_path):
    path = write(tmp_path, "preprocess:\n  colour: red\n")
    result = CliRunner().invoke(app, ["preprocess", "--config", str(path)])
    assert result.exit_code != 0 and str(path) in result.output and len(result.output.strip().splitlines()) == 1
