"""Stage `rerank`: a decode's beams → the final top-K per sample (`<run>/rerank/<name>/topk.parquet`).

By default the beams are deduplicated by item and by title and ranked by score (ties: item_id
ascending). With `--grounding` (BIGRec, docs/method.md §6.5) the list is instead every catalog title
ranked by the L2 distance of its embedding to the embedding of the sample's top-1 generation, embedded
with the fine-tune's base model unless `grounding_model` names another; the catalog's embeddings are
cached per model in `<run>/grounding/`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from igdrec import options, reranking, schema
from igdrec.config import RerankConfig
from igdrec.console import progress_bar
from igdrec.errors import IgdrecError
from igdrec.rundir import RunDir, StageWriter, fingerprint_obj
from igdrec.runner import StagePlan, run_stage


def default_name(decode_name: str, config: RerankConfig) -> str:
    parts = [decode_name]
    if config.grounding:
        parts.append("l2")
    if config.top_k != RerankConfig.top_k:
        parts.append(f"k{config.top_k}")
    return "-".join(parts)


def run(config: RerankConfig, run_dir: RunDir, force: bool = False) -> dict:
    return run_stage("rerank", config, run_dir, force)


def plan(config: RerankConfig, run_dir: RunDir) -> StagePlan:
    run = run_dir
    decode_name = run.resolve_name("decode", config.decode, "--decode")
    decode = run.require(f"decode/{decode_name}", hint=f"igdrec decode --sft SFT --name {decode_name}")
    name = config.name or default_name(decode_name, config)
    inputs = {"decode": decode["fingerprint"]}
    params = options.key_params(config) | {"decode": decode_name}
    context = {"decode_name": decode_name, "decode": decode}
    if config.grounding:
        grounding_model = config.grounding_model or base_model(run, decode)
        inputs["ig"] = run.require("ig", hint="igdrec build-ig-index")["fingerprint"]
        params["grounding_model"] = grounding_model
        context["grounding_model"] = grounding_model
    return StagePlan("rerank", run, f"rerank/{name}", config, params, inputs, context=context,
                     next=f"igdrec metrics --rerank {name}", product="topk.parquet")


def compute(plan: StagePlan, out: StageWriter) -> None:
    config, run, decode_name, decode = plan.config, plan.run, plan.context["decode_name"], plan.context["decode"]
    beams = schema.read(run.artifact(f"decode/{decode_name}", "beams.parquet"), "beams")
    stats = decode.get("stats", {})
    out.stats = {
        "decode": decode_name,
        "split": decode["params"]["split"],
        "limit": decode["params"]["limit"],
        "n_samples": stats.get("n_samples"),
    }
    if config.grounding:
        grounding_model = plan.context["grounding_model"]
        topk, empty = _ground(beams, run, grounding_model, config, out.force)
        out.stats["grounding_model"] = grounding_model
        out.stats["empty_generations"] = empty
    else:
        topk = reranking.dedup_topk(beams, config.top_k)
    topk = schema.conform(topk, "topk")
    topk.write_parquet(out.path("topk.parquet"))
    out.rows["topk"] = topk.height
    out.stats["samples_with_items"] = topk["sample_id"].n_unique()


def base_model(run: RunDir, decode: dict) -> str:
    """The model BIGRec embeds with: the base model a decoded fine-tune started from (for a LoRA adapter,
    the base in its adapter_config.json), or the model a `--model` decode used as it is."""
    source = decode["params"].get("source")
    if "sft" in decode.get("inputs", {}) and source:
        sft = run.require(f"sft/{source}", hint=f"igdrec sft --name {source}")
        base = sft.get("params", {}).get("model")
        if base:
            return str(base)
        raise IgdrecError(f"{run.stage_dir(f'sft/{source}')}/stage.json: names no base model; pass --grounding-model")
    model = decode["params"].get("model")
    if not model:
        raise IgdrecError(f"{run.stage_dir('decode')}: the decode names no model; pass --grounding-model")
    return str(model)


def _ground(beams: pl.DataFrame, run: RunDir, model_spec: str, config: RerankConfig, force: bool) -> tuple[pl.DataFrame, int]:
    """BIGRec's grounding of every sample's top-1 generation: the `top_k` catalog titles nearest in L2."""
    from igdrec.modeling import load_model, load_tokenizer, pick_device

    device = pick_device(config.device)
    loaded: dict = {}

    def model_and_tokenizer():
        if not loaded:
            loaded["tokenizer"] = load_tokenizer(model_spec)
            loaded["model"] = load_model(model_spec, device=device)
        return loaded["model"], loaded["tokenizer"]

    titles, catalog = catalog_embeddings(run, model_spec, model_and_tokenizer, config.grounding_batch_size, force)
    top1 = (
        beams.sort("sample_id", "rank")
        .group_by("sample_id", maintain_order=True)
        .first()
        .with_columns(pl.col("title").fill_null("").str.strip_chars())
    )
    # An empty generation has no text to embed: its sample gets no items (a miss in every metric).
    empty = int((top1["title"] == "").sum())
    top1 = top1.filter(pl.col("title") != "")
    if top1.height == 0:
        return pl.DataFrame(schema={"sample_id": pl.Int64, "rank": pl.Int32, "item_id": pl.Int64, "score": pl.Float64}), empty
    model, tokenizer = model_and_tokenizer()
    generated = reranking.last_token_embeddings(model, tokenizer, top1["title"].to_list(), config.grounding_batch_size)
    rows, distances = reranking.l2_topk(generated, catalog, config.top_k)
    k = rows.shape[1]
    topk = pl.DataFrame({
        "sample_id": np.repeat(top1["sample_id"].to_numpy(), k),
        "rank": np.tile(np.arange(k, dtype=np.int32), top1.height),
        "item_id": titles["item_id"].to_numpy()[rows.ravel()],
        "score": -distances.ravel(),  # higher is better, as for beam scores
    })
    return topk, empty


def catalog_embeddings(run: RunDir, model_spec: str, model_and_tokenizer, batch_size: int, force: bool) -> tuple[pl.DataFrame, torch.Tensor]:
    """(distinct catalog titles, their embeddings), computed once per grounding model and catalog.

    Cached as `<run>/grounding/<model>/embeddings.parquet`, keyed by the model spec and the fingerprints of
    the data and the IG index (whose items are the decoding catalog): another decode grounded with the
    same model reuses it.
    """
    data = run.require("data", hint="igdrec preprocess")
    ig = run.require("ig", hint="igdrec build-ig-index")
    label = options.artifact_label(Path(model_spec.rstrip("/")).name)
    stage_path = f"grounding/{label}-{fingerprint_obj(model_spec)[:8]}"
    inputs = {"data": data["fingerprint"], "ig": ig["fingerprint"]}
    with StageWriter(run, stage_path, stage="grounding-embeddings", params={"model": model_spec}, inputs=inputs, force=force) as out:
        if not out.cached:
            items = schema.read(run.artifact("data", "items.parquet"), "items")
            catalog_ids = schema.read(run.artifact("ig", "item_paths.parquet"), "item_paths", columns=["item_id"])["item_id"]
            titles = reranking.catalog_titles(items, catalog_ids.to_numpy())
            model, tokenizer = model_and_tokenizer()
            chunks = []
            with progress_bar() as progress:
                task = progress.add_task(f"embedding {titles.height:,} catalog titles", total=titles.height)
                texts = titles["title"].to_list()
                for begin in range(0, len(texts), batch_size):
                    chunk = texts[begin:begin + batch_size]
                    chunks.append(reranking.last_token_embeddings(model, tokenizer, chunk, batch_size))
                    progress.advance(task, len(chunk))
            embeddings = torch.cat(chunks)
            frame = titles.with_columns(pl.Series("embedding", embeddings.numpy()).cast(pl.List(pl.Float32)))
            schema.conform(frame, "grounding_embeddings").write_parquet(out.path("embeddings.parquet"))
            out.rows["embeddings"] = frame.height
            out.stats = {"titles": frame.height, "dim": int(embeddings.shape[1])}
    frame = schema.read(run.artifact(stage_path, "embeddings.parquet"), "grounding_embeddings")
    flat = frame["embedding"].explode().to_numpy().astype(np.float32)
    embeddings = torch.from_numpy(flat.reshape(frame.height, -1))
    return frame.select("item_id", "title"), embeddings
