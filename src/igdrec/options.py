"""The option machinery: a config field declared once with `option()`, and everything derived from it.

A field's `option()` holds its default, help text, cache-key role and the values it accepts. From these
declarations follow:

- the command line: `cli.py` builds a command's options from a config dataclass (`options(cls)`) and
  applies what the user typed (`apply_cli`);
- the YAML loader: a config from one section, keys = field names (`build`); a field may itself be a
  section (a dataclass declared the same way) or a mapping of names to values or sections, so a whole
  YAML file with nested sections (the grid's) is read by the same functions;
- the cache key: `key_params(config)` = the key=True fields that have an effect for this config;
- validation: `parse` (types), `check` (choices, bounds, a config's own cross-field rules), with
  one-line errors that name the option (`--max-steps`) or the file and key (`x.yaml:sft.max_steps`).

Validation runs once per invocation, at the entry: the command line (`apply_cli`) and the YAML loader
(`build`) check what they build; the runner checks a config handed to `stage.run` by Python code. The rules
are pure functions of the values, so `check` remembers the values it passed and a second check of the
same values (the runner's after the CLI's) costs nothing (docs/architecture.md).

The stage configs themselves live in `config.py`; this module names no stage.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from igdrec.errors import IgdrecError

# Cache-key roles of a field (see `option`).
KEY, RUN_SETTING, INPUT_FILE = "key", "run setting", "input file"

# An artifact name becomes one directory (and file) name inside the run directory: `<run>/sft/NAME`,
# `.partial/sft__NAME-KEY`, `metrics/NAME.json`. So it is one path component that cannot climb out of its
# stage folder (`..`, `/`), stand for the folder itself (`.`), hide (a leading dot), read as an option (a
# leading `-`) or break a line of output, and it stays short of the file system's 255-byte limit.
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
ARTIFACT_NAME_RULE = "1-100 letters, digits, '_', '-' or '.', starting with a letter, digit or '_'"


def check_artifact_name(value: Any, where: str) -> str:
    """`value` if it is a valid artifact name, else a one-line error naming `where` (an option or a file's key)."""
    if not isinstance(value, str) or ARTIFACT_NAME.fullmatch(value) is None:
        raise IgdrecError(f"{where} {value!r}: not a valid name; use {ARTIFACT_NAME_RULE} (it names a directory of the run)")
    return value


def artifact_label(text: str, fallback: str = "model") -> str:
    """A valid artifact-name part made from free text (a model path or id): other characters become '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).lstrip(".-") or fallback


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    key: bool = True,
    factory: Any = None,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    pattern: tuple[str, str] | None = None,
    as_set: bool = False,
    unique: bool = False,
    only: dict | Callable | None = None,
    input: bool = False,
    flags: str | None = None,
    artifact: bool = False,
    key_name: str | None = None,
    renamed_from: str | None = None,
):
    """A stage-config field with its help text, cache-key role and accepted values, written once.

    `key=True`: the value changes what the stage computes, so it belongs to the stage's cache key;
    `key=False`: a run setting (name, device, batch size, logging...) that leaves the result unchanged;
    `input=True`: the value names an input file; the stage keys on the file's content fingerprint (its
    `inputs`), never on the path's spelling, so the field stays out of `key_params`.
    `choices`: the allowed values (a near miss is answered with the closest one).
    `min`/`max`: inclusive bounds, `gt`/`lt`: exclusive ones (of a number, or of each list element). Every
    number declares at least its lower bound (tests/unit/test_config.py).
    `pattern`: (regular expression, how it reads), a family of strings accepted beside `choices`
    (e.g. `cuda:N`).
    `as_set`: a list whose order and repeats mean nothing: parsed sorted without repeats, so that
    `--ks 5,1,1` and `--ks 1,5` are one value and one cache key.
    `unique`: a list whose order means something and whose values must differ (a repeat is refused).
    A mapping field (`dict[str, X]`): `choices` are the names it accepts and `artifact=True` makes each
    name an artifact name; the bounds apply to its values.
    `only`: the field has an effect only when `{other_field: value or tuple of values}` holds (or when
    `only(config)` is true); otherwise it is inert and left out of the cache key. The CLI lists such
    options under their own heading.
    `flags`: the command-line spelling of a bool, e.g. "--lora/--full" (default "--name/--no-name").
    `artifact=True`: the value names an artifact of the run (`--name`, `--sft NAME`...), so it must pass
    `check_artifact_name`.
    `key_name`: the field's spelling in the cache key, where it was renamed after results were cached
    under the old name (the key, and so every cached result, stays the same).
    `renamed_from`: the field's former name, still accepted as `--old-name` and YAML `old_name:` with a
    one-line deprecation warning.
    The CLI options, the YAML loader, the validation and the cache keys are all derived from these fields.
    """
    role = INPUT_FILE if input else KEY if key else RUN_SETTING
    metadata = {
        "help": help, "key": role == KEY, "role": role, "choices": tuple(choices) if choices else None,
        "min": min, "max": max, "gt": gt, "lt": lt, "pattern": pattern, "as_set": as_set, "unique": unique, "only": only, "flags": flags,
        "artifact": artifact, "key_name": key_name, "renamed_from": renamed_from,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def like(cls: type, name: str, **changes):
    """An `option()` that accepts what `cls`'s field `name` accepts (its help, default, choices, bounds),
    with `changes` on top: a field elsewhere that stands for that option keeps its rules written once."""
    opt = option_named(cls, name)
    declared = {"default": opt.default, "help": opt.help, "key": opt.role == KEY, "choices": opt.choices, "min": opt.min,
                "max": opt.max, "gt": opt.gt, "lt": opt.lt, "pattern": opt.pattern, "artifact": opt.artifact}
    if "factory" in changes:
        del declared["default"]
    return option(**(declared | changes))


# ---------------------------------------------------------------------------------------------------
# Introspection: what the CLI, the loader and the cache keys are derived from.


@dataclass(frozen=True)
class Option:
    """One config field as declared with `option()`."""

    name: str
    annotation: Any  # the resolved type hint
    default: Any
    help: str
    role: str  # KEY, RUN_SETTING or INPUT_FILE
    declared: bool  # written with option() (a plain dataclass field is not)
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None
    pattern: tuple[str, str] | None = None
    as_set: bool = False
    unique: bool = False
    only: dict | Callable | None = None
    flags: str | None = None
    artifact: bool = False
    key_name: str | None = None  # the cache key's spelling, where it is not `name`
    renamed_from: str | None = None  # the former name, still accepted with a warning

    @property
    def cli_name(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def in_key_as(self) -> str:
        return self.key_name or self.name

    @property
    def kind(self) -> type:
        """bool, int, float, str, list, dict or a section's dataclass (Optional stripped)."""
        return _shape(self.annotation)[0]

    @property
    def element(self) -> type | None:
        """The type of a list's elements, or of a mapping's values."""
        return _shape(self.annotation)[2]

    @property
    def optional(self) -> bool:
        return _shape(self.annotation)[1]

    def applies(self, config) -> bool:
        """Whether the field has an effect for `config` (see `option(only=...)`)."""
        if self.only is None:
            return True
        if callable(self.only):
            return bool(self.only(config))
        for other, wanted in self.only.items():
            allowed = wanted if isinstance(wanted, (tuple, list, set)) else (wanted,)
            if getattr(config, other) not in allowed:
                return False
        return True


