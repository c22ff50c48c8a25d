"""Stage `decode`: constrained, IG-calibrated beam search of every test (or valid) prompt (docs/method.md §6).

Writes `<run>/decode/<name>/beams.parquet` (schema `beams`). Samples are decoded in shards of
`shard_size`; each finished shard is a file in the stage's partial directory, so a killed decode picks
up at the first missing shard when rerun with the same parameters. Under `torchrun --nproc_per_node=N`
rank r decodes shards r, r+N, …, and rank 0 assembles `beams.parquet` from all of them (the same file
as one process writes).
"""

from __future__ import annotations

import dataclasses
import json
import time

import polars as pl
import torch
from rich.progress import TextColumn

from igdrec import decoding, options, schema
from igdrec.beam import SearchStats
from igdrec.config import DecodeConfig
from igdrec.console import progress_bar
from igdrec.distributed import World, init_distributed
from igdrec.rundir import RunDir, StageWriter, atomic_write, write_text_atomic
from igdrec.runner import StagePlan, run_stage

SHARD_DIR = "shards"


def run(config: DecodeConfig, run_dir: RunDir, force: bool = False) -> dict:
    return run_stage("decode", config, run_dir, force)


def plan(config: DecodeConfig, run_dir: RunDir) -> StagePlan:
    run = run_dir
    data = run.require("data", hint="igdrec preprocess")
    ig = run.require("ig", hint="igdrec build-ig-index")
    source = decoding.resolve_source(run, config.sft, config.model)
    inputs = source.inputs | {"data": data["fingerprint"], "ig": ig["fingerprint"]}
    if config.tfa is not None:
        baseline = run.require(f"baseline/{config.tfa}", hint=f"igdrec baseline --name {config.tfa}")
        inputs["tfa"] = baseline["fingerprint"]
    name = config.name or default_name(source.label, config)
    params = cache_params(config, source)
    return StagePlan("decode", run, f"decode/{name}", config, params, inputs, resumable=True,
                     next=f"igdrec rerank --decode {name}", product="beams.parquet")


def prepare(plan: StagePlan, writer: StageWriter) -> World:
    world, device = init_distributed(plan.config.device)
    plan.context |= {"world": world, "device": device}
    return world


def compute(plan: StagePlan, out: StageWriter) -> None:
    # Under torchrun every rank decodes its own shards into the shared partial directory; rank 0 alone
    # prepares and publishes it.
    _decode(dataclasses.replace(plan.config, device=str(plan.context["device"])), plan.run, out, plan.context["world"])


def cache_params(config: DecodeConfig, source: decoding.ModelSource) -> dict:
    """The decode's cache-key parameters: every config field marked as a key (options.option), with the
    model named as the source resolves it (a fine-tune by name, its content by the inputs' fingerprint;
    never a path into the run directory, so a moved or differently spelled run dir stays cached)."""
    return options.key_params(config) | {"source": source.label, "model": None, "sft": None} | source.key


def default_name(label: str, config: DecodeConfig) -> str:
    parts = [label, config.split, f"b{config.num_beams}", f"lp{config.length_penalty:g}", f"a{config.alpha:g}"]
    if not config.constrained:
        parts.append("free")
    if config.constrained_softmax:
        parts.append("cs")
    if config.tfa is not None:
        parts.append(f"tfa-{config.tfa}-g{config.tfa_guidance:g}")
    if config.limit is not None:
        parts.append(f"n{config.limit}")
    return "-".join(parts)


