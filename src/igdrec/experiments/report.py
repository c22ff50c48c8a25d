"""Tables 1–4, figures and a README of a grid run, rendered from its artifacts only (nothing recomputed).

Every score in `table1.csv`/`table2.csv` is read from the row's `metrics/<name>.json`; the Improvement
rows add a paired-bootstrap 95% interval over the test samples from the two rows' `per_sample.parquet`
(`metrics.paired_bootstrap`). The paper's own numbers appear only in columns whose header says
`paper`.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import polars as pl

from igdrec import schema
from igdrec.experiments.grid_config import CONFIG_COPY, GRID_STATE, REPORT_METRICS, WEIGHTINGS, GridConfig
from igdrec.experiments.plan import Cell, Plan, RowPlan, fine_tunes
from igdrec.experiments.rows import IMPROVEMENTS, ROWS, SEARCH_ERROR_ROWS, TABLE1_ROWS, TABLE2_ROWS
from igdrec.experiments.select import choose, resolve_test_cell
from igdrec.console import console, err_console
from igdrec.errors import IgdrecError
from igdrec.metrics import POPULARITY, paired_bootstrap
from igdrec.rundir import RunDir

METRICS = REPORT_METRICS  # a result without one of them (an older grid's cut-offs) shows "—" there
SHORT = {"NDCG@5": "N@5", "NDCG@10": "N@10", "HR@5": "H@5", "HR@10": "H@10"}
BOOTSTRAP = 1000
REPORTS = "reports"

# The paper's numbers (Qwen2.5-1.5B, Amazon 2018), for the columns labelled `paper` only.
PAPER_TABLE1 = {  # dataset -> row -> (N@5, N@10, H@5, H@10)
    "Books": {"gru4rec": (0.0060, 0.0078, 0.0094, 0.0149), "sasrec": (0.0097, 0.0123, 0.0146, 0.0226),
              "bigrec": (0.0190, 0.0211, 0.0245, 0.0309), "bigrec+pos": (0.0197, 0.0218, 0.0255, 0.0319),
              "bigrec+cft": (0.0195, 0.0218, 0.0250, 0.0321), "bigrec+igd": (0.0267, 0.0294, 0.0334, 0.0419),
              "d3": (0.0212, 0.0228, 0.0266, 0.0315), "d3+pos": (0.0221, 0.0237, 0.0275, 0.0324),
              "d3+cft": (0.0219, 0.0236, 0.0275, 0.0327), "d3+igd": (0.0291, 0.0313, 0.0356, 0.0424)},
    "Games": {"gru4rec": (0.0169, 0.0221, 0.0261, 0.0423), "sasrec": (0.0237, 0.0290, 0.0338, 0.0502),
              "bigrec": (0.0317, 0.0381, 0.0430, 0.0631), "bigrec+pos": (0.0319, 0.0396, 0.0423, 0.0665),
              "bigrec+cft": (0.0349, 0.0414, 0.0482, 0.0686), "bigrec+igd": (0.0423, 0.0507, 0.0576, 0.0833),
              "d3": (0.0415, 0.0477, 0.0581, 0.0773), "d3+pos": (0.0429, 0.0489, 0.0581, 0.0767),
              "d3+cft": (0.0437, 0.0499, 0.0613, 0.0806), "d3+igd": (0.0518, 0.0598, 0.0705, 0.0946)},
    "Toys": {"gru4rec": (0.0200, 0.0238, 0.0275, 0.0392), "sasrec": (0.0356, 0.0398, 0.0473, 0.0745),
             "bigrec": (0.0553, 0.0623, 0.0736, 0.0951), "bigrec+pos": (0.0561, 0.0631, 0.0741, 0.0958),
             "bigrec+cft": (0.0561, 0.0630, 0.0746, 0.0961), "bigrec+igd": (0.0577, 0.0656, 0.0771, 0.1014),
             "d3": (0.0634, 0.0698, 0.0833, 0.1029), "d3+pos": (0.0644, 0.0702, 0.0850, 0.1029),
             "d3+cft": (0.0640, 0.0704, 0.0840, 0.1036), "d3+igd": (0.0658, 0.0726, 0.0868, 0.1082)},
    "CDs": {"gru4rec": (0.0248, 0.0288, 0.0342, 0.0467), "sasrec": (0.0477, 0.0535, 0.0647, 0.0824),
            "bigrec": (0.0502, 0.0553, 0.0623, 0.0782), "bigrec+pos": (0.0511, 0.0566, 0.0632, 0.0802),
            "bigrec+cft": (0.0509, 0.0566, 0.0631, 0.0810), "bigrec+igd": (0.0540, 0.0593, 0.0669, 0.0833),
            "d3": (0.0716, 0.0767, 0.0882, 0.1040), "d3+pos": (0.0729, 0.0779, 0.0902, 0.1053),
            "d3+cft": (0.0736, 0.0786, 0.0917, 0.1069), "d3+igd": (0.0748, 0.0801, 0.0929, 0.1092)},
}
PAPER_TABLE2 = {  # dataset -> Table-2 label -> values; IGD's Games row differs from Table 1's in the paper
    "Books": {"IGD": (0.0291, 0.0313, 0.0356, 0.0424), "w/o w_d": (0.0290, 0.0312, 0.0355, 0.0422),
              "w/o w_t": (0.0212, 0.0229, 0.0268, 0.0318), "w/o both": (0.0212, 0.0227, 0.0266, 0.0314)},
    "Games": {"IGD": (0.0520, 0.0610, 0.0711, 0.0991), "w/o w_d": (0.0515, 0.0593, 0.0700, 0.0938),
              "w/o w_t": (0.0414, 0.0484, 0.0575, 0.0790), "w/o both": (0.0415, 0.0477, 0.0581, 0.0773)},
    "Toys": {"IGD": (0.0658, 0.0726, 0.0868, 0.1082), "w/o w_d": (0.0653, 0.0719, 0.0861, 0.1063),
             "w/o w_t": (0.0640, 0.0711, 0.0843, 0.1060), "w/o both": (0.0634, 0.0698, 0.0833, 0.1029)},
    "CDs": {"IGD": (0.0748, 0.0801, 0.0929, 0.1092), "w/o w_d": (0.0751, 0.0800, 0.0926, 0.1077),
            "w/o w_t": (0.0718, 0.0768, 0.0887, 0.1041), "w/o both": (0.0716, 0.0767, 0.0882, 0.1040)},
}
PAPER_TABLE3 = {"plain": 1.0, "pos": 1.0275, "cft": 2.0529, "igd": 1.0354}
PAPER_TABLE4 = {  # items, train, valid, test, target tokens, zero-IG tokens, zero-IG share (%)
    "Books": (41722, 682998, 85376, 85376, 7183839, 5241997, 72.97),
    "Games": (11037, 201613, 25202, 25203, 2128430, 1292171, 60.71),
    "Toys": (11252, 112755, 14095, 14096, 1530370, 1098070, 71.75),
    "CDs": (14239, 148685, 18586, 18587, 805786, 450960, 55.96),
}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _metrics(cell: Cell | None) -> dict | None:
    if cell is None:
        return None
    run = RunDir(cell.steps[0].run_dir)
    if run.manifest(f"metrics/{cell.metrics}") is None:
        return None
    return _read_json(run.root / "metrics" / cell.metrics / "metrics.json")


def _per_sample(cell: Cell) -> pl.DataFrame:
    run = RunDir(cell.steps[0].run_dir)
    return schema.read(run.artifact(f"metrics/{cell.metrics}", "per_sample.parquet"), "per_sample_metrics").sort("sample_id")


def improvement(base: Cell, better: Cell, metric: str, base_value: float, resamples: int = BOOTSTRAP) -> dict:
    """Relative improvement (%) of `better` over `base` and the paired-bootstrap 95% CI of the difference."""
    a, b = _per_sample(base), _per_sample(better)
    if a["sample_id"].to_list() != b["sample_id"].to_list():
        raise IgdrecError(f"metrics/{better.metrics}: evaluates other test samples than metrics/{base.metrics}; cannot pair them")
    diff, lo, hi = paired_bootstrap(a[metric].to_numpy(), b[metric].to_numpy(), resamples, seed=0)
    rel = 100.0 * diff / base_value if base_value else None
    return {"diff": diff, "ci_low": lo, "ci_high": hi, "rel_pct": rel}


def _f(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."], capture_output=True, text=True, check=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        from importlib import metadata

        return f"unknown (not a git checkout; igdrec {metadata.version('igdrec')})"


class _Collected:
    """The plan's rows resolved against the artifacts of one grid run."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.by_key: dict[tuple[str, str], RowPlan] = {(r.dataset, r.row): r for r in plan.rows}
        self.test: dict[tuple[str, str], Cell | None] = {}
        self.selection: dict[tuple[str, str], list[dict]] = {}
        metric = plan.grid.selection.metric
        for key, row in self.by_key.items():
            self.test[key] = resolve_test_cell(row, metric)
            if row.candidates:
                self.selection[key] = choose(row.candidates[0].steps[0].run_dir, row.candidates, metric)[1]

    def cell(self, dataset: str, row: str) -> Cell | None:
        return self.test.get((dataset, row))

    def values(self, dataset: str, row: str) -> dict | None:
        return _metrics(self.cell(dataset, row))