@functools.cache
def options(cls: type) -> tuple[Option, ...]:
    """The fields of a stage config, in declaration order."""
    hints = typing.get_type_hints(cls)
    result = []
    for f in fields(cls):
        meta = f.metadata
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        role = meta.get("role") or (KEY if meta.get("key", True) else RUN_SETTING)
        result.append(Option(
            name=f.name, annotation=hints[f.name], default=default, help=meta.get("help", ""), role=role,
            declared="help" in meta and bool(meta.get("help")), choices=meta.get("choices"), min=meta.get("min"),
            max=meta.get("max"), gt=meta.get("gt"), lt=meta.get("lt"), pattern=meta.get("pattern"),
            as_set=meta.get("as_set", False), unique=meta.get("unique", False), only=meta.get("only"), flags=meta.get("flags"),
            artifact=meta.get("artifact", False), key_name=meta.get("key_name"), renamed_from=meta.get("renamed_from"),
        ))
    return tuple(result)


def option_named(cls: type, name: str) -> Option:
    return next(o for o in options(cls) if o.name == name)


def renamed(cls: type) -> dict[str, Option]:
    """Former field names of a stage config -> the option that took each over."""
    return {o.renamed_from: o for o in options(cls) if o.renamed_from}


def _new_names(cls: type, values: dict[str, Any], where: Callable[[str], str], prefix: str = "") -> dict[str, Any]:
    """`values` with a former field name replaced by the field's name, each use warned about on one line;
    `where(name)` spells a name as the user wrote it (`--alpha`, `x.yaml:sft.alpha`)."""
    old = renamed(cls)
    values = dict(values)
    for name in [n for n in values if n in old]:
        opt = old[name]
        if opt.name in {n.replace("-", "_") for n in values}:
            raise IgdrecError(f"{where(name)} and {where(opt.name)}: {where(name)} is the former name of {where(opt.name)}; "
                              "give only the new one")
        values[opt.name] = values.pop(name)
        _warn(f"warning: {prefix}{where(name)} is deprecated; it is now {where(opt.name)} (the same setting, the same cache key)")
    return values


