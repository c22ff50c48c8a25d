"""Stage `baseline`: a traditional sequential recommender (SASRec, GRU4Rec, most-popular) on the run's windows.

Reads <run>/data (items, train, valid, test). Trains on the train windows (history → target) with
full-softmax cross-entropy, early-stops on valid NDCG@10 (title match, the metrics stage's code), and
writes `<run>/baseline/<name>/`:
- `topk.parquet` (schema `topk`): the top-K of the full ranking of every test sample, one item per title,
  scored by `igdrec metrics --baseline NAME` exactly like an LLM's rerank;
- `model.safetensors` + `model.json` (seqrec.checkpoint): the trained model's weights and shape, from which
  D3's text-free assistant scores each decode batch's histories (nothing per sample: a dense probability
  per sample and item would be ≈14 GB per split at Books' 41,722 items × 85,376 samples);
- `training.json`: the per-epoch loss, valid NDCG@10 and seconds.

Where this differs from running RecBole 1.2 on the same windows (bench/bench_recbole_parity.py compares
the two): the padding index is no softmax class (RecBole's PAD id 0 is one during training and is masked
only at evaluation); early stopping watches NDCG@10 by title (RecBole's default is MRR@10 by item id);
the written lists hold one item per title. Like RecBole's sequential full-sort evaluation, items of the
history stay candidates.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch
from rich.progress import TextColumn

from igdrec import options, schema, seqrec, tracking
from igdrec.config import BaselineConfig
from igdrec.console import console, print_table, progress_bar
from igdrec.errors import IgdrecError
from igdrec.modeling import pick_device
from igdrec.rundir import RunDir, StageWriter, write_json_atomic
from igdrec.runner import StagePlan, run_stage
from igdrec.seqrec.models import count_parameters, is_trainable

VALID_METRIC = "NDCG@10"


def cache_params(config: BaselineConfig) -> dict:
    """The fields that change the result (option key=True), the architecture resolved to its defaults."""
    # How D3's assistant reads this baseline (its saved model; earlier igdrec wrote per-sample probabilities
    # instead): part of the key, so a baseline of that form reruns rather than counting as cached.
    form = {"assistant_from": "model"}
    if config.model == "pop":  # nothing is trained: only the top-K matters
        return {"model": "pop", "top_k": config.top_k} | form
    return options.key_params(config) | asdict(seqrec.ModelSettings.from_config(config)) | form


def run(config: BaselineConfig, run_dir: RunDir, force: bool = False) -> dict:
    return run_stage("baseline", config, run_dir, force)


def plan(config: BaselineConfig, run_dir: RunDir) -> StagePlan:
    data = run_dir.require("data", hint="igdrec preprocess")
    name = config.name or config.model
    return StagePlan("baseline", run_dir, f"baseline/{name}", config, cache_params(config), {"data": data["fingerprint"]},
                     context={"name": name}, next=f"igdrec metrics --baseline {name}")


def compute(plan: StagePlan, out: StageWriter) -> None:
    config, run = plan.config, plan.run
    device = pick_device(config.device)
    items = schema.read(run.artifact("data", "items.parquet"), "items").sort("item_id")
    n_items = items.height
    if items["item_id"].to_list() != list(range(n_items)):
        raise IgdrecError(f"{run.artifact('data', 'items.parquet')}: item ids must be dense 0..{n_items - 1}")
    titles = items["title"].to_list()
    frames = {split: schema.read(run.artifact("data", f"{split}.parquet"), "samples") for split in ("train", "valid", "test")}
    max_len = max(int(f["history_item_ids"].list.len().max() or 1) for f in frames.values())
    splits = {
        split: seqrec.SequenceData.from_samples(f, n_items, max_len, source=str(run.artifact("data", f"{split}.parquet")))
        for split, f in frames.items()
    }
    if not len(splits["train"]):
        raise IgdrecError(f"{run.artifact('data', 'train.parquet')}: no training windows")

    with plan.tracker() as tracker:
        torch.manual_seed(config.seed)  # the initial weights
        model = seqrec.build_model(config.model, n_items, max_len, seqrec.ModelSettings.from_config(config), splits["train"].target.numpy())
        model.to(device)
        evaluator = seqrec.RankingEvaluator(splits["valid"], titles, ks=[10], batch_size=config.eval_batch_size, device=device)
        result = _train(model, config, splits["train"], evaluator, device, tracker) if is_trainable(model) else None

        topk = schema.conform(seqrec.topk_frame(model, splits["test"], config.top_k, titles, config.eval_batch_size, device), "topk")
        topk.write_parquet(out.path("topk.parquet"))
        seqrec.save_recommender(model, out.partial_dir, config.model, max_len, seqrec.ModelSettings.from_config(config))
        out.rows["topk"] = topk.height
        valid_ndcg = result.best_valid if result else evaluator.evaluate(model)[VALID_METRIC]
        out.stats = {
            "model": config.model,
            "split": "test",
            "n_items": n_items,
            "max_len": max_len,
            "parameters": count_parameters(model) if is_trainable(model) else 0,
            "epochs_run": result.epochs_run if result else 0,
            "best_epoch": result.best_epoch if result else 0,
            "stopped_early": result.stopped_early if result else False,
            f"valid_{VALID_METRIC}": valid_ndcg,
            "train_seconds": round(result.train_seconds, 2) if result else 0.0,
            "seconds_per_epoch": round(result.train_seconds / max(result.epochs_run, 1), 3) if result else 0.0,
            "cpu_seconds_per_epoch": round(sum(r.cpu_seconds for r in result.history) / max(result.epochs_run, 1), 3) if result else 0.0,
        }
        write_json_atomic(out.path("training.json"), {"history": [asdict(r) for r in result.history] if result else []})
        tracker.summary(tracking.scalars(out.stats))
    plan.context["stats"] = out.stats  # as computed, before the manifest's JSON round trip


def report(plan: StagePlan, manifest: dict, cached: bool) -> None:
    if not cached:
        name = plan.context["name"]
        print_table(f"baseline {name}", {k: v for k, v in plan.context["stats"].items() if k not in ("split",)})


def _train(model, config: BaselineConfig, train: seqrec.SequenceData, evaluator: seqrec.RankingEvaluator, device: torch.device,
           tracker: tracking.Tracker) -> seqrec.BaselineTrainResult:
    with progress_bar(TextColumn("{task.fields[status]}")) as progress:
        task = progress.add_task(f"train {config.model}", total=config.epochs, status="")

        def on_epoch(record: seqrec.EpochRecord) -> None:
            status = f"loss {record.loss:.4f}  valid {VALID_METRIC} {record.valid:.4f}  {record.seconds:.1f}s/epoch"
            progress.update(task, advance=1, status=status)
            tracker.log(tracking.scalars({"train": {"loss": record.loss, "epoch_seconds": record.seconds},
                                          "valid": {VALID_METRIC: record.valid}}), record.epoch)

        started = time.perf_counter()
        result = seqrec.Trainer(config, device).fit(model, train, lambda m: evaluator.evaluate(m)[VALID_METRIC], on_epoch)
        progress.update(task, total=result.epochs_run, completed=result.epochs_run)
    console.print(
        f"{config.model}: {result.epochs_run} epochs in {time.perf_counter() - started:.1f}s"
        f"{' (early stop)' if result.stopped_early else ''}; best valid {VALID_METRIC} {result.best_valid:.4f} at epoch {result.best_epoch}"
    )
    return result
