"""Stage `metrics`: NDCG@K / HR@K, diversity, popularity and per-step entropy of a rerank (docs/method.md §7).

`--baseline NAME` scores a traditional baseline's `<run>/baseline/NAME/topk.parquet` with the same code.

Writes `<run>/metrics/<name>/` (stage.json, per_sample.parquet, metrics.json) and publishes a copy of the
summary as `<run>/metrics/<name>.json`. `compare` puts two results side by side with paired-bootstrap
95% intervals of the differences.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from rich.table import Table

from igdrec import metrics as M
from igdrec import options, schema, search_errors, tracking
from igdrec.config import MetricsConfig
from igdrec.console import console, format_value
from igdrec.errors import IgdrecError
from igdrec.ig import CatalogTrie
from igdrec.rundir import RunDir, StageWriter, write_json_atomic
from igdrec.runner import StagePlan, run_stage

PER_SAMPLE = "per_sample.parquet"


def run(config: MetricsConfig, run_dir: RunDir, force: bool = False) -> dict:
    return run_stage("metrics", config, run_dir, force)


def plan(config: MetricsConfig, run_dir: RunDir) -> StagePlan:
    run = run_dir
    source = _baseline_source(run, config.baseline) if config.baseline is not None else _rerank_source(run, config.rerank)
    data = run.require("data", hint="igdrec preprocess")
    ig = run.require("ig", hint="igdrec build-ig-index")
    name = config.name or source.name
    ks, note = cutoffs_within_lists(config.ks, source.list_bounds)
    config = dataclasses.replace(config, ks=ks)
    params = options.key_params(config) | {source.kind: source.name}
    inputs = source.inputs | {"data": data["fingerprint"], "ig": ig["fingerprint"]}
    return StagePlan("metrics", run, f"metrics/{name}", config, params, inputs, notes=[note] if note else [],
                     context={"name": name, "source": source})


def compute(plan: StagePlan, out: StageWriter) -> None:
    summary, per_sample = evaluate(plan.run, plan.context["source"], plan.config)
    with plan.tracker() as tracker:
        tracker.summary(tracking.scalars(summary))
    schema.conform(per_sample, "per_sample_metrics").write_parquet(out.path(PER_SAMPLE))
    write_json_atomic(out.path("metrics.json"), summary)
    out.rows["per_sample"] = per_sample.height
    out.stats = {k: summary[k] for k in summary if k.startswith(("NDCG", "HR"))}
    plan.context["summary"] = summary


def report(plan: StagePlan, manifest: dict, cached: bool) -> None:
    """Publish a copy of the summary as `<run>/metrics/<name>.json` and print it."""
    run, name = plan.run, plan.context["name"]
    summary = json.loads(run.artifact(f"metrics/{name}", "metrics.json").read_text()) if cached else plan.context["summary"]
    write_json_atomic(run.stage_dir("metrics") / f"{name}.json", summary)
    _print_summary(name, summary, plan.config.ks)
    source = plan.context["source"]
    if source.kind == "rerank":  # the decode's search errors, where `igdrec search-errors` scored this very decode
        decode = source.labels["decode"]
        found = run.manifest(f"search-errors/{decode}")
        if found is not None and found.get("inputs", {}).get("decode") == source.inputs["decode"]:
            console.print(search_errors.rates_line(decode, found["stats"]), soft_wrap=True)


def list_length_bounds(rerank: dict, decode: dict) -> dict[str, int]:
    """What caps the length of a rerank's lists: the decode's beams and the rerank's top_k."""
    bounds = {"decode num_beams": decode.get("params", {}).get("num_beams"), "rerank top_k": rerank.get("params", {}).get("top_k")}
    return {what: value for what, value in bounds.items() if isinstance(value, int)}