def _settings(cell: Cell | None, values: dict | None) -> tuple[str | None, float | None, float | None]:
    """(fine-tune, its β, decoding α) as recorded by the artifacts behind a metrics result."""
    if cell is None or values is None or "decode" not in values:
        return None, None, None
    run = RunDir(cell.steps[0].run_dir)
    decode = run.manifest(f"decode/{values['decode']}") or {}
    params = decode.get("params", {})
    sft_name = params.get("source")
    sft = run.manifest(f"sft/{sft_name}") if sft_name else None
    beta = sft["params"].get("beta") if sft else None
    return sft_name, beta, params.get("alpha")


def table1(c: _Collected, out: Path) -> list[dict]:
    records = []
    md = ["# Table 1: performance comparison (test split)", ""]
    for ds in c.plan.grid.datasets:
        paper = PAPER_TABLE1.get(ds.paper or "")
        header = ["Method", *[SHORT[m] for m in METRICS], "samples", "α", "β"]
        if paper:
            header += [f"paper {SHORT[m]} ({ds.paper})" for m in METRICS]
        rows = []
        for row in TABLE1_ROWS:
            key = (ds.name, row)
            if key not in c.by_key:
                continue
            cell, values = c.cell(*key), c.values(*key)
            sft, beta, alpha = _settings(cell, values)
            record = {"dataset": ds.name, "row": row, "method": ROWS[row]["label"], "kind": "score",
                      "metrics": cell.metrics if values else None, "n_samples": values["n_samples"] if values else None,
                      "sft": sft, "beta": beta, "alpha": alpha}
            record |= {m: values.get(m) if values else None for m in METRICS}
            if paper and row in paper:
                record |= {f"paper_{m}": v for m, v in zip(METRICS, paper[row])}
            records.append(record)
            line = [ROWS[row]["label"], *[_f(record[m]) for m in METRICS], str(record["n_samples"] or "—"),
                    "" if record["alpha"] is None else f"{record['alpha']:g}", "" if record["beta"] is None else f"{record['beta']:g}"]
            if paper:
                line += [_f(v) for v in paper.get(row, (None,) * 4)]
            rows.append(line)
            for base, better in IMPROVEMENTS:
                if row == better and (ds.name, base) in c.by_key:
                    imp = _improvement_record(c, ds, base, better, paper)
                    if imp:
                        records.append(imp)
                        cells = [_f(None) if imp[f"diff_{m}"] is None
                                 else f"{imp[m]:+.1f}% (Δ {imp[f'diff_{m}']:+.4f} [{imp[f'ci_low_{m}']:+.4f}, {imp[f'ci_high_{m}']:+.4f}])"
                                 if imp[m] is not None else f"Δ {imp[f'diff_{m}']:+.4f} [{imp[f'ci_low_{m}']:+.4f}, {imp[f'ci_high_{m}']:+.4f}]"
                                 for m in METRICS]
                        line = ["*Improvement*", *cells, "", "", ""]
                        if paper:
                            line += [f"{100 * (p1 - p0) / p0:+.1f}%" for p0, p1 in zip(paper[base], paper[better])]
                        rows.append(line)
        md += [f"## {ds.name}", "", _md_table(header, rows), ""]
        counts = {r["n_samples"] for r in records if r["dataset"] == ds.name and r["kind"] == "score" and r["n_samples"]}
        if len(counts) > 1:
            md += [f"**The rows above were scored on different numbers of test samples ({', '.join(map(str, sorted(counts)))}); "
                   "compare rows with the same count only.**", ""]
    md += ["Improvement: relative change of +IGD over its base row (IGD − base) / base, then Δ = IGD − base with its "
           "paired-bootstrap 95% interval over the test samples (resamples: the metrics `bootstrap` setting, default 1000). "
           "**What the interval covers:** test-sample noise only — both rows' lists are held fixed and the test samples are "
           "resampled in pairs — for one fine-tuning run per row (one seed); the variation between fine-tuning seeds and the "
           "choice of α/β on validation are not in it. α, and the fine-tune where a weighting lists candidates (IGD β, "
           "Pos β, CFT β × α), were chosen on the validation split; the paper's columns are the paper's own numbers (Qwen2.5-1.5B, full Amazon test sets), "
           "never ours."]
    (out / "table1.md").write_text("\n".join(md) + "\n")
    _write_csv(out / "table1.csv", records)
    return records


