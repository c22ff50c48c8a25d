"""Every option and every word list is written once, in the config layer (config.py).

A library takes its settings from the stage configs (e.g. `training.train(config: SFTConfig)`), so a
default restated in a library dataclass would be a second source of truth that can drift (it did:
`BeamSearch.tfa_guidance` defaulted to 1.0 while `decode --tfa-guidance` defaults to 0.5 and refuses 1.0).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
from pathlib import Path

import igdrec
from igdrec import config as cfg
from igdrec import options

SRC = Path(igdrec.__file__).parent
WORD_LISTS = {name: getattr(cfg, name) for name in ("SOURCES", "WEIGHTINGS", "PRECISIONS", "LR_SCHEDULES", "BASELINE_MODELS", "DEVICES")}


def library_dataclasses() -> list[type]:
    """The dataclasses defined in igdrec's modules, except those declared with `options.option()` (the
    config layer: the stage configs and anything built on the same machinery)."""
    found = []
    for module_info in pkgutil.walk_packages(igdrec.__path__, "igdrec."):
        module = importlib.import_module(module_info.name)
        for value in vars(module).values():
            if not (isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == module.__name__):
                continue
            if any("help" in f.metadata for f in dataclasses.fields(value)):
                continue
            found.append(value)
    return found


def stage_option_names() -> set[str]:
    return {o.name for stage in cfg.STAGE_CONFIGS.values() for o in options.options(stage)}


def test_the_scan_sees_the_libraries():
    names = {f"{c.__module__}.{c.__qualname__}" for c in library_dataclasses()}
    assert {"igdrec.beam.BeamSearch", "igdrec.seqrec.models.ModelSettings", "igdrec.distributed.World"} <= names
    assert not any(c in cfg.STAGE_CONFIGS.values() for c in library_dataclasses())


def test_no_library_dataclass_restates_a_stage_default():
    owned = stage_option_names()
    restated = sorted(
        f"{c.__module__}.{c.__qualname__}.{f.name}"
        for c in library_dataclasses()
        for f in dataclasses.fields(c)
        if f.name in owned and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
    )
    assert restated == [], f"defaults owned by a stage config (config.py), restated in a library: {restated}"


def literal_word_lists(tree: ast.AST) -> list[tuple[int, frozenset]]:
    """(line, the words) of every tuple, list or set literal of strings and of every dict of strings to
    strings (a registry such as name -> module; a table of numbers keyed by the words is data, not a list)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            elements = node.elts
        elif isinstance(node, ast.Dict) and all(isinstance(v, ast.Constant) and isinstance(v.value, str) for v in node.values):
            elements = node.keys
        else:
            continue
        if len(elements) >= 2 and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in elements):
            found.append((node.lineno, frozenset(e.value for e in elements)))
    return found


def test_each_word_list_is_written_once():
    written: dict[str, list[str]] = {name: [] for name in WORD_LISTS}
    for path in sorted(SRC.rglob("*.py")):
        for line, words in literal_word_lists(ast.parse(path.read_text(), str(path))):
            for name, values in WORD_LISTS.items():
                if words == frozenset(values):  # in any order
                    written[name].append(f"{path.relative_to(SRC)}:{line}")
    assert written == {name: [written[name][0]] for name in WORD_LISTS} and all(
        where[0].startswith("config.py:") for where in written.values()
    ), written


def test_the_scan_would_see_a_restated_word_list():
    restated = f"SCHEMES = {list(reversed(cfg.WEIGHTINGS))}\n" + "MODULES = {'ml-100k': 'a', 'recbole': 'b', 'amazon2018': 'c', 'amazon2023': 'd', 'd3-csv': 'e', 'interactions': 'f'}\n"
    words = {w for _, w in literal_word_lists(ast.parse(restated))}
    assert words == {frozenset(cfg.WEIGHTINGS), frozenset(cfg.SOURCES)}


def test_the_libraries_use_the_config_word_lists():
    from igdrec import precision, schedule, sources, weighting
    from igdrec.seqrec import models

    assert weighting.WEIGHTINGS is cfg.WEIGHTINGS
    assert precision.PRECISIONS is cfg.PRECISIONS
    assert schedule.LR_SCHEDULES is cfg.LR_SCHEDULES
    assert models.BASELINE_MODELS is cfg.BASELINE_MODELS
    assert tuple(sources.SOURCE_MODULES) == cfg.SOURCES
