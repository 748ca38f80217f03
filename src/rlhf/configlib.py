"""Typed dataclass configs: YAML <-> dataclass <-> command-line flags, with strict validation.

Every config is a plain dataclass whose fields carry a docstring (a string literal right under the
field), as in litgpt. That docstring is the field's ``--help`` text. Values flow in three layers,
each overriding the last: the dataclass defaults, a YAML file (``--config FILE``), then per-field
flags (``--train.lr 3e-4``; nested groups are joined with dots). Unknown keys, wrong types and
contradictory settings raise :class:`ConfigError` naming the key before any work starts.

A config class may define ``validate(self)`` that raises ConfigError for contradictions between its
fields; :func:`from_dict` calls it after building the object, depth first.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import math
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, or contradicts another one."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a dataclass to the docstring written under it in the class body."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _strip_optional(tp: Any) -> Any:
    if _is_optional(tp):
        rest = [a for a in get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else Union[tuple(rest)]  # noqa: UP007
    return tp


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if _is_optional(tp):
        return f"{_type_name(_strip_optional(tp))} or null"
    if get_origin(tp) in (list, tuple):
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


_YAML_BOOLS = {True: ("yes", "y", "on", "true"), False: ("no", "n", "off", "false")}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and where lossless, convert) one value against its annotation."""
    if value is None:
        if _is_optional(tp):
            return None
        raise ConfigError(f"{key}: must be {_type_name(tp)}, got null")
    tp = _strip_optional(tp)
    origin = get_origin(tp)
    bad = ConfigError(f"{key}: must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and value not in choices:
            # YAML 1.1 (PyYAML, and so every flag) reads `no`, `off`, `yes`, `on` as booleans: `mixed_precision: no`
            # means the choice spelled that way.
            spelled = [c for c in choices if isinstance(c, str) and c.lower() in _YAML_BOOLS[value]]
            value = spelled[0] if len(spelled) == 1 else value
        if value not in choices:
            raise bad
        return value
    if origin in (list, tuple):
        if isinstance(value, str):  # "a,b" from a flag or a YAML scalar
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        items = [_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; users write it all the time
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"{key}: unsupported config type {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a nested dict, rejecting unknown keys and wrong types by their dotted name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
    defaults = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for k, v in data.items():
        f = defaults[k]
        if isinstance(v, dict) and f.default_factory is not dataclasses.MISSING:
            # A partial section is laid over the parent's default for it (e.g. SFT's 3 epochs),
            # not over the bare defaults of the section's class.
            v = merge(to_dict(f.default_factory()), v)
        kwargs[k] = _coerce(v, hints[k], f"{prefix}{k}")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """The nested plain-dict form of a config (lists for tuples), ready for YAML or JSON."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base`` (nested dicts merge; everything else replaces)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------------------------
# Command-line flags


def _flag_value(text: str) -> Any:
    """Parse a flag's text the way YAML would ("3e-4" -> float, "null" -> None, "a,b" stays a str)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "", defaults: Any = None) -> None:
    """Add one ``--group.field`` flag per leaf field of ``cls``; defaults stay out of the namespace.

    The help shows the defaults of ``defaults`` (an instance; by default ``cls()``), so a group's
    help reads the stage's own defaults (SFT's 3 epochs), not those of the group's class.
    """
    docs = field_docs(cls)
    hints = _hints(cls)
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        tp = _strip_optional(hints[f.name])
        name = f"{prefix}{f.name}"
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            add_arguments(parser, tp, prefix=f"{name}.", defaults=default)
            continue
        help_text = f"{docs.get(f.name, '')} [{_type_name(hints[f.name])}; default: {default!r}]"
        help_text = help_text.replace("%", "%%")
        if tp is bool:
            parser.add_argument(f"--{name}", dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif get_origin(tp) in (list, tuple):
            numbers = all(a in (int, float) for a in get_args(tp) if a is not Ellipsis)  # list[int]: "4" is 4
            parser.add_argument(f"--{name}", dest=name, nargs="+", default=argparse.SUPPRESS,
                                type=_flag_value if numbers and get_args(tp) else str, metavar="VALUE", help=help_text)
        else:
            parser.add_argument(f"--{name}", dest=name, type=_flag_value, default=argparse.SUPPRESS,
                                metavar=name.rsplit(".", 1)[-1].upper(), help=help_text)


def overrides_from_namespace(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    """Turn the dotted flags that were given into a nested dict that :func:`merge` can apply."""
    leaf_names = set(_leaf_names(cls))
    nested: dict[str, Any] = {}
    for dotted, value in vars(ns).items():
        if dotted not in leaf_names:
            continue
        node = nested
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def _leaf_names(cls: type, prefix: str = "") -> list[str]:
    hints = _hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        tp = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out += _leaf_names(tp, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def build_config(
    cls: type[T], ns: argparse.Namespace, *, section: str | None = None, whole: type | None = None
) -> T:
    """defaults <- YAML (``ns.config``) <- flags, then validate.

    ``section`` lets a stage command read its part of a pipeline YAML (``rlhf sft --config demo.yaml``
    reads ``sft:``). The whole file is still validated against ``whole`` so a typo anywhere in it is
    caught, not silently ignored.
    """
    data: dict[str, Any] = {}
    path = getattr(ns, "config", None)
    if path:
        raw = load_yaml(path)
        try:
            if section is not None and whole is not None and section in raw:
                from_dict(whole, raw)  # validate the whole pipeline file
                data = raw[section] or {}
            else:
                from_dict(cls, raw)  # validate early so the error names the file
                data = raw
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
    data = merge(data, overrides_from_namespace(ns, cls))
    return from_dict(cls, data)