def beyond_accuracy(c: _Collected, out: Path) -> list[dict]:
    """Coverage and popularity of Table 1's rows' top-K lists (docs/method.md §7.2), beside Table 1."""
    records = []
    md = ["# Beyond accuracy: coverage and popularity of the recommended items (test split)", ""]
    for ds in c.plan.grid.datasets:
        rows = []
        for row in TABLE1_ROWS:
            if (ds.name, row) not in c.by_key:
                continue
            values = c.values(ds.name, row) or {}
            pop = values.get("popularity") or {}  # absent from a result computed before igdrec measured it
            record = {"dataset": ds.name, "row": row, "method": ROWS[row]["label"], "metrics": c.cell(ds.name, row).metrics if values else None,
                      "k": values.get("diversity_k"), "item_coverage": values.get("diversity", {}).get("item_coverage")}
            record |= {m: pop.get(m) for m in POPULARITY} | {"head_share": pop.get("head_share"), "head_items": pop.get("head_items")}
            records.append(record)
            rows.append([record["method"], str(record["k"] or "—"), _f(record["item_coverage"]), _f(record["average_popularity"], 2),
                         _f(record["long_tail_share"]), _f(record["novelty"], 3), _f(record["unseen_share"]),
                         "—" if record["head_items"] is None else f"{record['head_share']:g} ({record['head_items']:,} items)"])
        md += [f"## {ds.name}", "", _md_table(["Method", "K", "coverage", "popularity", "long-tail share", "novelty (bits)",
                                                "never-trained share", "head share"], rows), ""]
    md += ["Over each row's top-K lists (K = the metrics `diversity_k`): coverage = distinct recommended items / catalog items; "
           "popularity = mean training-target frequency of the recommended items; long-tail share = share of recommended items "
           "outside the head (the most frequent `head_share` of the catalog's items by training-target frequency); novelty = mean "
           "−log2 p(i), p(i) = frequency / training samples, an item never a training target counted as seen once; "
           "never-trained share = share of recommended items never a training target. Each is averaged over the samples' lists; "
           "items sharing a title count as one. — : not in the row's metrics result (computed before igdrec measured it)."]
    (out / "beyond_accuracy.md").write_text("\n".join(md) + "\n")
    _write_csv(out / "beyond_accuracy.csv", records)
    return records


