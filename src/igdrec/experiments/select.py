"""Selection on the validation split: the candidate with the best `selection.metric` (ties: the earlier one)."""

from __future__ import annotations

import json
from pathlib import Path

from igdrec.errors import IgdrecError
from igdrec.experiments.plan import Cell, RowPlan
from igdrec.rundir import RunDir


def choose(run_dir: Path, candidates: list[Cell], metric: str) -> tuple[dict | None, list[dict]]:
    """The candidate with the best valid `metric` (ties: the earlier one) and every candidate's score.

    Returns (None, partial scores) while some candidate has no metrics yet.
    """
    scores = []
    for cell in candidates:
        path = Path(run_dir) / "metrics" / f"{cell.metrics}.json"
        value = None
        if path.exists() and RunDir(run_dir).manifest(f"metrics/{cell.metrics}"):
            summary = json.loads(path.read_text())
            if metric not in summary:  # e.g. NDCG@10 of lists shorter than 10: the metrics stage drops it
                known = ", ".join(k for k in summary if k.startswith(("NDCG@", "HR@")))
                raise IgdrecError(f"{path}: has no {metric} to select by (it has {known}); raise num_beams / top_k or change selection.metric")
            value = summary[metric]
        scores.append({**cell.candidate, "metrics": cell.metrics, metric: value})
    if any(s[metric] is None for s in scores):
        return None, scores
    best = max(range(len(scores)), key=lambda i: (scores[i][metric], -i))
    return {k: scores[best][k] for k in ("sft", "beta", "alpha")}, scores


def selected_over(row: RowPlan) -> str | None:
    """What a row chooses on valid ("α", "fine-tune", "fine-tune and α"), or None for a fixed row."""
    varied = [what for what, key in (("fine-tune", "sft"), ("α", "alpha")) if len({c.candidate[key] for c in row.candidates}) > 1]
    return " and ".join(varied) or None


def resolve_test_cell(row: RowPlan, metric: str) -> Cell | None:
    if row.fixed is not None:
        return row.fixed
    chosen, _ = choose(row.candidates[0].steps[0].run_dir, row.candidates, metric)
    return None if chosen is None else row.make_test(chosen)
