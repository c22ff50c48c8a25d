"""Stage `decode`: constrained, IG-calibrated beam search of every test (or valid) prompt (docs/method.md §6).

Writes `<run>/decode/<name>/beams.parquet` (schema `beams`). Samples are decoded in shards of
`shard_size`; each finished shard is a file in the stage's partial directory, so a killed decode picks
up at the first missing shard when rerun with the same parameters.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import polars as pl
from rich.progress import TextColumn

from igdrec import config as cfg
from igdrec import prompt, schema
from igdrec.beam import BeamSearch, SearchStats, TrieTensors
from igdrec.config import DecodeConfig
from igdrec.console import console, progress_bar
from igdrec.errors import IgdrecError
from igdrec.ig import CatalogTrie
from igdrec.modeling import autocast_dtype, load_model, load_tokenizer, pick_device
from igdrec.rundir import RunDir, StageWriter

SHARD_DIR = "shards"


def run(config: DecodeConfig, run_dir: RunDir, force: bool = False) -> dict:
    run = run_dir
    cfg.check(config)
    data = run.require("data", hint="igdrec preprocess")
    ig = run.require("ig", hint="igdrec build-ig-index")
    label, model_spec, inputs = _resolve_source(config, run)
    inputs |= {"data": data["fingerprint"], "ig": ig["fingerprint"]}
    name = config.name or default_name(label, config)
    params = key_params(config, label, model_spec)
    with StageWriter(run, f"decode/{name}", stage="decode", params=params, inputs=inputs, force=force, resumable=True) as out:
        if out.cached:
            out.report_cached()
            return out.manifest
        _decode(config, run, data, model_spec, out)
    console.print(f"decode wrote [bold]{name}[/] → {run.stage_dir(f'decode/{name}')}/beams.parquet "
                  f"(next: igdrec rerank --decode {name})")
    return out.manifest


def key_params(config: DecodeConfig, label: str, model_spec: str) -> dict:
    """The config's key fields, with --sft/--model replaced by the resolved source and model."""
    params = cfg.key_params(config)
    del params["sft"]
    return params | {"source": label, "model": model_spec}


def default_name(label: str, config: DecodeConfig) -> str:
    parts = [label, config.split, f"b{config.num_beams}", f"lp{config.length_penalty:g}", f"a{config.alpha:g}"]
    if not config.constrained:
        parts.append("free")
    if config.limit is not None:
        parts.append(f"n{config.limit}")
    return "-".join(parts)


def _resolve_source(config: DecodeConfig, run: RunDir) -> tuple[str, str, dict]:
    """(label for names, model spec to load, input fingerprints) of --sft NAME or --model SPEC."""
    if config.sft and config.model:
        raise IgdrecError("pass either --sft NAME or --model SPEC, not both")
    sft_name = config.sft
    if sft_name is None and config.model is None:
        sft_name = run.resolve_name("sft", None, "--sft (or --model)")
    if sft_name is not None:
        manifest = run.require(f"sft/{sft_name}", hint=f"igdrec sft --name {sft_name}")
        model_dir = run.stage_dir(f"sft/{sft_name}") / "model"
        return sft_name, str(model_dir), {"sft": manifest["fingerprint"]}
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(config.model.rstrip("/")).name) or "model"
    return label, config.model, {}


def check_same_tokens(tokenizer, trie: CatalogTrie, items: pl.DataFrame, where: Path) -> None:
    """Refuse a model whose tokenizer writes the catalog with other tokens than the IG index has."""
    titles = dict(zip(items["item_id"].to_list(), items["title"].to_list()))
    ids = trie.item_ids.tolist()
    sequences = prompt.item_token_sequences(tokenizer, [titles.get(i, "") for i in ids])
    for row, (item_id, expected) in enumerate(zip(ids, sequences)):
        stored = trie.token[trie.item_path_nodes[trie.item_path_ptr[row]:trie.item_path_ptr[row + 1]]].tolist()
        if stored != expected:
            raise IgdrecError(
                f"{where}: item {item_id}: the IG index was built with another tokenizer than the decoding "
                f"model's (tokens {stored[:6]}… vs {expected[:6]}…); rebuild it with igdrec build-ig-index --model <that model>"
            )