def _improvement_record(c: _Collected, ds, base: str, better: str, paper) -> dict | None:
    a, b = c.cell(ds.name, base), c.cell(ds.name, better)
    va, vb = c.values(ds.name, base), c.values(ds.name, better)
    if not (a and b and va and vb):
        return None
    record = {"dataset": ds.name, "row": f"improvement:{better}", "method": "Improvement", "kind": "improvement",
              "metrics": f"{b.metrics} vs {a.metrics}", "n_samples": vb["n_samples"], "sft": None, "beta": None, "alpha": None}
    resamples = int(ds.stages.get("metrics", {}).get("bootstrap", BOOTSTRAP))
    for m in METRICS:
        if m not in va or m not in vb:
            record |= {m: None, f"diff_{m}": None, f"ci_low_{m}": None, f"ci_high_{m}": None}
            continue
        imp = improvement(a, b, m, va[m], resamples)
        record |= {m: imp["rel_pct"], f"diff_{m}": imp["diff"], f"ci_low_{m}": imp["ci_low"], f"ci_high_{m}": imp["ci_high"]}
    if paper and base in paper:
        record |= {f"paper_{m}": 100 * (p1 - p0) / p0 for m, p0, p1 in zip(METRICS, paper[base], paper[better])}
    return record


def _write_csv(path: Path, records: list[dict]) -> None:
    columns: list[str] = []
    for r in records:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("" if r.get(k) is None else repr(r[k]) if isinstance(r.get(k), float) else r[k]) for k in columns})


