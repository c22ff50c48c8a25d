"""The report's figures (PNG, matplotlib's Agg backend): the paper's Figs. 1–3, CE by IG group, NDCG@10 vs α.

Each function draws from artifact data handed to it and returns (file name, caption). matplotlib is
imported lazily so that the rest of igdrec works without it.
"""

from __future__ import annotations

from pathlib import Path

from igdrec.errors import IgdrecError


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise IgdrecError("figures need matplotlib (pip install matplotlib); the tables were written without them") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()
    _pyplot().close(fig)


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, title, a light grid and the legend: every panel of every figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def _points(values: list, steps: list) -> tuple[list, list]:
    pairs = [(s, v) for s, v in zip(steps, values) if v is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def entropy_by_step(series: dict[str, dict], path: Path, dataset: str) -> str:
    """Figs. 1–2: mean prefix entropy H(y≤t) per decoding step, predicted top-10 vs ground truth."""
    plt = _pyplot()
    n = len(series)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False, sharey=True)
    for ax, (label, data) in zip(axes.flat, series.items()):
        for kind, style in (("predicted", "-o"), ("ground_truth", "--s")):
            x, y = _points(data[kind], data["step"])
            ax.plot(x, y, style, markersize=3, label="predicted top-10" if kind == "predicted" else "ground truth")
        _label(ax, "decoding step t (tokens)", "mean prefix entropy H(y≤t) (nats)", label)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{dataset}: prefix entropy by decoding step")
    _save(fig, path)
    return (f"{dataset}: mean trie entropy of the prefix after t tokens of the predicted top-10 items and of the "
            "ground-truth items (paper Figs. 1–2); a higher predicted curve means the search keeps low-IG tokens.")


def entropy_difference(series: dict[str, dict], path: Path, dataset: str) -> str:
    """Fig. 3: predicted minus ground-truth prefix entropy per step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, data in series.items():
        steps = [s for s, p, g in zip(data["step"], data["predicted"], data["ground_truth"]) if p is not None and g is not None]
        diff = [p - g for p, g in zip(data["predicted"], data["ground_truth"]) if p is not None and g is not None]
        ax.plot(steps, diff, "-o", markersize=3, label=label)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    _label(ax, "decoding step t (tokens)", "H(predicted) − H(ground truth) (nats)", f"{dataset}: entropy difference, prediction − ground truth")
    _save(fig, path)
    return f"{dataset}: predicted minus ground-truth prefix entropy per decoding step (paper Fig. 3); IGD should shrink the gap."


# train_log columns per IG group: three groups (zero / low / high IG) once the log has them, else two.
CE_GROUPS = (("ce_zero_ig", "zero IG"), ("ce_low_ig", "low IG"), ("ce_high_ig", "high IG"), ("ce_positive_ig", "positive IG"))


def ce_by_ig_group(logs: dict, path: Path, dataset: str) -> str:
    """§4.2.1: training cross-entropy of each IG group over the optimiser steps, one panel per fine-tune."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(logs), figsize=(5.2 * len(logs), 3.8), squeeze=False, sharey=True)
    for ax, (label, log) in zip(axes.flat, logs.items()):
        train = log.filter(log["split"] == "train").sort("step")
        groups = [(c, g) for c, g in CE_GROUPS if c in train.columns and train[c].null_count() < train.height]
        if any(c == "ce_low_ig" for c, _ in groups):
            groups = [(c, g) for c, g in groups if c != "ce_positive_ig"]
        for column, group in groups:
            part = train.select("step", column).drop_nulls()
            ax.plot(part["step"].to_list(), part[column].to_list(), label=group)
        _label(ax, "optimiser step", "training cross-entropy (nats/token)", label)
    fig.suptitle(f"{dataset}: training CE by IG group")
    _save(fig, path)
    return (f"{dataset}: mean cross-entropy per target token of each IG group over training, plain vs IGD fine-tuning "
            "(paper §4.2.1: zero-IG tokens are learnt fast, high-IG ones stay hard).")


def metric_vs_alpha(curves: dict[str, list[tuple[float, float]]], path: Path, dataset: str, metric: str) -> str:
    """Validation metric against the decoding calibration α, one line per row that selects α."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, points in curves.items():
        points = sorted(points)
        ax.plot([a for a, _ in points], [v for _, v in points], "-o", markersize=4, label=label)
    _label(ax, "decoding calibration α (w_d = 1 − α·IG~)", f"{metric} on the validation samples", f"{dataset}: {metric} against α (validation)")
    _save(fig, path)
    return f"{dataset}: validation {metric} of each α candidate; the best one (earliest on ties) is the α decoded on test."


def search_errors_vs_alpha(curves: dict[str, list[tuple[float, float]]], path: Path, dataset: str) -> str:
    """Search-error rate against the decoding calibration α, one line per row, split and fine-tune."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, points in curves.items():
        points = sorted(points)
        ax.plot([a for a, _ in points], [v for _, v in points], "-o", markersize=4, label=label)
    _label(ax, "decoding calibration α (w_d = 1 − α·IG~)", "search-error rate", f"{dataset}: search errors against α")
    _save(fig, path)
    return (f"{dataset}: share of samples whose ground truth beam search lost although it scores above the K-th "
            "returned item (docs/method.md §6.8), per α; valid lines are the selection's candidates, test the chosen α.")