def _decode(config: DecodeConfig, run: RunDir, data: dict, model_spec: str, out: StageWriter) -> None:
    items = schema.read(run.artifact("data", "items.parquet"), "items")
    samples = schema.read(run.artifact("data", f"{config.split}.parquet"), "samples").sort("sample_id")
    if config.limit is not None:
        samples = samples.head(config.limit)
    trie = CatalogTrie.load(run.artifact("ig", "trie_nodes.parquet"), run.artifact("ig", "item_paths.parquet"))
    tokenizer = load_tokenizer(model_spec)
    check_same_tokens(tokenizer, trie, items, run.artifact("ig", "item_paths.parquet"))
    device = pick_device(config.device)
    model = load_model(model_spec, device=device, merge_adapter=True)
    search = BeamSearch(
        model=model,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_beams=config.num_beams,
        length_penalty=config.length_penalty,
        alpha=config.alpha,
        trie=TrieTensors.from_trie(trie, device) if config.constrained else None,
        max_new_tokens=config.max_new_tokens or trie.max_depth,
        jump_forward=config.jump_forward,
        jump_fill=config.jump_fill,
        autocast_dtype=autocast_dtype(device),
        self_check=True,
    )
    titles = dict(zip(items["item_id"].to_list(), items["title"].to_list()))
    category = data["stats"].get("category_word") or prompt.DEFAULT_CATEGORY_WORD
    context = _ShardContext(trie=trie, titles=titles, tokenizer=tokenizer, category=category, cutoff_len=config.cutoff_len)

    shard_dir = out.path(SHARD_DIR)
    shard_dir.mkdir(exist_ok=True)
    n = samples.height
    starts = list(range(0, n, config.shard_size))
    totals = SearchStats()
    decode_seconds = 0.0
    resumed = 0
    done = 0
    rate = TextColumn("{task.fields[rate]}")
    with progress_bar(rate) as progress:
        task = progress.add_task("decode", total=n, rate="")
        for index, start in enumerate(starts):
            shard = samples.slice(start, config.shard_size)
            stem = shard_dir / f"shard-{index:05d}"
            stats_path = stem.with_suffix(".json")
            if stats_path.exists():  # finished before an interruption: its parquet was written first
                record = json.loads(stats_path.read_text())
                resumed += shard.height
                progress.advance(task, shard.height)
            else:
                started = time.perf_counter()
                search.stats = SearchStats()
                frame = _decode_shard(search, shard, context, config.batch_size, lambda k: progress.advance(task, k))
                record = {
                    "samples": shard.height,
                    "seconds": time.perf_counter() - started,
                    "forward_calls": search.stats.forward_calls,
                    "forward_calls_saved": search.stats.forward_calls_saved,
                    "steps": search.stats.steps,
                }
                _write_atomic_parquet(frame, stem.with_suffix(".parquet"))
                _write_atomic_text(json.dumps(record), stats_path)
            totals.add(SearchStats(record["forward_calls"], record["forward_calls_saved"], record["steps"]))
            decode_seconds += record["seconds"]
            done += shard.height
            progress.update(task, rate=f"{done / max(decode_seconds, 1e-9):.2f} samples/s")

    frames = [schema.read(shard_dir / f"shard-{i:05d}.parquet", "beams") for i in range(len(starts))]
    beams = pl.concat(frames) if frames else schema.conform(_empty_beams(), "beams")
    schema.conform(beams, "beams").write_parquet(out.path("beams.parquet"))
    for path in shard_dir.iterdir():
        path.unlink()
    shard_dir.rmdir()
    out.rows["beams"] = beams.height
    out.rows["samples"] = n
    out.stats = {
        "split": config.split,
        "limit": config.limit,
        "n_samples": n,
        "n_split_samples": schema.read(run.artifact("data", f"{config.split}.parquet"), "samples").height,
        "seconds_per_sample": round(decode_seconds / max(n, 1), 4),
        "forward_calls": totals.forward_calls,
        "forward_calls_saved_by_jump_forward": totals.forward_calls_saved,
        "decoding_steps": totals.steps,
        "resumed_samples": resumed,
        "batch_size": config.batch_size,
        "jump_forward": config.jump_forward,
        "jump_fill": config.jump_fill,
        "device": str(device),
    }


class _ShardContext:
    def __init__(self, trie: CatalogTrie, titles: dict, tokenizer, category: str, cutoff_len: int):
        self.trie = trie
        self.titles = titles
        self.tokenizer = tokenizer
        self.category = category
        self.cutoff_len = cutoff_len
        self.leaf_group = dict(zip(trie.item_leaf.tolist(), trie.item_title_group.tolist()))
        self.stripped_title_group: dict[str, int] = {}
        for item_id in sorted(titles):
            self.stripped_title_group.setdefault(titles[item_id].strip(), item_id)


def _decode_shard(search: BeamSearch, shard: pl.DataFrame, context: _ShardContext, batch_size: int, advance) -> pl.DataFrame:
    """Beam search over one shard's samples; one beams row per finished hypothesis."""
    prompts = []
    for history in shard["history_item_ids"].to_list():
        ids, _ = prompt.encode_prompt(context.tokenizer, [context.titles.get(i, "") for i in history], context.category, context.cutoff_len)
        prompts.append(ids)
    # Similar lengths in one batch waste less compute on padding; results do not depend on batching.
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    hypotheses: list = [None] * len(prompts)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin:begin + batch_size]
        for i, hyps in zip(chunk, search.search([prompts[i] for i in chunk])):
            hypotheses[i] = hyps
        advance(len(chunk))
    rows = {c: [] for c in schema.BEAMS}
    entropy = context.trie.entropy
    for sample_id, hyps in zip(shard["sample_id"].to_list(), hypotheses):
        for rank, hyp in enumerate(hyps):
            if hyp.nodes and hyp.nodes[-1] >= 0:
                item_id = context.leaf_group.get(hyp.nodes[-1])
                title = context.titles.get(item_id)
                prefix_entropy = entropy[np.asarray(hyp.nodes)].tolist()
            else:  # unconstrained: the generated text, matched to a catalog title if it is one
                title = context.tokenizer.decode([t for t in hyp.tokens if t != search.eos_token_id], skip_special_tokens=True).strip()
                item_id = context.stripped_title_group.get(title)
                prefix_entropy = [float("nan")] * len(hyp.tokens)
            rows["sample_id"].append(sample_id)
            rows["rank"].append(rank)
            rows["item_id"].append(item_id)
            rows["title"].append(title)
            rows["score"].append(hyp.score)
            rows["tokens"].append(hyp.tokens)
            rows["step_logprobs"].append(hyp.step_logprobs)
            rows["prefix_entropy"].append(prefix_entropy)
    return schema.conform(pl.DataFrame(rows, schema=schema.BEAMS), "beams")


def _empty_beams() -> pl.DataFrame:
    return pl.DataFrame({c: [] for c in schema.BEAMS}, schema=schema.BEAMS)


def _write_atomic_parquet(frame: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    frame.write_parquet(tmp)
    os.replace(tmp, path)


def _write_atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
