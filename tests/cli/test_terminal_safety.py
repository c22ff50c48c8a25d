"""Titles from data cannot drive the terminal: control characters are printed escaped, brackets as they are."""

from __future__ import annotations

import pytest
from decode_helpers import publish_ig, publish_sft
from fixtures import TITLES, synthetic_dataset, write_data_stage
from typer.testing import CliRunner

from igdrec.cli import app
from igdrec.console import console, shown
from igdrec.modeling import load_tokenizer

# Clears the screen, sets the window title, and carries rich markup that must not be read as markup.
EVIL = "Evil \x1b[2J\x1b]0;pwned\x07 [bold]Movie[/bold] \u202eon"
EVIL_SHOWN = "Evil \\x1b[2J\\x1b]0;pwned\\x07 [bold]Movie[/bold] \\u202eon"
EVIL_ID = 3
SFT = "tiny"


def test_shown_escapes_control_characters_and_keeps_brackets():
    assert shown(EVIL).plain == EVIL_SHOWN
    assert shown("tab\there\nC1 \x9b DEL \x7f").plain == "tab\\x09here\\x0aC1 \\x9b DEL \\x7f"
    assert shown("Amélie (2001) [/] 東京").plain == "Amélie (2001) [/] 東京"  # printable text is left alone


@pytest.fixture(scope="module")
def evil_run(tmp_path_factory, tiny_model_dir):
    titles = list(TITLES)
    titles[EVIL_ID] = EVIL
    items, splits = synthetic_dataset(titles=titles)
    run = write_data_stage(tmp_path_factory.mktemp("evil") / "run", items, splits)
    publish_ig(run, load_tokenizer(str(tiny_model_dir)), str(tiny_model_dir))
    publish_sft(run, tiny_model_dir, SFT)
    return run


def assert_escaped(output: str) -> None:
    assert EVIL_SHOWN in output, output
    assert not {"\x1b", "\x07", "\u202e"} & set(output)


def test_recommend_prints_titles_escaped(evil_run, monkeypatch):
    monkeypatch.setattr(console, "width", 300)  # one line per row, so the title is not wrapped
    # As many beams as distinct titles: the search is exhaustive, so the list holds the evil title.
    args = ["recommend", "--run-dir", str(evil_run.root), "--sft", SFT, "--history-ids", "0", "--top-k", "19", "--no-exclude-history"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert_escaped(result.stdout)


def test_ig_show_prints_titles_escaped(evil_run, monkeypatch):
    monkeypatch.setattr(console, "width", 300)
    result = CliRunner().invoke(app, ["ig", "show", "--item-id", str(EVIL_ID), "--run-dir", str(evil_run.root)])
    assert result.exit_code == 0, result.output
    assert_escaped(result.stdout)
    assert f"item {EVIL_ID}: '{EVIL_SHOWN}'" in result.stdout
    # a title given on the command line is quoted in the error as it is, markup-like brackets included
    missing = CliRunner().invoke(app, ["ig", "show", "--title", "[/] \x1b[31mred", "--run-dir", str(evil_run.root)])
    assert missing.exit_code == 2 and missing.output.strip() == (
        f"error: {evil_run.root / 'data' / 'items.parquet'}: no item titled '[/] \\x1b[31mred'"
    ), missing.output


def test_prompt_text_shows_history_titles_escaped(evil_run):
    import polars as pl

    from igdrec import schema

    samples = schema.read(evil_run.artifact("data", "test.parquet"), "samples")
    with_evil = samples.filter(pl.col("history_item_ids").list.contains(EVIL_ID))["sample_id"][0]
    result = CliRunner().invoke(app, ["prompt", "--sample-id", str(with_evil), "--run-dir", str(evil_run.root)])
    assert result.exit_code == 0, result.output
    assert_escaped(result.stdout)