def table2(c: _Collected, out: Path) -> list[dict]:
    records = []
    md = ["# Table 2: ablation on the D3 base (test split)", ""]
    for ds in c.plan.grid.datasets:
        paper = PAPER_TABLE2.get(ds.paper or "")
        header = ["Method", *[SHORT[m] for m in METRICS], "α", "metrics"]
        if paper:
            header += [f"paper {SHORT[m]} ({ds.paper})" for m in METRICS]
        rows = []
        for label, row in TABLE2_ROWS:
            if (ds.name, row) not in c.by_key:
                continue
            cell, values = c.cell(ds.name, row), c.values(ds.name, row)
            record = {"dataset": ds.name, "method": label, "row": row, "metrics": cell.metrics if values else None,
                      "alpha": _settings(cell, values)[2]} | {m: values.get(m) if values else None for m in METRICS}
            if paper:
                record |= {f"paper_{m}": v for m, v in zip(METRICS, paper[label])}
            records.append(record)
            line = [label, *[_f(record[m]) for m in METRICS], "" if record["alpha"] is None else f"{record['alpha']:g}", record["metrics"] or "—"]
            if paper:
                line += [_f(v) for v in paper[label]]
            rows.append(line)
        md += [f"## {ds.name}", "", _md_table(header, rows), ""]
    md += ["IGD = IGD fine-tuning + α (chosen on valid); w/o w_d = IGD fine-tuning, α = 0; w/o w_t = plain fine-tuning + α "
           "(chosen on valid); w/o both = plain fine-tuning, α = 0 (= D3 in Table 1)."]
    (out / "table2.md").write_text("\n".join(md) + "\n")
    _write_csv(out / "table2.csv", records)
    return records


def table3(c: _Collected, out: Path) -> list[dict]:
    records = []
    md = ["# Table 3: training time relative to plain fine-tuning", ""]
    for ds in c.plan.grid.datasets:
        run = RunDir(ds.run_dir)
        rows, plain_s = [], None
        for weighting in WEIGHTINGS:
            for step in fine_tunes(c.plan.grid, ds, weighting):
                manifest = run.manifest(step.path)
                stats = manifest["stats"] if manifest else {}
                s_per_step = stats["train_seconds"] / stats["steps"] if stats.get("steps") else None
                if weighting == "plain" and plain_s is None:
                    plain_s = s_per_step
                ratio = s_per_step / plain_s if s_per_step and plain_s else None
                record = {"dataset": ds.name, "weighting": weighting, "sft": step.path.split("/", 1)[1], "steps": stats.get("steps"),
                          "batch_size": step.config.batch_size, "micro_batch_size": step.config.micro_batch_size,
                          "s_per_step": s_per_step, "ratio_to_plain": ratio, "paper_ratio": PAPER_TABLE3.get(weighting)}
                records.append(record)
                rows.append([weighting if weighting != "plain" else "plain (default)", record["sft"], str(record["steps"] or "—"),
                             f"{record['batch_size']} / {record['micro_batch_size']}", _f(s_per_step, 3),
                             "—" if ratio is None else f"{ratio:.3f}×",
                             f"{PAPER_TABLE3[weighting]:.4g}×" if weighting in PAPER_TABLE3 else "— (beyond the paper)"])
        md += [f"## {ds.name}", "", _md_table(["Method", "fine-tune", "steps", "batch / micro-batch", "s/step", "ours ÷ plain", "paper ÷ default"], rows), ""]
        settings = {(r["batch_size"], r["micro_batch_size"]) for r in records if r["dataset"] == ds.name}
        if len(settings) > 1:
            md += ["**The fine-tunes above use different batch settings: their s/step ratios are not comparable.**", ""]
    md += ["s/step = the sft stage's train_seconds / steps (its own wall clock of the optimiser steps, validation excluded), "
           "every fine-tune with the same batch settings; the paper column is the paper's Table 3 (Pos 1.03×, CFT 2.05×, IGD 1.035×)."]
    (out / "table3.md").write_text("\n".join(md) + "\n")
    _write_csv(out / "table3.csv", records)
    return records