def cutoffs_within_lists(ks: list[int], bounds: dict[str, int]) -> tuple[list[int], str | None]:
    """The cut-offs K that the lists can tell apart, and a note naming those dropped. A list holds at most
    min(bounds) items, so HR@K and NDCG@K for a larger K would silently repeat the values at that length:
    such K are dropped, with a note that names them and the bound (e.g. {"decode num_beams": 10})."""
    if not bounds:
        return list(ks), None
    what, longest = min(bounds.items(), key=lambda item: item[1])
    kept = [k for k in ks if k <= longest]
    dropped = [k for k in ks if k > longest]
    if not kept:
        raise IgdrecError(f"--ks {','.join(map(str, ks))}: every cut-off exceeds the {longest} items a list holds ({what} {longest})")
    note = None
    if dropped:
        note = (f"[yellow]note:[/] dropped cut-off(s) {', '.join(map(str, dropped))}: lists hold at most {longest} items "
                f"({what} {longest}), so @{dropped[0]} would repeat @{longest}")
    return kept, note


@dataclass
class RankedSource:
    """Where the ranked lists come from: a rerank (of a decode) or a traditional baseline."""

    kind: str  # "rerank" | "baseline"
    name: str
    topk_path: Path
    split: str
    limit: int | None  # only the first `limit` samples of the split were ranked
    inputs: dict[str, str]  # upstream fingerprints for the cache key
    labels: dict[str, str]  # provenance written into the summary
    list_bounds: dict[str, int]  # what caps the lists' length, e.g. {"decode num_beams": 10}


def _rerank_source(run: RunDir, rerank: str | None) -> RankedSource:
    rerank_name = run.resolve_name("rerank", rerank, "--rerank")
    manifest = run.require(f"rerank/{rerank_name}", hint=f"igdrec rerank --decode DECODE --name {rerank_name}")
    decode_name = manifest["params"]["decode"]
    decode = run.require(f"decode/{decode_name}", hint=f"igdrec decode --sft SFT --name {decode_name}")
    return RankedSource(
        "rerank", rerank_name, run.artifact(f"rerank/{rerank_name}", "topk.parquet"),
        split=decode["params"]["split"], limit=decode["params"]["limit"],
        inputs={"rerank": manifest["fingerprint"], "decode": decode["fingerprint"]},
        labels={"rerank": rerank_name, "decode": decode["stage_path"].split("/", 1)[1]},
        list_bounds=list_length_bounds(manifest, decode),
    )


def _baseline_source(run: RunDir, baseline: str) -> RankedSource:
    manifest = run.require(f"baseline/{baseline}", hint=f"igdrec baseline --name {baseline}")
    return RankedSource(
        "baseline", baseline, run.artifact(f"baseline/{baseline}", "topk.parquet"),
        split=manifest["stats"]["split"], limit=None,
        inputs={"baseline": manifest["fingerprint"]},
        labels={"baseline": baseline, "model": manifest["params"]["model"]},
        list_bounds={"baseline top_k": manifest["params"]["top_k"]},
    )


