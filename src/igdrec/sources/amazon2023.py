"""Source `amazon2023`: Amazon Reviews 2023 (McAuley Lab) with the 2018 source's filter (docs/method.md §2.2).

Reviews `{Category}.jsonl[.gz]` (`user_id`, `parent_asin`, `timestamp` in milliseconds, besides `rating`,
`text`, `asin`, ... which are not read) and metadata `meta_{Category}.jsonl[.gz]` (`parent_asin`, `title`,
...), one JSON object per line. An item is a `parent_asin`: the 2023 dump reviews a product's variants
(`asin`) under one parent, and its metadata describes parents only. Every rule, option and refusal is the
2018 source's (amazon2018.py); the millisecond clock orders reviews before it is rounded to seconds.
"""

from __future__ import annotations

from igdrec.sources import Dataset, amazon2018

LAYOUT = amazon2018.Layout(user="user_id", item="parent_asin", time="timestamp", ticks_per_second=1000)


def input_files(config) -> dict[str, str]:
    return amazon2018.input_files(config)


def load(config) -> Dataset:
    return amazon2018.load(config, LAYOUT)