@functools.cache  # once per message and process: the grid builds one config many times
def _warn(message: str) -> None:
    from igdrec.console import err_console, shown

    err_console.print(shown(message), soft_wrap=True)


def describe(cls: type) -> str:
    """The help text of a stage's command: its config's docstring."""
    doc = cls.__doc__ or ""
    return "" if doc.startswith(f"{cls.__name__}(") else doc  # dataclasses invent a signature docstring


def key_params(config) -> dict:
    """The cache-key parameters of `config`: its key=True fields that have an effect for it.

    A stage adds what only it can resolve (a resolved upstream name, a tokenizer identity) on top.
    """
    values = dataclasses.asdict(config)
    return {o.in_key_as: _as_set(o, values[o.name]) for o in options(type(config)) if o.role == KEY and o.applies(config)}


def _shape(annotation: Any) -> tuple[type, bool, type | None]:
    """(kind, optional, element type of a list or value type of a mapping) of a field's type hint."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if origin is list or annotation is list:
        args = typing.get_args(annotation)
        return list, optional, args[0] if args else str
    if origin is dict or annotation is dict:
        args = typing.get_args(annotation)
        return dict, optional, args[1] if args else Any
    return annotation, optional, None


def _is_section(kind: Any) -> bool:
    """Whether a field's kind is a section: a dataclass read from a mapping by `build`."""
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


# ---------------------------------------------------------------------------------------------------
# Parsing and validation: one path for YAML values and command-line strings.

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null")


def suggestion(value: Any, known) -> str:
    """' (did you mean X?)' for the closest known value, or ''."""
    by_folded = {str(k).lower(): str(k) for k in known}  # a case slip ("SASRec") is a near miss too
    close = difflib.get_close_matches(str(value).lower(), list(by_folded), n=1, cutoff=0.6)
    return f" (did you mean {by_folded[close[0]]!r}?)" if close else ""


def parse(opt: Option, value: Any, where: str) -> Any:
    """A YAML value or command-line string converted to the field's type (lists: comma-separated; a
    section or a mapping: from a YAML mapping, an empty one where the key has no value)."""
    if value is None and not opt.optional and (opt.kind is dict or _is_section(opt.kind)):
        value = {}  # `stages:` with nothing under it
    if value is None or (opt.optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if opt.optional:
            return None
        raise IgdrecError(f"{where}: expected {_type_name(opt.kind, opt.element)}, got nothing")
    if opt.kind is list:
        if isinstance(value, dict):
            raise IgdrecError(f"{where}: expected {_type_name(list, opt.element)}, got {value!r}")
        items = value if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",") if v.strip()]
        return _as_set(opt, [_scalar(opt.element, v, where) for v in items])
    if opt.kind is dict:
        if not isinstance(value, dict):
            raise IgdrecError(f"{where}: expected {_type_name(dict, opt.element)}, got {value!r}")
        items = {_choice_spelling(opt, str(k)): v for k, v in value.items()}
        return {k: _element(opt.element, v, f"{where}.{k}") for k, v in items.items()}
    return _element(opt.kind, value, where)


