"""Parity of `igdrec baseline` with RecBole 1.2.1's own SASRec / GRU4Rec on the same windows.

RecBole needs older numpy/pandas than igdrec, so it runs in its own virtual environment:

    python -m venv /tmp/recbole-venv
    /tmp/recbole-venv/bin/pip install torch recbole==1.2.1 "numpy<2" "pandas<2.2" "scipy<1.13"

then, from the repository root, with a run directory that holds `data/` (and `ig/`, which the metrics
stage needs for its diversity statistics):

    PYTHONPATH=src python bench/bench_recbole_parity.py --run-dir RUN --recbole-python /tmp/recbole-venv/bin/python

The run's train/valid/test windows are written as RecBole "benchmark" atomic files (user_id,
item_id_list, item_id), so both libraries train on exactly the same history → target pairs and rank the
same test windows over all items (RecBole: every item it saw in the three files). Both train with the
same epochs cap, early-stopping patience and seed (RecBole validates on NDCG@10 here, as igdrec does).

Printed side by side, per model: RecBole's own test NDCG/Hit@5/10 (a hit is the target's item id),
igdrec's values by item id from its full-ranking probabilities (the same definition), and igdrec's
values by title through the metrics stage (what `igdrec metrics --baseline` reports).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from igdrec import schema, seqrec
from igdrec.config import BaselineConfig, MetricsConfig
from igdrec.rundir import RunDir
from igdrec.seqrec.evaluation import full_sort_scores
from igdrec.stages import baseline as baseline_stage
from igdrec.stages import metrics as metrics_stage

DATASET = "igdrec"
KS = (5, 10)

RECBOLE_RUNNER = textwrap.dedent('''
    import json, sys, time
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    settings = json.loads(sys.argv[1])
    config = Config(model=settings["model"], dataset=settings["dataset"], config_dict=settings["config"])
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    started = time.perf_counter()
    best_valid, _ = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    seconds = time.perf_counter() - started
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    print("RECBOLE_RESULT " + json.dumps({
        "test": {k: float(v) for k, v in test.items()}, "valid_ndcg@10": float(best_valid),
        "train_seconds": seconds, "n_items": int(dataset.item_num) - 1,
    }))
''')


def export_benchmark_files(run: RunDir, folder: Path) -> None:
    """The run's windows as RecBole atomic files `<dataset>.{train,valid,test}.inter`."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        samples = schema.read(run.artifact("data", f"{split}.parquet"), "samples").sort("sample_id")
        lines = ["user_id:token\titem_id_list:token_seq\titem_id:token"]
        for user, history, target in samples.select("user_id", "history_item_ids", "item_id").iter_rows():
            lines.append(f"{user}\t{' '.join(map(str, history))}\t{target}")
        (folder / f"{DATASET}.{split}.inter").write_text("\n".join(lines) + "\n")


def run_recbole(python: str, model: str, data_path: Path, epochs: int, patience: int, seed: int, checkpoints: Path) -> dict:
    config = {
        "data_path": str(data_path),
        "benchmark_filename": ["train", "valid", "test"],
        "alias_of_item_id": ["item_id_list"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"]},
        "MAX_ITEM_LIST_LENGTH": 10,
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "epochs": epochs,
        "stopping_step": patience,
        "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "group_by": "user", "order": "TO", "mode": "full"},
        "metrics": ["NDCG", "Hit"],
        "topk": list(KS),
        "valid_metric": "NDCG@10",
        "seed": seed,
        "use_gpu": False,
        "device": "cpu",
        "checkpoint_dir": str(checkpoints),
        "show_progress": False,
        "state": "WARNING",
    }
    settings = json.dumps({"model": {"sasrec": "SASRec", "gru4rec": "GRU4Rec"}[model], "dataset": DATASET, "config": config})
    # RecBole 1.2.1 reloads its own best checkpoint with torch.load, which torch ≥ 2.6 refuses by default
    env = os.environ | {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    done = subprocess.run([python, "-c", RECBOLE_RUNNER, settings], capture_output=True, text=True, cwd=checkpoints, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("RECBOLE_RESULT "):
            result = json.loads(line.removeprefix("RECBOLE_RESULT "))
            return {f"NDCG@{k}": result["test"][f"ndcg@{k}"] for k in KS} | {f"HR@{k}": result["test"][f"hit@{k}"] for k in KS} | {
                "valid NDCG@10": result["valid_ndcg@10"], "train s": result["train_seconds"], "items ranked": result["n_items"]}
    sys.exit(f"RecBole {model} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def igdrec_rows(run: RunDir, model: str, epochs: int, patience: int, seed: int) -> tuple[dict, dict]:
    name = f"parity-{model}"
    manifest = baseline_stage.run(BaselineConfig(model=model, name=name, epochs=epochs, patience=patience, seed=seed), run)
    by_title = metrics_stage.run(MetricsConfig(baseline=name, ks=list(KS)), run)["stats"]
    model, max_len = seqrec.load_recommender(run.stage_dir(f"baseline/{name}"))  # the trained model, as saved
    test = seqrec.SequenceData.from_samples(schema.read(run.artifact("data", "test.parquet"), "samples"), model.n_items, max_len)
    matrix = torch.cat([scores for _, scores in full_sort_scores(model, test, 4096, torch.device("cpu"))]).numpy()
    targets = test.target.numpy()
    target_p = matrix[np.arange(len(targets)), targets]
    ranks = (matrix > target_p[:, None]).sum(axis=1)  # 0-based rank of the target id in the full ranking
    by_id = {}
    for k in KS:
        by_id[f"NDCG@{k}"] = float(np.where(ranks < k, 1 / np.log2(ranks + 2), 0).mean())
        by_id[f"HR@{k}"] = float((ranks < k).mean())
    stats = manifest["stats"]
    extra = {"valid NDCG@10": stats["valid_NDCG@10"], "train s": stats["train_seconds"], "items ranked": stats["n_items"]}
    return by_id | extra, {k: by_title[k] for k in by_id} | extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="run directory with data/ and ig/")
    parser.add_argument("--recbole-python", required=True, help="python of the environment that has recbole==1.2.1")
    parser.add_argument("--models", nargs="+", default=["sasrec", "gru4rec"], choices=["sasrec", "gru4rec"])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", default=None, help="where the RecBole files go (default: <run>/recbole-parity)")
    args = parser.parse_args()

    run = RunDir(args.run_dir)
    workdir = Path(args.workdir or run.root / "recbole-parity").resolve()
    export_benchmark_files(run, workdir / "data" / DATASET)
    rows = []
    for model in args.models:
        started = time.perf_counter()
        rows.append((f"RecBole 1.2.1 {model} (by id)", run_recbole(args.recbole_python, model, workdir / "data", args.epochs, args.patience, args.seed, workdir)))
        print(f"RecBole {model}: {time.perf_counter() - started:.0f}s", flush=True)
        by_id, by_title = igdrec_rows(run, model, args.epochs, args.patience, args.seed)
        rows += [(f"igdrec {model} (by id)", by_id), (f"igdrec {model} (by title, metrics stage)", by_title)]
    columns = [f"NDCG@{k}" for k in KS] + [f"HR@{k}" for k in KS] + ["valid NDCG@10", "train s", "items ranked"]
    table = pl.DataFrame([{"row": label} | {c: values[c] for c in columns} for label, values in rows])
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=220, fmt_str_lengths=60, float_precision=4):
        print(f"epochs cap {args.epochs}, patience {args.patience}, seed {args.seed}")
        print(table)


if __name__ == "__main__":
    main()
