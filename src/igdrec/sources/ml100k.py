"""Source `ml-100k`: MovieLens-100K from the pinned recbole wheel (docs/method.md §2.2), read as the `recbole`
source reads any RecBole data set.

Item text is "{movie_title} ({release_year})". RecBole's file has a few non-years in release_year
("unkonwn" for item 267, "V" for a video release); those count as missing and the year is left out.
Every rating is an interaction (implicit feedback).
"""

from __future__ import annotations

from pathlib import Path

from igdrec import assets
from igdrec.sources import Dataset
from igdrec.sources.recbole import Fields, read_dataset

INTER_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"
ITEM_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.item"
# The field names of RecBole's MovieLens files (the `recbole` source's defaults are these too).
FIELDS = Fields(user="user_id", item="item_id", time="timestamp", title="movie_title", year="release_year")


def input_files(config) -> dict[str, str]:
    # The wheel is pinned by sha256 and its members are verified when fetched: its hash stands for them.
    return {"recbole-wheel": assets.ML100K.wheel_sha256}


def load(config) -> Dataset:
    files = assets.fetch(assets.ML100K)
    # A pinned file has no missing ids and no unknown items: anything else is refused, never dropped.
    return read_dataset(Path(files[INTER_MEMBER]), Path(files[ITEM_MEMBER]), FIELDS, drop_unknown=False, drop_missing=False)
