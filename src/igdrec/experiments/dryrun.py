"""`igdrec grid --dry-run`: every step in order with its cache state (each stage's own plan says whether
its artifact is current) and the cost estimate; runs nothing."""

from __future__ import annotations

from pathlib import Path

from igdrec import runner
from igdrec.console import console
from igdrec.errors import IgdrecError
from igdrec.experiments.cost import estimate_seconds, pending_test_estimate
from igdrec.experiments.plan import Cell, Plan, RowPlan, Step, count_cells
from igdrec.experiments.select import resolve_test_cell, selected_over
from igdrec.rundir import MANIFEST, RunDir


def cache_state(step: Step, states: dict[tuple[str, str], str], run: RunDir | None = None) -> str:
    """`cached`, `to run` (no finished artifact, or one made with other settings) or `pending`.

    `pending`: an artifact exists but an upstream step still has to run, so whether it stays valid is
    only known then. `states` holds the states of the steps already looked at (upstream first). Whether
    the artifact is current is the stage's own answer: its plan's cache key against the manifest's.
    """
    run = run or RunDir(step.run_dir)
    if not (run.stage_dir(step.path) / MANIFEST).exists():
        return "to run"
    upstream = [states.get((step.dataset, p), "cached") for p in step.after]
    if any(s != "cached" for s in upstream):
        return "pending"
    try:
        plan = runner.plan_stage(step.stage, step.config, run)
    except IgdrecError:  # e.g. an upstream artifact changed after it was written
        return "to run"
    return "cached" if plan.path == step.path and runner.is_cached(plan) else "to run"


class _Unchanging(RunDir):
    """A run directory that nothing writes to while it is read: each artifact's check (which hashes its
    outputs) is made once, not again for every step whose plan reads it."""

    def __init__(self, root: Path):
        super().__init__(root)
        self._checked: dict[str, tuple[dict | None, str | None]] = {}

    def checked_manifest(self, stage_path: str) -> tuple[dict | None, str | None]:
        if stage_path not in self._checked:
            self._checked[stage_path] = super().checked_manifest(stage_path)
        return self._checked[stage_path]


def dry_run(plan: Plan) -> list[dict]:
    """Every step the grid would run, in order, with its cache state (runs nothing)."""
    rows = []
    states: dict[tuple[str, str], str] = {}
    seen = set()
    runs = {d.name: _Unchanging(d.run_dir) for d in plan.grid.datasets}

    def add(cell: Cell, row: RowPlan, role: str, note: dict[str, str]) -> None:
        for step in cell.steps:
            key = (step.dataset, step.path)
            if key in seen:
                continue
            seen.add(key)
            states[key] = cache_state(step, states, runs[step.dataset])
            rows.append({"dataset": step.dataset, "row": row.row, "role": role, "stage": step.stage, "path": step.path,
                         "state": states[key], "estimate_s": estimate_seconds(step, plan.grid), "note": note.get(step.path)})

    for row in plan.rows:
        # a fine-tune among several the row chooses from says so (where it first appears)
        sfts = list(dict.fromkeys(c.candidate["sft"] for c in row.candidates))
        note = {f"sft/{name}": f"candidate {i} of {len(sfts)}, chosen on valid by {plan.grid.selection.metric}"
                for i, name in enumerate(sfts, 1)} if len(sfts) > 1 else {}
        for cell in row.candidates:
            add(cell, row, "select on valid", note)
        test = resolve_test_cell(row, plan.grid.selection.metric)
        if test is not None:
            add(test, row, "test", {})
        else:
            stages = [s.stage for s in row.candidates[0].steps]
            rows.append({"dataset": row.dataset, "row": row.row, "role": "test", "stage": "+".join(stages[stages.index("decode"):]),
                         "path": f"({selected_over(row)} chosen on valid)", "state": "pending",
                         "estimate_s": pending_test_estimate(row, plan.grid), "note": None})
    return rows


def print_dry_run(plan: Plan) -> list[dict]:
    rows = dry_run(plan)
    colours = {"cached": "green", "to run": "yellow", "pending": "cyan"}
    console.print(f"[bold]grid {plan.grid.scale}[/]: {count_cells(plan)} cells over {len(plan.grid.datasets)} dataset(s) → {plan.grid.run_root}")
    width = max((len(r["row"]) for r in rows), default=4)
    dataset = None
    for r in rows:
        if r["dataset"] != dataset:
            dataset = r["dataset"]
            console.print(f"[bold]{dataset}[/] ({plan.grid.run_root / dataset})")
        est = "" if r["estimate_s"] is None else f"  ~{r['estimate_s'] / 60:.1f} min"
        role = "valid" if r["role"].startswith("select") else "test "
        state = f"[{colours[r['state']]}]{r['state']:<7}[/]"
        note = f"  [cyan]({r['note']})[/]" if r["note"] else ""
        console.print(f"  {state}  {r['row']:<{width}}  {role}  {r['stage']:<14} {r['path']}{est}{note}", soft_wrap=True)
    todo = [r for r in rows if r["state"] != "cached"]
    known = [r["estimate_s"] for r in todo if r["estimate_s"] is not None]
    console.print(f"{len(rows) - len(todo)} of {len(rows)} steps cached; {len(todo)} to run or pending "
                  "(pending: an upstream step runs first, or the test decode waits for the choice on valid)")
    if known:
        if len(plan.grid.datasets) > 1:
            per = {d.name: sum(r["estimate_s"] or 0 for r in todo if r["dataset"] == d.name) / 3600 for d in plan.grid.datasets}
            console.print("estimated per dataset: " + ", ".join(f"{k} {v:.1f} h" for k, v in per.items()), soft_wrap=True)
        console.print(f"estimated cost of what is left: {sum(known) / 3600:.2f} h "
                      f"(cost model `cost:` in {plan.grid.path}; {len(todo) - len(known)} steps without an estimate)", soft_wrap=True)
    console.print(f"chosen on the validation split by {plan.grid.selection.metric} (ties: the earlier candidate; the "
                  "reference picks α by test metrics, we do not):", soft_wrap=True)
    for dataset in plan.grid.datasets:
        for row in (r for r in plan.rows if r.dataset == dataset.name and r.candidates):
            sfts = list(dict.fromkeys(c.candidate["sft"] for c in row.candidates))
            alphas = list(dict.fromkeys(c.candidate["alpha"] for c in row.candidates))
            console.print(f"  {dataset.name} {row.row}: {selected_over(row)} among {len(row.candidates)} candidates "
                          f"(fine-tunes {', '.join(sfts)}; α {', '.join(f'{a:g}' for a in alphas)})", soft_wrap=True)
    return rows