def _element(kind: Any, value: Any, where: str) -> Any:
    """One value of `kind`: a scalar, a section (built and checked) or a free mapping (a YAML mapping as it is)."""
    if _is_section(kind):
        return build(kind, {} if value is None else value, where)
    if kind is dict:
        if value is not None and not isinstance(value, dict):
            raise IgdrecError(f"{where}: expected {_type_name(dict)}, got {value!r}")
        return dict(value or {})
    return _scalar(kind, value, where)


def _choice_spelling(opt: Option, name: str) -> str:
    """A mapping's name as its `choices` spell it, where it differs only by '-' for '_' (`build_ig_index`),
    as YAML keys and command-line flags are one option whichever of the two they use."""
    if opt.choices and name not in opt.choices:
        return next((c for c in opt.choices if str(c).replace("-", "_") == name.replace("-", "_")), name)
    return name


def _as_set(opt: Option, value: Any) -> Any:
    """An `as_set` list sorted and without repeats; any other value as it is."""
    return sorted(set(value)) if opt.as_set and isinstance(value, list) else value


def _scalar(kind: type, value: Any, where: str) -> Any:
    def wrong() -> IgdrecError:
        return IgdrecError(f"{where}: expected {_type_name(kind)}, got {value!r}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise wrong()
    if kind in (int, float):
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            raise wrong()
        try:
            number = float(value) if kind is float else _as_int(value)
        except (TypeError, ValueError):
            raise wrong() from None
        return number
    if kind is str:
        if isinstance(value, (list, dict, bool)):
            raise wrong()
        return str(value)  # YAML may read a date or a number where a string is meant
    return value


def _as_int(value: Any) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return int(str(value).strip()) if isinstance(value, str) else int(value)


def _type_name(kind: type, element: type | None = None) -> str:
    if kind is list:
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
        return f"a comma-separated list of {plural.get(element or str, _type_name(element or str))}"
    if kind is dict or _is_section(kind):
        return "a mapping (`name: value` lines)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, getattr(kind, "__name__", str(kind)))


def check_value(opt: Option, value: Any, where: str) -> None:
    """Choices, bounds and the artifact-name rule of one field's value (each element of a list; each name
    and value of a mapping). A section was checked when it was built."""
    if opt.kind is list and value is not None and len(value) == 0:
        raise IgdrecError(f"{where}: expected at least one value")
    if opt.unique and value is not None:
        repeated = next((v for i, v in enumerate(value) if v in value[:i]), None)
        if repeated is not None:
            raise IgdrecError(f"{where}: {value} lists {repeated!r} twice")
    if isinstance(value, dict):
        for name in value:
            if opt.artifact:
                check_artifact_name(name, where)
            if opt.choices and name not in opt.choices:
                raise _unknown_key(where, name, opt.choices)
        if _is_section(opt.element) or opt.element in (dict, Any):
            return
        bounded = dataclasses.replace(opt, choices=None, artifact=False, pattern=None)
        for name, v in value.items():
            check_value(bounded, v, f"{where}.{name}")
        return
    for v in value if isinstance(value, list) else [value]:
        if v is None or _is_section(type(v)):
            continue
        if opt.artifact:
            check_artifact_name(v, where)
        matches = opt.pattern is not None and isinstance(v, str) and re.fullmatch(opt.pattern[0], v) is not None
        if opt.choices and v not in opt.choices and not matches:
            expected = ", ".join(map(str, opt.choices)) + (f" or {opt.pattern[1]}" if opt.pattern else "")
            raise IgdrecError(f"{where} {v!r}: expected one of {expected}{suggestion(v, opt.choices)}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if isinstance(v, float) and not math.isfinite(v):
                raise IgdrecError(f"{where} {v}: must be a finite number")
            low_ok = (opt.min is None or v >= opt.min) and (opt.gt is None or v > opt.gt)
            high_ok = (opt.max is None or v <= opt.max) and (opt.lt is None or v < opt.lt)
            if not (low_ok and high_ok):
                raise IgdrecError(f"{where} {_num(v)}: must {_bounds(opt)}")


def _unknown_key(where: str, key: str, known, looked_up: str | None = None) -> IgdrecError:
    """'unknown key' with the likely intended one, else the known ones; `looked_up`: the spelling compared."""
    hint = suggestion(looked_up or key, known) or "; known: " + ", ".join(map(str, known))
    return IgdrecError(f"{where}: unknown key {key!r}{hint}")


def _bounds(opt: Option) -> str:
    low = f"[{_num(opt.min)}" if opt.min is not None else f"({_num(opt.gt)}" if opt.gt is not None else None
    high = f"{_num(opt.max)}]" if opt.max is not None else f"{_num(opt.lt)})" if opt.lt is not None else None
    if low and high:
        return f"lie in {low}, {high}"
    if opt.min is not None:
        return f"be ≥ {_num(opt.min)}"
    if opt.gt is not None:
        return f"be > {_num(opt.gt)}"
    return f"be ≤ {_num(opt.max)}" if opt.max is not None else f"be < {_num(opt.lt)}"


def _num(x: float) -> str:
    """An integer in full (a seed bound 4294967295), any other number short (0.1, 1e-05)."""
    return str(x) if isinstance(x, int) else f"{x:g}"


# The values `check` passed, per config class: the rules are pure functions of the values, so a config
# is checked once per invocation however many layers (CLI, runner, library) hand it on.
_PASSED: set[tuple[type, str]] = set()


def check(config) -> None:
    """Every field's choices and bounds, then the config's own rules (`check_fields`); errors name the option.

    Values that passed before pass again without running the rules a second time.
    """
    values = (type(config), repr(dataclasses.astuple(config)))
    if values in _PASSED:
        return
    for opt in options(type(config)):
        check_value(opt, getattr(config, opt.name), opt.cli_name)
    check_fields = getattr(config, "check_fields", None)
    if check_fields is not None:
        check_fields()
    _PASSED.add(values)


def apply_cli(config, given: dict[str, Any], command: str):
    """`config`, checked, with the options the user typed (raw strings, bools or lists, None = not given)
    applied; a former option name (`renamed_from`) is taken for the new one with a warning that names the
    `command` (`sft`)."""
    cls = type(config)
    given = _new_names(cls, {k: v for k, v in given.items() if v is not None}, lambda n: "--" + n.replace("_", "-"),
                       f"{command} ")
    by_name = {o.name: o for o in options(cls)}
    changes = {name: parse(by_name[name], raw, by_name[name].cli_name) for name, raw in given.items()}
    config = dataclasses.replace(config, **changes) if changes else config
    check(config)
    return config


# ---------------------------------------------------------------------------------------------------
# YAML


def build(cls: type, values: dict[str, Any], where: str, sep: str = "."):
    """A config from one YAML mapping; `where` ("file:section") prefixes every error, `sep` joins it to a
    key (":" where `where` is the file itself: `file:key`). A field that is a section is built the same way."""
    if not isinstance(values, dict):
        raise IgdrecError(f"{where}: expected {_type_name(dict)}, got {values!r}")
    known = {o.name: o for o in options(cls)}
    parsed = {}
    for key, value in _new_names(cls, {str(key): value for key, value in values.items()}, lambda n: f"{where}{sep}{n}").items():
        name = key.replace("-", "_")
        if name not in known:
            raise _unknown_key(where, key, known, name)
        parsed[name] = parse(known[name], value, f"{where}{sep}{name}")
        check_value(known[name], parsed[name], f"{where}{sep}{name}")
    config = cls(**parsed)
    try:
        check(config)
    except IgdrecError as exc:
        raise IgdrecError(f"{where}: {exc}") from None
    return config


def read_yaml(path: Path) -> Any:
    """The content of a YAML file; a directory, a missing or unreadable file or broken YAML: one line each."""
    if path.is_dir():
        raise IgdrecError(f"{path}: is a directory, not a YAML config file")
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise IgdrecError(f"{path}: config file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise IgdrecError(f"{path}: cannot read the config file ({getattr(exc, 'strerror', None) or exc})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise IgdrecError(f"{path}:{line} is not valid YAML ({getattr(exc, 'problem', exc)})") from exc
