"""The paper's experiment grid (Tables 1–2, docs/method.md §8) as cached stage chains, and its reports.

A grid config (YAML, see `configs/grid/`) names the datasets, the settings shared by every stage, the
fine-tuning variants (Pos, CFT, IGD and their candidate values) and the selection grid. Its modules, each
importing only those above it in this list (and nothing of igdrec above the stage runner):

- `rows`: the rows of the paper's tables;
- `grid_config`: the YAML schema, read and checked before anything runs;
- `plan`: each row as cells, a cell being one chain of stage steps that ends in a `metrics` artifact;
  cells share upstream stages through the run directory's stage cache, and `<run_root>/<dataset>/` is
  each dataset's run directory;
- `select`: selection on the **validation** split: a row with several candidates (the decoding α of the
  `selection.alphas` grid, the fine-tunes of a weighting that lists candidate values) decodes every
  candidate on `selection.valid_limit` valid samples, reranks and scores it; the best `selection.metric`
  wins (ties: the earlier candidate), and only the winner is decoded on test (the reference code picks α
  by test metrics; we do not);
- `cost`, `dryrun`: the cost estimate and `igdrec grid --dry-run` (each stage's plan says whether its
  artifact is current);
- `report`, `figures`: Tables 1–4, figures and a README rendered from the artifacts and a plan;
- `run`: `igdrec grid`, every step through `igdrec.runner`, then the reports.
"""