def evaluate(run: RunDir, source: RankedSource, config: MetricsConfig) -> tuple[dict, pl.DataFrame]:
    split = source.split
    items = schema.read(run.artifact("data", "items.parquet"), "items")
    samples = schema.read(run.artifact("data", f"{split}.parquet"), "samples").sort("sample_id")
    n_split = samples.height
    if source.limit is not None:
        samples = samples.head(source.limit)  # the decode covered exactly these: every one of them counts
    topk = schema.read(source.topk_path, "topk").sort(["sample_id", "rank"])
    unknown = topk.filter(~pl.col("sample_id").is_in(samples["sample_id"].implode()))
    if unknown.height:
        raise IgdrecError(f"{source.topk_path}: sample {unknown['sample_id'][0]} is not among the {samples.height} ranked {split} samples")
    if config.limit is not None:
        if config.limit > samples.height:
            raise IgdrecError(f"--limit {config.limit}: {source.kind} {source.name} ranked only {samples.height} {split} samples")
        samples = samples.head(config.limit)  # e.g. a baseline scored on the samples a --limit'ed decode covered
        topk = topk.filter(pl.col("sample_id").is_in(samples["sample_id"].implode()))
    titles = dict(zip(items["item_id"].to_list(), items["title"].to_list()))
    lists = dict(topk.group_by("sample_id", maintain_order=True).agg("item_id").iter_rows())
    sample_ids = samples["sample_id"].to_list()
    predicted = [lists.get(s, []) for s in sample_ids]
    targets = samples["item_id"].to_list()
    ranks = M.match_ranks([[titles.get(i) for i in p] for p in predicted], [titles.get(t, "") for t in targets])
    per_sample_values = M.ranking_metrics(ranks, config.ks)

    trie = CatalogTrie.load(run.artifact("ig", "trie_nodes.parquet"), run.artifact("ig", "item_paths.parquet"))
    first_token = dict(zip(trie.item_ids.tolist(), trie.token[trie.item_path_nodes[trie.item_path_ptr[:-1]]].tolist()))
    head = [p[: config.diversity_k] for p in predicted]
    popularity, per_sample_popularity = _popularity(run, items, topk, source, head, config.head_share)
    summary: dict = {k: float(v.mean()) if len(v) else 0.0 for k, v in per_sample_values.items()}
    summary |= {
        **source.labels,
        "split": split,
        "n_samples": len(sample_ids),
        "n_split_samples": n_split,
        "limited": len(sample_ids) < n_split,
        "diversity_k": config.diversity_k,
        "diversity": M.diversity(head, first_token, catalog_size=items.height),
        "popularity": popularity,
        "entropy_per_step": M.entropy_per_step(trie, head, targets),
    }
    per_sample = pl.DataFrame(
        {"sample_id": sample_ids, "match_rank": [int(r) if r >= 0 else None for r in ranks]}
        | {k: v for k, v in per_sample_values.items()} | per_sample_popularity,
        schema_overrides={"match_rank": pl.Int32} | {name: pl.Float64 for name in per_sample_popularity},
    )
    return summary, per_sample


def _popularity(run: RunDir, items: pl.DataFrame, topk: pl.DataFrame, source: RankedSource, lists: list[list[int]],
                head_share: float) -> tuple[dict, dict[str, list]]:
    """`metrics.popularity` of the lists by training-target frequency (docs/method.md §7.2). A title is one
    item, as for the ranking metrics: the ids sharing a title pool their counts under the title's smallest id."""
    stripped = items.with_columns(pl.col("title").str.strip_chars())
    smallest = stripped.group_by("title").agg(pl.col("item_id").min().alias("title_id"))
    title_id = dict(stripped.join(smallest, on="title").select("item_id", "title_id").iter_rows())
    train_path = run.artifact("data", "train.parquet")
    targets = schema.read(train_path, "samples", columns=["item_id"])["item_id"]
    if targets.is_empty():
        raise IgdrecError(f"{train_path}: no training samples, so no item has a training frequency")
    for path, ids in ((train_path, targets), (source.topk_path, topk["item_id"])):
        unknown = ids.filter(~ids.is_in(items["item_id"].implode()))
        if unknown.len():
            raise IgdrecError(f"{path}: item {unknown[0]} is not in the catalog (data/items.parquet)")
    counts = dict.fromkeys(title_id.values(), 0)
    for item, n in targets.value_counts().iter_rows():
        counts[title_id[item]] += n
    return M.popularity([[title_id[i] for i in items_of_list] for items_of_list in lists], counts, head_share)


