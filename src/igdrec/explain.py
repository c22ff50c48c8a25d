"""Run-directory inspection commands (`igdrec prompt`, `igdrec ig show`): what the model sees, exactly."""

from __future__ import annotations

import json
import sys

import numpy as np
import polars as pl
from rich.table import Table

from igdrec import schema
from igdrec.config import EMBEDDED_MODEL, DecodeConfig
from igdrec.console import console, err_console, shown
from igdrec.errors import IgdrecError
from igdrec.ig import CatalogTrie
from igdrec.modeling import load_tokenizer
from igdrec.prompt import encode_prompt, render_prompt
from igdrec.rundir import RunDir

PROMPT_CUTOFF = DecodeConfig().cutoff_len  # the prompt budget decoding gives a sample by default
SPLITS = ("train", "valid", "test")


def show_prompt(run: RunDir, split: str, sample_id: int, as_ids: bool = False, model: str | None = None) -> None:
    """Print the prompt of one sample exactly as the model gets it (text, or token ids as a JSON list).

    History titles that do not fit into the cutoff are dropped oldest first, as SFT and decoding do, so
    the tokenizer is needed for the text as well. In the text, control characters of titles are shown
    escaped (`console.shown`), so that printing a prompt cannot drive the terminal; the ids are exact.
    """
    if split not in SPLITS:
        raise IgdrecError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    data = run.require("data", hint="igdrec preprocess")
    path = run.artifact("data", f"{split}.parquet")
    samples = schema.read(path, "samples").filter(pl.col("sample_id") == sample_id)
    if samples.height == 0:
        raise IgdrecError(f"{path}: no sample with sample_id {sample_id}")
    sample = samples.row(0, named=True)
    titles = _titles(run, sample["history_item_ids"] + [sample["item_id"]])
    history, target = titles[:-1], titles[-1]
    category = data.get("stats", {}).get("category_word")
    if not category:
        raise IgdrecError(f"{run.stage_dir('data') / 'stage.json'}: no category_word in its stats; rerun `igdrec preprocess --force`")
    tokenizer = load_tokenizer(model or _index_model(run))
    ids, used = encode_prompt(tokenizer, history, category, PROMPT_CUTOFF)
    if as_ids:
        sys.stdout.write(json.dumps(ids) + "\n")
    else:
        sys.stdout.write(render_prompt([shown(title).plain for title in history[len(history) - used :]], shown(category).plain))
        sys.stdout.flush()
        dropped = f"; {len(history) - used} oldest history titles dropped to fit {PROMPT_CUTOFF} tokens" if used < len(history) else ""
        err_console.print(shown(f"{split} sample {sample_id}: {len(ids)} prompt tokens; target {target!r}{dropped}"), style="dim", soft_wrap=True)


def show_item_ig(run: RunDir, item_id: int | None = None, title: str | None = None) -> None:
    """Print an item's token path with each token's text, IG, normalised IG and prefix entropy."""
    if (item_id is None) == (title is None):
        raise IgdrecError("give exactly one of --item-id or --title")
    manifest = run.require("ig", hint="igdrec build-ig-index")
    items_path = run.artifact("data", "items.parquet")
    items = schema.read(items_path, "items")
    if title is not None:
        matches = items.filter(pl.col("title") == title.strip())
        if matches.height == 0:
            raise IgdrecError(f"{items_path}: no item titled {title.strip()!r}")
    else:
        matches = items.filter(pl.col("item_id") == item_id)
        if matches.height == 0:
            raise IgdrecError(f"{items_path}: no item with item_id {item_id}")
    trie = CatalogTrie.load(run.artifact("ig", "trie_nodes.parquet"), run.artifact("ig", "item_paths.parquet"))
    ids = matches["item_id"].to_list()
    rows = trie.item_index(np.array(ids))
    if (rows < 0).all():
        raise IgdrecError(
            f"{run.artifact('ig', 'item_paths.parquet')}: item {ids[0]} is not in the IG catalog "
            f"(built with --catalog {manifest['params']['catalog']})"
        )
    shown_id = ids[int(np.argmax(rows >= 0))]
    path = trie.path(shown_id)
    tokenizer = load_tokenizer(manifest["params"]["model"])
    table = Table(title=shown(f"item {shown_id}: {matches.filter(pl.col('item_id') == shown_id)['title'][0]!r}"))
    for column in ("#", "token", "text", "IG", "IG~", "H(prefix)", "zero-IG", "choices"):
        table.add_column(column, justify="left" if column == "text" else "right")
    table.add_row("", "", "[dim](root)[/]", "", "", f"{trie.entropy[0]:.4f}", "", "")
    for step, node in enumerate(path.tolist(), start=1):
        parent = trie.parent[node]
        table.add_row(
            str(step),
            str(trie.token[node]),
            shown(repr(tokenizer.decode([int(trie.token[node])]))),
            f"{trie.ig[node]:.4f}",
            f"{trie.ig_norm[node]:.3f}",
            f"{trie.entropy[node]:.4f}",
            "yes" if trie.zero_ig[node] else "",
            str(trie.child_count[parent]),
        )
    console.print(table)
    row = trie.item_index(np.array([shown_id]))[0]
    same_leaf = trie.item_ids[trie.item_leaf == trie.item_leaf[row]].tolist()
    shared = f"; items sharing this title: {same_leaf} (title group {trie.item_title_group[row]})" if len(same_leaf) > 1 else ""
    console.print(
        f"IG sum {trie.ig[path].sum():.4f} = H(root) - H(leaf); reference count {trie.item_reference_count[row]:g}{shared}",
        soft_wrap=True,
    )


def _titles(run: RunDir, item_ids: list[int]) -> list[str]:
    path = run.artifact("data", "items.parquet")
    items = schema.read(path, "items")
    lookup = dict(zip(items["item_id"].to_list(), items["title"].to_list()))
    missing = [i for i in item_ids if i not in lookup]
    if missing:
        raise IgdrecError(f"{path}: item {missing[0]} is referenced by a sample but has no title")
    return [lookup[i] for i in item_ids]


def _index_model(run: RunDir) -> str:
    """The model whose tokenizer built the IG index (the one SFT/decoding must share), else the default."""
    manifest = run.manifest("ig")
    return manifest["params"]["model"] if manifest else EMBEDDED_MODEL
