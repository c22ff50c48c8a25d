"""Data sources for `igdrec preprocess`: each turns one input format into the canonical tables (docs/method.md §2.1).

A source module has two functions (its options are fields of config.PreprocessConfig declared with
`only={"source": NAME}`, which keeps them out of other sources' cache keys):
  input_files(config) -> dict     role -> fingerprint of the raw inputs (checked before any work)
  load(config) -> Dataset         items with dense ids, plus interactions to window or ready-made splits
and may have a third, where the data's own name picks the prompt's item word (see `category`):
  category(config) -> str         e.g. the RecBole data set's name (ml-1m -> movies)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

import polars as pl

from igdrec.config import SOURCES
from igdrec.errors import IgdrecError

SOURCE_MODULES = {name: f"igdrec.sources.{name.replace('-', '')}" for name in SOURCES}


@dataclass
class Dataset:
    items: pl.DataFrame  # item_id (dense 0..n-1), title
    interactions: pl.DataFrame | None  # user_id, item_id, timestamp in input order, windowed later; None: `splits` given
    splits: dict[str, pl.DataFrame] | None = None  # given splits (d3-csv), already in the samples schema
    stats: dict = field(default_factory=dict)  # source-specific facts for the statistics table


def category(config) -> str | None:
    """The name that picks the prompt's default item word (prompt.CATEGORY_WORDS): the source's own
    `category(config)` where it has one, else the --category option."""
    source = get(config.source)
    return source.category(config) if hasattr(source, "category") else config.category


def get(name: str) -> ModuleType:
    if name not in SOURCE_MODULES:
        raise IgdrecError(f"unknown --source {name!r}; choose one of {', '.join(SOURCE_MODULES)}")
    return importlib.import_module(SOURCE_MODULES[name])
