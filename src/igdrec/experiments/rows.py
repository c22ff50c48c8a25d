"""The rows of the paper's tables (docs/method.md §8): which fine-tune, length penalty and α each stands for."""

from __future__ import annotations

# The rows of the paper's tables, in table order. `sft`: the fine-tuning variant; `lp`: length penalty
# (1 = BIGRec, 0 = D3); `alpha`: "select" = chosen on valid from the α grid, else fixed; `constrained_softmax`:
# decode with the step softmax over the trie's children, as MSL trains (docs/method.md §6.8).
ROWS: dict[str, dict] = {
    "gru4rec": {"label": "GRU4Rec", "baseline": "gru4rec"},
    "sasrec": {"label": "SASRec", "baseline": "sasrec"},
    "bigrec": {"label": "BIGRec", "sft": "plain", "lp": 1.0, "alpha": 0.0},
    "bigrec+pos": {"label": "+Pos", "sft": "pos", "lp": 1.0, "alpha": 0.0},
    "bigrec+cft": {"label": "+CFT", "sft": "cft", "lp": 1.0, "alpha": 0.0},
    "bigrec+igd": {"label": "+IGD", "sft": "igd", "lp": 1.0, "alpha": "select"},
    "d3": {"label": "D3", "sft": "plain", "lp": 0.0, "alpha": 0.0},
    "d3+pos": {"label": "+Pos", "sft": "pos", "lp": 0.0, "alpha": 0.0},
    "d3+cft": {"label": "+CFT", "sft": "cft", "lp": 0.0, "alpha": 0.0},
    "d3+igd": {"label": "+IGD", "sft": "igd", "lp": 0.0, "alpha": "select"},
    "d3+tfa": {"label": "D3 + TFA (SASRec assistant; beyond the paper)", "sft": "plain", "lp": 0.0, "alpha": 0.0, "tfa": "sasrec"},
    # MSL (Wang et al., SIGIR 2025; docs/method.md §5.1); msl-igd takes IGD's β unless the grid lists its own.
    "bigrec+msl": {"label": "BIGRec + MSL (beyond the paper)", "sft": "msl", "lp": 1.0, "alpha": 0.0, "constrained_softmax": True},
    "d3+msl": {"label": "D3 + MSL (beyond the paper)", "sft": "msl", "lp": 0.0, "alpha": 0.0, "constrained_softmax": True},
    "d3+msl+igd": {"label": "D3 + MSL + IGD (β, α; beyond the paper)", "sft": "msl-igd", "lp": 0.0, "alpha": "select",
                   "constrained_softmax": True},
    # Table 2 (D3 base): IGD is d3+igd, w/o both is d3.
    "d3+igd-no-wd": {"label": "w/o w_d (α = 0)", "sft": "igd", "lp": 0.0, "alpha": 0.0},
    "d3+igd-no-wt": {"label": "w/o w_t (plain SFT + α)", "sft": "plain", "lp": 0.0, "alpha": "select"},
}
TABLE1_ROWS = ["gru4rec", "sasrec", "bigrec", "bigrec+pos", "bigrec+cft", "bigrec+igd", "d3", "d3+pos", "d3+cft", "d3+igd", "d3+tfa",
               "bigrec+msl", "d3+msl", "d3+msl+igd"]
TABLE2_ROWS = [("IGD", "d3+igd"), ("w/o w_d", "d3+igd-no-wd"), ("w/o w_t", "d3+igd-no-wt"), ("w/o both", "d3")]
IMPROVEMENTS = [("bigrec", "bigrec+igd"), ("d3", "d3+igd")]  # (base, +IGD): the Improvement rows
# Beyond the paper: the rows whose decodes (every α candidate on valid, the chosen α on test) are also scored
# for search errors (docs/method.md §6.8), the report's search-error table and figure.
SEARCH_ERROR_ROWS = ["d3", "bigrec+igd", "d3+igd"]