def table4(c: _Collected, out: Path) -> list[dict]:
    records = []
    rows = []
    for ds in c.plan.grid.datasets:
        manifest = RunDir(ds.run_dir).manifest("ig")
        stats = manifest["stats"] if manifest else {}
        record = {"dataset": ds.name} | {k: stats.get(k) for k in ("items", "train", "valid", "test", "tokens", "zero_ig_tokens", "catalog_items")}
        record["zero_ig_pct"] = 100 * stats["zero_ig_share"] if "zero_ig_share" in stats else None
        records.append(record)
        zero = f"{record['zero_ig_tokens']:,} ({record['zero_ig_pct']:.2f}%)" if record["zero_ig_tokens"] is not None else "—"
        rows.append([ds.name, *[f"{record[k]:,}" if record[k] is not None else "—" for k in ("items", "catalog_items", "train", "valid", "test", "tokens")], zero])
        paper = PAPER_TABLE4.get(ds.paper or "")
        if paper:
            rows.append([f"paper: {ds.paper}", f"{paper[0]:,}", "", *[f"{v:,}" for v in paper[1:5]], f"{paper[5]:,} ({paper[6]:.2f}%)"])
    md = ["# Table 4: dataset statistics and token information gain", "",
          _md_table(["Dataset", "Items", "IG catalog items", "Train", "Valid", "Test", "Target tokens", "Zero-IG tokens (%)"], rows), "",
          "From the build-ig-index stage's statistics: target tokens and zero-IG tokens are counted over the training targets; "
          "rows labelled paper are the paper's Table 4."]
    (out / "table4.md").write_text("\n".join(md) + "\n")
    _write_csv(out / "table4.csv", records)
    return records


def figures(c: _Collected, out: Path) -> tuple[list[tuple[str, str]], str | None]:
    from igdrec.experiments import figures as F

    made: list[tuple[str, str]] = []
    try:
        for ds in c.plan.grid.datasets:
            series = {}
            for row, label in (("bigrec", "BIGRec"), ("bigrec+igd", "BIGRec + IGD"), ("d3", "D3"), ("d3+igd", "D3 + IGD")):
                values = c.values(ds.name, row)
                if values and values.get("entropy_per_step"):
                    series[label] = values["entropy_per_step"]
            if series:
                name = f"{ds.name}-fig1-2-entropy-by-step.png"
                made.append((name, F.entropy_by_step(series, out / name, ds.name)))
                name = f"{ds.name}-fig3-entropy-difference.png"
                made.append((name, F.entropy_difference(series, out / name, ds.name)))
            logs = {}
            run = RunDir(ds.run_dir)
            for weighting in ("plain", "igd"):
                for step in fine_tunes(c.plan.grid, ds, weighting):
                    if run.manifest(step.path):
                        logs[f"{weighting} ({step.path.split('/', 1)[1]})"] = schema.read(run.artifact(step.path, "train_log.parquet"), "train_log")
            if logs:
                name = f"{ds.name}-ce-by-ig-group.png"
                made.append((name, F.ce_by_ig_group(logs, out / name, ds.name)))
            curves = {}
            metric = c.plan.grid.selection.metric
            for row in ("bigrec+igd", "d3+igd", "d3+igd-no-wt"):
                scores = c.selection.get((ds.name, row))
                if not scores:
                    continue
                for s in scores:
                    if s[metric] is not None:
                        label = f"{ROWS[row]['label'] if row == 'd3+igd-no-wt' else row} (sft {s['sft']})"
                        curves.setdefault(label, []).append((s["alpha"], s[metric]))
            curves = {k: v for k, v in curves.items() if len(v) > 1}
            if curves:
                name = f"{ds.name}-{metric.replace('@', '')}-vs-alpha.png"
                made.append((name, F.metric_vs_alpha(curves, out / name, ds.name, metric)))
    except IgdrecError as exc:
        return made, str(exc)
    return made, None


def _search_error_stats(cell: Cell) -> dict | None:
    """The stats of the cell's search-errors step, if it has one and it finished."""
    step = next((s for s in cell.steps if s.stage == "search-errors"), None)
    manifest = RunDir(step.run_dir).manifest(step.path) if step else None
    return manifest["stats"] if manifest else None