def _decode(config: DecodeConfig, run: RunDir, out: StageWriter, world: World) -> None:
    samples = schema.read(run.artifact("data", f"{config.split}.parquet"), "samples").sort("sample_id")
    n_split_samples = samples.height
    if config.limit is not None:
        samples = samples.head(config.limit)
    decoder = decoding.Decoder.from_run(run, config)
    assistant = None
    if config.tfa is not None:  # scores each batch's histories as the search needs them (docs/method.md §6.4)
        assistant = decoding.TextFreeAssistant.load(run, config.tfa, decoder.catalog.trie, decoder.device)

    shard_dir = out.partial_dir / SHARD_DIR
    shard_dir.mkdir(exist_ok=True)
    n = samples.height
    starts = list(range(0, n, config.shard_size))
    mine = [i for i in range(len(starts)) if i % world.size == world.rank]  # disjoint shards per rank
    resumed = 0
    done = 0
    busy_seconds = 0.0
    rate = TextColumn("{task.fields[rate]}")
    with progress_bar(rate) as progress:
        own_samples = sum(min(config.shard_size, n - starts[i]) for i in mine)
        task = progress.add_task("decode" if world.size == 1 else f"decode (rank 0 of {world.size})", total=own_samples,
                                 rate="", visible=world.is_main)
        for index in mine:
            shard = samples.slice(starts[index], config.shard_size)
            stem = shard_dir / f"shard-{index:05d}"
            stats_path = stem.with_suffix(".json")
            if stats_path.exists():  # finished before an interruption: its parquet was written first
                resumed += shard.height
                progress.advance(task, shard.height)
                continue
            started = time.perf_counter()
            decoder.engine.stats = SearchStats()
            frame = _decode_shard(decoder, shard, assistant, lambda k: progress.advance(task, k))
            record = {
                "samples": shard.height,
                "seconds": time.perf_counter() - started,
                **dataclasses.asdict(decoder.stats),
                "batch_size": decoder.last_batch_size,
            }
            atomic_write(stem.with_suffix(".parquet"), frame.write_parquet)  # the parquet first: the json marks a finished shard
            write_text_atomic(stats_path, json.dumps(record))
            done += shard.height
            busy_seconds += record["seconds"]
            progress.update(task, rate=f"{done / max(busy_seconds, 1e-9):.2f} samples/s")
    resumed = int(world.all_reduce(torch.tensor([resumed], device=decoder.device))[0])
    world.barrier()  # every rank's shards are on disk
    if not world.is_main:
        return

    records = [json.loads((shard_dir / f"shard-{i:05d}.json").read_text()) for i in range(len(starts))]
    frames = [schema.read(shard_dir / f"shard-{i:05d}.parquet", "beams") for i in range(len(starts))]
    beams = pl.concat(frames) if frames else decoding.beams_frame([], [])
    schema.conform(beams, "beams").write_parquet(out.path("beams.parquet"))
    for path in shard_dir.iterdir():
        path.unlink()
    shard_dir.rmdir()
    totals = SearchStats()
    for record in records:
        totals.add(SearchStats(**{f.name: record.get(f.name, 0) for f in dataclasses.fields(SearchStats)}))
    out.rows["beams"] = beams.height
    out.rows["samples"] = n
    out.stats = {
        "split": config.split,
        "limit": config.limit,
        "n_samples": n,
        "n_split_samples": n_split_samples,
        "seconds_per_sample": round(sum(r["seconds"] for r in records) / max(n, 1), 4),  # per process
        "forward_calls": totals.forward_calls,
        "forward_calls_saved_by_jump_forward": totals.forward_calls_saved,
        "decoding_steps": totals.steps,
        "prompt_prefix_passes": totals.prefix_passes,
        "prompt_tokens_saved_by_shared_prefix": totals.prefix_tokens_saved,
        "resumed_samples": resumed,
        "world_size": world.size,
        "batch_size": config.batch_size,
        "batch_sizes_used": sorted({r["batch_size"] for r in records if r.get("batch_size") is not None}),
        "jump_forward": config.jump_forward,
        "jump_fill": config.jump_fill,
        "device": str(decoder.device),
        "dtype": str(next(decoder.model.parameters()).dtype).removeprefix("torch."),
    }


def _decode_shard(decoder: decoding.Decoder, shard: pl.DataFrame, assistant, advance) -> pl.DataFrame:
    """Beam search over one shard's samples; one beams row per finished hypothesis."""
    return decoder.decode_samples(shard, assistant=assistant, advance=advance)

