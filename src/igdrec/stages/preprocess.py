"""Stage `preprocess`: a dataset -> <run>/data/items.parquet and {train,valid,test}.parquet (docs/method.md §2).

The source (ml-100k, recbole, amazon2018, amazon2023, d3-csv, interactions) yields items with dense ids and either raw
interactions, which are windowed and split temporally here, or ready-made splits (d3-csv).
"""

from __future__ import annotations

from datetime import datetime, timezone

import polars as pl

from igdrec import options, schema, sources
from igdrec.config import PreprocessConfig
from igdrec.console import console, print_table
from igdrec.errors import IgdrecError
from igdrec.prompt import category_word
from igdrec.rundir import RunDir, StageWriter
from igdrec.runner import StagePlan, run_stage
from igdrec.sources.tables import require_title_lengths
from igdrec.sources.windows import SPLITS, build_windows, require_nonempty_splits, temporal_split

STAGE_PATH = "data"
# Table order; the manifest stores stats with sorted keys, so a cached run restores this order.
STATS_ORDER = (
    "source", "category_word", "users", "items", "distinct_titles", "interactions", "interactions_per_user_mean",
    "interactions_per_user_min", "interactions_per_user_max", "density", "windows", "train", "valid", "test",
    "history_len_mean", "history_len_max", "title_chars_mean", "title_chars_max", "title_words_mean", "title_words_max",
    "train_target_items", "test_targets_unseen_in_train", "train_time_range", "valid_time_range", "test_time_range",
)


def run(config: PreprocessConfig, run_dir: RunDir, force: bool = False) -> dict:
    return run_stage("preprocess", config, run_dir, force)


def plan(config: PreprocessConfig, run_dir: RunDir) -> StagePlan:
    source = sources.get(config.source)
    word = config.category_word or category_word(config.source, sources.category(config))
    # Options of other sources are inert (config.py `only=`); input files enter by content, not by path.
    params = options.key_params(config) | {"category_word": word}
    inputs = source.input_files(config)
    return StagePlan("preprocess", run_dir, STAGE_PATH, config, params, inputs, context={"source": source, "word": word})


def compute(plan: StagePlan, out: StageWriter) -> None:
    config, source, word = plan.config, plan.context["source"], plan.context["word"]
    dataset = source.load(config)
    splits = dataset.splits
    if splits is None:
        windows = build_windows(dataset.interactions, config.history_len)
        if windows.height == 0:
            raise IgdrecError(f"{config.source}: no user has two interactions, so there is nothing to predict")
        splits = temporal_split(windows)
    require_nonempty_splits(splits, config.source, given=dataset.splits is not None)
    require_title_lengths(dataset.items, config.max_title_chars, config.source)
    items = schema.conform(dataset.items, "items")
    items.write_parquet(out.path("items.parquet"))
    out.rows["items"] = items.height
    for split in SPLITS:
        splits[split].write_parquet(out.path(f"{split}.parquet"))
        out.rows[split] = splits[split].height
    out.stats = {"source": config.source, "category_word": word} | dataset_stats(items, splits, dataset) | dataset.stats


def report(plan: StagePlan, manifest: dict, cached: bool) -> None:
    if not cached:
        console.print(f"preprocess: wrote {plan.run.stage_dir(STAGE_PATH)}")
    show_stats(manifest["stats"])


def show_stats(stats: dict) -> None:
    known = [k for k in STATS_ORDER if k in stats]
    print_table("preprocess statistics", [(k, stats[k]) for k in known + [k for k in stats if k not in STATS_ORDER]])


def dataset_stats(items: pl.DataFrame, splits: dict[str, pl.DataFrame], dataset: sources.Dataset) -> dict:
    samples = pl.concat([splits[s] for s in SPLITS])
    history = samples["history_item_ids"].list.len()
    title_chars = items["title"].str.len_chars()
    title_words = items["title"].str.split(" ").list.len()
    stats = {
        "users": samples["user_id"].n_unique(),
        "items": items.height,
        "distinct_titles": items["title"].n_unique(),
    }
    if dataset.interactions is not None:
        per_user = dataset.interactions.group_by("user_id").len()["len"]
        stats |= {
            "interactions": dataset.interactions.height,
            "interactions_per_user_mean": float(per_user.mean()),
            "interactions_per_user_min": int(per_user.min()),
            "interactions_per_user_max": int(per_user.max()),
            "density": dataset.interactions.height / (per_user.len() * items.height),
        }
    stats |= {"windows": samples.height} | {split: splits[split].height for split in SPLITS}
    stats |= {
        "history_len_mean": float(history.mean()),
        "history_len_max": int(history.max()),
        "title_chars_mean": float(title_chars.mean()),
        "title_chars_max": int(title_chars.max()),
        "title_words_mean": float(title_words.mean()),
        "title_words_max": int(title_words.max()),
        "train_target_items": splits["train"]["item_id"].n_unique(),
        "test_targets_unseen_in_train": int((~splits["test"]["item_id"].is_in(splits["train"]["item_id"].implode())).sum()),
    }
    if samples["timestamp"].null_count() < samples.height:
        for split in SPLITS:
            ts = splits[split]["timestamp"]
            if ts.len():
                stats[f"{split}_time_range"] = f"{_day(ts.min())} .. {_day(ts.max())}"
    return stats


def _day(seconds: int | None) -> str:
    return "?" if seconds is None else datetime.fromtimestamp(seconds, tz=timezone.utc).date().isoformat()