def search_error_table(c: _Collected, out: Path) -> list[tuple[str, str]]:
    """Beyond the paper: search-error rates by α of the SEARCH_ERROR_ROWS (every α candidate on valid, the
    chosen α on test; docs/method.md §6.8), as search_errors.md/.csv and one figure per dataset."""
    records = []
    md = ["# Search errors by α (beyond the paper)", ""]
    for ds in c.plan.grid.datasets:
        rows = []
        for row in SEARCH_ERROR_ROWS:
            key = (ds.name, row)
            if key not in c.by_key:
                continue
            plan = c.by_key[key]
            test = c.cell(*key)
            for cell in [*plan.candidates, *([test] if test is not None else [])]:
                stats = _search_error_stats(cell)
                if stats is None:
                    continue
                rates = stats["rates"]
                record = {"dataset": ds.name, "row": row, "method": ROWS[row]["label"], "split": cell.split,
                          "sft": cell.candidate["sft"], "alpha": cell.candidate["alpha"], "n_samples": stats["n_samples"],
                          "num_beams": stats["num_beams"]} | rates | {"decode": cell.metrics}
                records.append(record)
                rows.append([f"{row} ({record['method']})", cell.split, record["sft"], f"{record['alpha']:g}", str(record["n_samples"]),
                             _f(rates["hit"]), _f(rates["search_error"]), _f(rates["model_error"]), _f(rates["unreachable"])])
        if rows:
            md += [f"## {ds.name}", "", _md_table(["Row", "split", "fine-tune", "α", "samples", "hit", "search error",
                                                  "model error", "unreachable"], rows), ""]
    md += ["Each sample's ground truth is scored teacher-forced with the decode's own model, α, length penalty and "
           "step-score formula: *search error* = not returned although its score beats the K-th returned item's (the search "
           "pruned it; the list is not the K best), *model error* = not returned and scored at most the K-th's, *unreachable* = "
           "not in the decoding catalog. Valid rows are the α candidates of the selection (on `selection.valid_limit` "
           "samples); the test row is the chosen α. Read from `<run>/search-errors/<decode>/stage.json`."]
    (out / "search_errors.md").write_text("\n".join(md) + "\n")
    _write_csv(out / "search_errors.csv", records)
    made = []
    try:
        from igdrec.experiments import figures as F

        for ds in c.plan.grid.datasets:
            curves: dict[str, list[tuple[float, float]]] = {}
            for r in (r for r in records if r["dataset"] == ds.name):
                curves.setdefault(f"{r['row']} ({r['split']}, sft {r['sft']})", []).append((r["alpha"], r["search_error"]))
            if curves:
                name = f"{ds.name}-search-errors-vs-alpha.png"
                made.append((name, F.search_errors_vs_alpha(curves, out / name, ds.name)))
    except IgdrecError:
        pass  # matplotlib missing: figures() has said so, the table is written
    return made


def _sizes(grid: GridConfig) -> list[str]:
    lines = []
    for ds in grid.datasets:
        sft = ds.stages.get("sft", {})
        decode = ds.stages.get("decode", {})
        lines.append(f"- **{ds.name}** (run directory `{ds.run_dir}`): model `{sft.get('model', 'default')}`, "
                     f"{'LoRA' if sft.get('lora', True) else 'full fine-tuning'}, training samples: {sft.get('sample') or 'all'}, "
                     f"epochs {sft.get('epochs', 'default')}, max steps {sft.get('max_steps') or 'none'}, batch {sft.get('batch_size', 'default')}; "
                     f"test samples decoded: {decode.get('limit') or 'all'}; valid samples per α candidate: {grid.selection.valid_limit or 'all'}; "
                     f"α grid {grid.selection.alphas}; weightings {json.dumps(ds.weightings)}; IG catalog: "
                     f"{ds.stages.get('build-ig-index', {}).get('catalog', 'all')}.")
    return lines


