"""The option machinery's sections and mappings: a YAML file with nested sections (the grid's) is read by
`options.build` with the same types, bounds and did-you-mean as a stage section (docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from igdrec import config as cfg
from igdrec import options
from igdrec.errors import IgdrecError
from igdrec.options import like, option


@dataclass
class Inner:
    rate: float | None = option(None, "A rate.", min=0)
    per_model: dict[str, float] | None = option(None, "A number per model.", choices=("sasrec", "gru4rec"), min=0, max=10)


@dataclass
class Outer:
    alphas: list[float] = like(cfg.DecodeConfig, "alpha", factory=lambda: [0.0, 0.2], unique=True, help="Candidates.")
    limit: int | None = like(cfg.DecodeConfig, "limit", default=7, help="A limit.")
    inner: Inner = option(factory=Inner, help="A section.")
    named: dict[str, Inner] = option(factory=dict, help="Sections by name.", artifact=True)
    free: dict[str, dict] = option(factory=dict, help="Free mappings by a known name.", choices=("build-ig-index", "sft"))


def refused(values: dict) -> str:
    with pytest.raises(IgdrecError) as info:
        options.build(Outer, values, "f.yaml", sep=":")
    return str(info.value)


def test_nested_sections_and_mappings_are_parsed_to_their_types():
    built = options.build(Outer, {"alphas": "0.3, 0.1", "inner": {"rate": "2", "per_model": {"sasrec": 1}},
                                  "named": {"toy": {"rate": 3}, "empty": None}, "free": {"build_ig_index": {"a": 1}, "sft": None}},
                          "f.yaml", sep=":")
    assert built == Outer(alphas=[0.3, 0.1], limit=7, inner=Inner(rate=2.0, per_model={"sasrec": 1.0}),
                          named={"toy": Inner(rate=3.0), "empty": Inner()}, free={"build-ig-index": {"a": 1}, "sft": {}})
    assert options.build(Outer, {"inner": None}, "f.yaml", sep=":") == Outer()  # an empty section: its defaults


def test_like_takes_the_other_options_rules_and_help_can_change():
    alpha, limit = options.option_named(cfg.DecodeConfig, "alpha"), options.option_named(cfg.DecodeConfig, "limit")
    ours = {o.name: o for o in options.options(Outer)}
    assert (ours["alphas"].min, ours["alphas"].max) == (alpha.min, alpha.max) == (0, 1)
    assert ours["limit"].min == limit.min and ours["limit"].default == 7 and ours["alphas"].help == "Candidates."


@pytest.mark.parametrize(("values", "message"), [
    ({"alphas": [0.5, 2]}, "f.yaml:alphas 2: must lie in [0, 1]"),
    ({"alphas": [0.5, 0.5]}, "f.yaml:alphas: [0.5, 0.5] lists 0.5 twice"),
    ({"alphas": {"a": 1}}, "f.yaml:alphas: expected a comma-separated list of numbers, got {'a': 1}"),
    ({"limit": 0}, "f.yaml:limit 0: must be ≥ 1"),
    ({"limt": 3}, "f.yaml: unknown key 'limt' (did you mean 'limit'?)"),
    ({"inner": 5}, "f.yaml:inner: expected a mapping (`name: value` lines), got 5"),
    ({"inner": {"rat": 1}}, "f.yaml:inner: unknown key 'rat' (did you mean 'rate'?)"),
    ({"inner": {"rate": -1}}, "f.yaml:inner.rate -1: must be ≥ 0"),
    ({"inner": {"per_model": 3}}, "f.yaml:inner.per_model: expected a mapping (`name: value` lines), got 3"),
    ({"inner": {"per_model": {"sasrc": 1}}}, "f.yaml:inner.per_model: unknown key 'sasrc' (did you mean 'sasrec'?)"),
    ({"inner": {"per_model": {"sasrec": 11}}}, "f.yaml:inner.per_model.sasrec 11: must lie in [0, 10]"),
    ({"inner": {"per_model": {"sasrec": "x"}}}, "f.yaml:inner.per_model.sasrec: expected a number, got 'x'"),
    ({"named": {"../up": {}}}, "f.yaml:named '../up': not a valid name"),
    ({"named": {"toy": {"rate": "x"}}}, "f.yaml:named.toy.rate: expected a number, got 'x'"),
    ({"free": {"sfft": {}}}, "f.yaml:free: unknown key 'sfft' (did you mean 'sft'?)"),
    ({"free": {"xyz": {}}}, "f.yaml:free: unknown key 'xyz'; known: build-ig-index, sft"),
    ({"free": {"sft": [1]}}, "f.yaml:free.sft: expected a mapping (`name: value` lines), got [1]"),
    ([1], "f.yaml: expected a mapping (`name: value` lines), got [1]"),
])
def test_a_mistake_anywhere_in_the_file_is_one_line_naming_its_key_path(values, message):
    said = refused(values)
    assert message in said and len(said.splitlines()) == 1, said


def test_a_stage_section_still_joins_its_keys_with_a_dot():
    with pytest.raises(IgdrecError, match=r"^x.yaml:decode.alpha 2: must lie in \[0, 1\]$"):
        options.build(cfg.DecodeConfig, {"alpha": 2}, "x.yaml:decode")
