"""Stage `rerank`: a decode's beams → the final top-K per sample (`<run>/rerank/<name>/topk.parquet`).

Beams are deduplicated by item and by title and ranked by score (ties: item_id ascending). Optional:
D3's text-free assistant rescoring (`--tfa-scores FILE`) and BIGRec's L2 grounding of unconstrained
generations (`--grounding`).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from igdrec import reranking, schema
from igdrec.config import RerankConfig
from igdrec.console import console
from igdrec.errors import IgdrecError
from igdrec.ig import CatalogTrie
from igdrec.rundir import RunDir, StageWriter, fingerprint_file


def default_name(decode_name: str, config: RerankConfig) -> str:
    parts = [decode_name]
    if config.tfa_scores:
        parts.append(f"tfa{config.tfa_guidance:g}")
    if config.grounding:
        parts.append("l2")
    if config.top_k != RerankConfig.top_k:
        parts.append(f"k{config.top_k}")
    return "-".join(parts)


def run(config: RerankConfig, run_dir: RunDir, force: bool = False) -> dict:
    run = run_dir
    if config.top_k < 1:
        raise IgdrecError(f"--top-k {config.top_k}: must be positive")
    decode_name = run.resolve_name("decode", config.decode, "--decode")
    decode = run.require(f"decode/{decode_name}", hint=f"igdrec decode --name {decode_name}")
    name = config.name or default_name(decode_name, config)
    inputs = {"decode": decode["fingerprint"]}
    tfa_path = Path(config.tfa_scores) if config.tfa_scores else None
    if tfa_path is not None:
        if not tfa_path.is_file():
            raise IgdrecError(f"{tfa_path}: --tfa-scores file not found")
        inputs["tfa_scores"] = fingerprint_file(tfa_path)
        inputs["ig"] = run.require("ig", hint="igdrec build-ig-index")["fingerprint"]
    params = {
        "decode": decode_name,
        "top_k": config.top_k,
        "tfa_scores": str(tfa_path) if tfa_path else None,
        "tfa_guidance": config.tfa_guidance if tfa_path else None,
        "grounding": config.grounding,
    }
    with StageWriter(run, f"rerank/{name}", stage="rerank", params=params, inputs=inputs, force=force) as out:
        if out.cached:
            console.print(f"rerank [bold]{name}[/] is cached ({run.stage_dir(f'rerank/{name}')})")
            return out.manifest
        beams = schema.read(run.artifact(f"decode/{decode_name}", "beams.parquet"), "beams")
        if config.grounding:
            beams = _ground(beams, run, decode)
        if tfa_path is not None:
            trie = CatalogTrie.load(run.artifact("ig", "trie_nodes.parquet"), run.artifact("ig", "item_paths.parquet"))
            tfa = schema.read(tfa_path, "tfa_scores")
            q = reranking.tfa_probabilities(tfa, trie, tfa_path)
            scored = beams.filter(pl.col("item_id").is_not_null())
            beams = scored.with_columns(pl.Series("score", reranking.tfa_rescore(scored, trie, q, config.tfa_guidance, tfa_path)))
        topk = schema.conform(reranking.dedup_topk(beams, config.top_k), "topk")
        topk.write_parquet(out.path("topk.parquet"))
        out.rows["topk"] = topk.height
        stats = decode.get("stats", {})
        out.stats = {
            "decode": decode_name,
            "split": decode["params"]["split"],
            "limit": decode["params"]["limit"],
            "n_samples": stats.get("n_samples"),
            "samples_with_items": topk["sample_id"].n_unique(),
        }
    console.print(f"rerank wrote [bold]{name}[/] → {run.stage_dir(f'rerank/{name}')}/topk.parquet "
                  f"(next: igdrec metrics --rerank {name})")
    return out.manifest


def _ground(beams: pl.DataFrame, run: RunDir, decode: dict) -> pl.DataFrame:
    """Replace each generated text's item by the catalog item whose title embedding is nearest (L2)."""
    from igdrec.decoding import decode_model_spec
    from igdrec.modeling import load_model, load_tokenizer, pick_device

    items = schema.read(run.artifact("data", "items.parquet"), "items").sort("item_id")
    groups = items.with_columns(pl.col("title").str.strip_chars()).group_by("title", maintain_order=True).agg(pl.col("item_id").min())
    model_spec = decode_model_spec(run, decode)
    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec, device=pick_device("auto"), merge_adapter=True)
    catalog = reranking.last_token_embeddings(model, tokenizer, groups["title"].to_list())
    generated = reranking.last_token_embeddings(model, tokenizer, beams["title"].fill_null("").to_list())
    nearest = reranking.l2_grounding(generated, catalog)
    grounded_ids = groups["item_id"].gather(nearest)
    grounded_titles = groups["title"].gather(nearest)
    return beams.with_columns(pl.Series("item_id", grounded_ids), pl.Series("title", grounded_titles))