def readme(c: _Collected, out: Path, made: list[tuple[str, str]], figure_error: str | None) -> None:
    grid = c.plan.grid
    state = _read_json(grid.run_root / GRID_STATE) or {}
    phases = state.get("wall_time_s", {})
    config_text = (grid.run_root / CONFIG_COPY).read_text() if (grid.run_root / CONFIG_COPY).exists() else grid.path.read_text()
    lines = [f"# igdrec grid `{grid.scale}`: the paper's Tables 1–4 and figures", "",
             f"- git commit: `{_git_commit()}`",
             f"- grid finished: {state.get('finished_at', 'not yet (partial grid)')}",
             f"- run root: `{grid.run_root}`; re-render with `igdrec report {grid.run_root}` (reads artifacts, recomputes nothing)", "",
             "## Tables", "",
             "- [table1.md](table1.md) / table1.csv: performance (N@K = NDCG@K, H@K = HR@K) with the Improvement rows' "
             "paired-bootstrap 95% intervals (test-sample noise of one fine-tuning seed only, not seed-to-seed variation)",
             "- [beyond_accuracy.md](beyond_accuracy.md) / beyond_accuracy.csv: coverage, popularity, long-tail share and "
             "novelty of Table 1's rows' lists",
             "- [table2.md](table2.md) / table2.csv: ablation on the D3 base",
             "- [table3.md](table3.md) / table3.csv: training time relative to plain fine-tuning",
             "- [table4.md](table4.md) / table4.csv: dataset and IG statistics",
             "- [search_errors.md](search_errors.md) / search_errors.csv: search-error rates by α (beyond the paper)", "",
             "## How the numbers were chosen", "",
             f"- α, and the fine-tune where a weighting lists candidates (IGD β, Pos β, CFT β × α), are chosen on the "
             f"**validation** split by {grid.selection.metric}: every candidate "
             "is decoded, reranked and scored on the validation samples, the best (earliest on ties) is decoded once on test. "
             "The reference implementation picks α by test metrics; we do not, so our +IGD rows are not tuned on test.",
             "- Every score is read from the named metrics artifact (`<run>/<dataset>/metrics/<name>.json`); the CSVs keep full precision.",
             "- Columns and rows labelled *paper* are the paper's numbers (Qwen2.5-1.5B, full Amazon 2018 test sets), for comparison only.", ""]
    if grid.scale in ("smoke", "mini"):
        lines += [f"**Scale `{grid.scale}`: these numbers are noisy.** A small model fine-tuned on a small training sample and "
                  "scored on a few hundred test samples or fewer: read the Improvement rows with their 95% intervals, which "
                  "will mostly include 0. The classic models (SASRec, GRU4Rec) are strong on ml-100k and an LLM at this scale "
                  "is expected to sit far below them.", ""]
    lines += ["## Sizes used", "", *_sizes(grid), ""]
    if c.selection:
        lines += ["## Selection on the validation split", ""]
        for (dataset, row), scores in c.selection.items():
            test = c.cell(dataset, row)
            chosen = f"chosen: sft {test.candidate['sft']}, α = {test.candidate['alpha']:g}" if test else "not finished"
            metric = grid.selection.metric
            shown = ", ".join(f"{s['sft']} α={s['alpha']:g}: {_f(s[metric])}" for s in scores)
            lines.append(f"- {dataset} / {row}: {shown} → {chosen}")
        lines.append("")
    lines += ["## Wall time per phase (this run directory, summed over resumed runs)", "",
              _md_table(["phase", "wall time"], [[p, f"{s / 60:.1f} min"] for p, s in sorted(phases.items())] or [["—", "—"]]), "",
              "## Figures", ""]
    lines += [f"- `{name}`: {caption}" for name, caption in made]
    if figure_error:
        lines.append(f"- figures not drawn: {figure_error}")
    lines += ["", "## Config", "", "```yaml", config_text.rstrip(), "```", ""]
    (out / "README.md").write_text("\n".join(lines))


def write_reports(plan: Plan) -> Path:
    """Render every table, figure and the README of the plan's grid under `<run_root>/reports/` from the artifacts."""
    out = plan.grid.run_root / REPORTS
    out.mkdir(parents=True, exist_ok=True)
    collected = _Collected(plan)
    table1(collected, out)
    beyond_accuracy(collected, out)
    table2(collected, out)
    table3(collected, out)
    table4(collected, out)
    made, figure_error = figures(collected, out)
    made += search_error_table(collected, out)
    if figure_error:
        err_console.print(f"[yellow]note:[/] {figure_error}")
    readme(collected, out, made, figure_error)
    console.print(f"reports written to {out} (table1–4 and beyond_accuracy .md/.csv, {len(made)} figures, README.md)")
    return out