def _print_summary(name: str, summary: dict, ks) -> None:
    scope = f"{summary['n_samples']:,} of {summary['n_split_samples']:,} {summary['split']} samples"
    if summary["limited"]:
        scope += " (limited: only the first ranked samples count)"
    console.print(f"[bold]metrics {name}[/]: {scope}")
    table = Table()
    table.add_column("K", justify="right")
    table.add_column("NDCG@K", justify="right")
    table.add_column("HR@K", justify="right")
    for k in ks:
        table.add_row(str(k), f"{summary[f'NDCG@{k}']:.4f}", f"{summary[f'HR@{k}']:.4f}")
    console.print(table)
    div = summary["diversity"]
    console.print(
        f"diversity of the top-{summary['diversity_k']} lists: coverage {div['item_coverage']:.4f}, "
        f"same-first-token lists {div['same_first_token_share']:.4f}, item entropy {div['recommended_item_entropy']:.4f}"
    )
    pop = summary.get("popularity")
    if pop is None:
        console.print("popularity: not in this result (computed before igdrec measured it; rerun with --force)")
    elif pop["lists"]:
        console.print(
            f"popularity of the top-{summary['diversity_k']} lists: mean training frequency {pop['average_popularity']:.2f}, "
            f"long-tail share {pop['long_tail_share']:.4f} (head: the {pop['head_items']:,} most frequent of {pop['items']:,} items), "
            f"novelty {pop['novelty']:.3f} bits, never-trained share {pop['unseen_share']:.4f}"
        )
    else:
        console.print("popularity: no evaluated sample has a list")


def compare(names: list[str], run_dir: RunDir, bootstrap: int | None = None, seed: int = 0) -> dict:
    """Two metrics results side by side: values, B − A and a paired-bootstrap 95% interval."""
    run = run_dir
    names = [part for n in names for part in n.replace(",", " ").split()]
    if len(names) != 2:
        raise IgdrecError(f"--compare needs exactly two metrics names, got {len(names)}: {' '.join(names)}")
    resamples = MetricsConfig.bootstrap if bootstrap is None else bootstrap
    options.check_value(options.option_named(MetricsConfig, "bootstrap"), resamples, "--bootstrap")
    frames = []
    for n in names:
        options.check_artifact_name(n, "--compare")
    for n in names:
        rerank_hint = f"--rerank {n}" if run.manifest(f"rerank/{n}") is not None else f"--rerank RERANK --name {n}"
        run.require(f"metrics/{n}", hint=f"igdrec metrics {rerank_hint}")
        frames.append(schema.read(run.artifact(f"metrics/{n}", PER_SAMPLE), "per_sample_metrics").sort("sample_id"))
    a, b = frames
    if a["sample_id"].to_list() != b["sample_id"].to_list():
        raise IgdrecError(f"{run.artifact(f'metrics/{names[1]}', PER_SAMPLE)}: evaluates other samples than {names[0]}; paired comparison needs the same ones")
    # the popularity columns exist for results computed since igdrec measured them, and only for samples with a list
    columns = [c for c in a.columns if (c.startswith(("NDCG@", "HR@")) or c in M.POPULARITY) and c in b.columns]
    table = Table(title=f"{names[0]} (A) vs {names[1]} (B): {a.height:,} paired samples, {resamples} bootstrap resamples")
    for header in ("metric", "A", "B", "B − A", "95% CI"):
        table.add_column(header, justify="right" if header != "metric" else "left")
    result = {}
    for c in columns:
        both = a[c].is_not_null() & b[c].is_not_null()
        if not both.any():
            continue
        va, vb = a[c].filter(both).to_numpy(), b[c].filter(both).to_numpy()
        diff, lo, hi = M.paired_bootstrap(va, vb, resamples, seed)
        result[c] = {"A": float(va.mean()), "B": float(vb.mean()), "diff": diff, "ci_low": lo, "ci_high": hi, "samples": int(both.sum())}
        label = c if both.all() else f"{c} ({int(both.sum()):,} samples with both lists)"
        table.add_row(label, format_value(result[c]["A"]), format_value(result[c]["B"]), f"{diff:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]")
    console.print(table)
    return result

