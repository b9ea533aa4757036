"""Loading and saving configs: YAML 1.2 files and ``dotted.key=value`` overrides into a
validated :class:`~bida.config.schema.Config`, and a config back to YAML.

Types are checked against the dataclass annotations (:func:`_coerce`), an unknown key is
refused with the nearest known key (:func:`unknown_key`), and every built config goes
through the checks of :mod:`bida.config.checks`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..errors import ConfigError
from .checks import check_model_choices, check_ranges, default_feature
from .schema import DEFAULTS_FILE, Config, ModelConfig


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert YAML lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: must not be null")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 and 1e6 (no dot) as strings
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .inf would pass every ">= x" check, .nan every comparison
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def unknown_key(full: str, known: list[str], where: str = "") -> ConfigError:
    """The error for the unknown key ``full``: the nearest of ``known`` (same section), or the section's keys."""
    section, _, name = full.rpartition(".")
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = (f"did you mean '{section + '.' if section else ''}{near[0]}'?" if near
            else f"known{' in ' + section if section else ''}: {', '.join(sorted(known))}")
    return ConfigError(f"unknown config key '{full}'{where} ({hint})")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise unknown_key(f"{prefix}.{key}" if prefix else str(key), sorted(names))
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _normalise_method(data: dict) -> dict:
    # ``method: bida`` is shorthand for ``method: {name: bida}``.
    if isinstance(data.get("method"), str):
        data = dict(data)
        data["method"] = {"name": data["method"]}
    return data


def to_dict(cfg: Any) -> Any:
    """A plain dict/list tree of a config (tuples become lists), for YAML and logs."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 (core schema) numbers.

    YAML 1.1, which PyYAML implements, reads ``010`` as 8 (octal), ``1:30`` as 90
    (sexagesimal) and ``1_000`` as 1000, and needs a dot in ``1.0e-3``. Here ``010`` is 10,
    ``1:30`` and ``1_000`` are strings (refused by a number key), ``1e-3`` is a float, and
    only ``0o17`` and ``0x1f`` are octal and hexadecimal.
    """


_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(_INT_TAG, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                    list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(
    _FLOAT_TAG, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                           r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_int_12(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    try:
        return int(text, 10)  # leading zeros are decimal
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a YAML 1.2 integer",
                                                node.start_mark) from None


_Yaml12Loader.add_constructor(_INT_TAG, _construct_int_12)


def yaml_load(text: str) -> Any:
    """Parse YAML with YAML 1.2 numbers (:class:`_Yaml12Loader`): config files and overrides."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"malformed override '{text}': expected dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p or not p.replace("_", "a").isalnum() for p in parts):
        raise ConfigError(f"malformed override '{text}': bad key '{key}'")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"malformed override '{text}': value is not valid YAML") from None
    if parts == ["method"] and isinstance(value, str):
        parts = ["method", "name"]
    return parts, value


def _set_path(tree: dict, parts: list[str], value: Any, text: str) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            raise unknown_key(".".join(parts[: i + 1]), [k for k, v in node.items() if isinstance(v, dict)],
                              f" in override '{text}'")
        node = child
    if parts[-1] not in node:
        raise unknown_key(".".join(parts), list(node), f" in override '{text}'")
    node[parts[-1]] = value


def from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated :class:`Config` from a (partial) dict and dotted overrides."""
    tree = to_dict(_build(Config, _normalise_method(data or {})))
    for text in overrides:
        parts, value = parse_override(text)
        _set_path(tree, parts, value, text)
    return _build_checked(tree)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the packaged ``defaults.yaml`` when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown key, wrong type or bad override.
    """
    data: dict = {}
    if path is None:
        # Without -c: the packaged CPU-sized experiment on the embedded synthetic pair.
        path = DEFAULTS_FILE
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        try:
            data = yaml_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
    return from_dict(data, overrides)


def replace_path(cfg: Config, **dotted: Any) -> Config:
    """A copy of ``cfg`` with ``a__b=value`` (for ``a.b``) replaced and re-validated."""
    tree = to_dict(cfg)
    for key, value in dotted.items():
        parts = key.split("__")
        _set_path(tree, parts, to_dict(value), key)
    return _build_checked(tree)


def _build_checked(tree: dict) -> Config:
    """The :class:`Config` of a full tree, with every numeric key range-checked.

    Keys whose default depends on others (``method.feature`` on ``model.backbone``) are
    resolved here, after the file and the overrides, so that the config holds explicit
    values (a dumped config reads back the same).
    """
    if tree.get("method", {}).get("feature") is None:
        backbone = tree.get("model", {}).get("backbone", ModelConfig.backbone)
        tree = {**tree, "method": {**tree.get("method", {}), "feature": default_feature(backbone)}}
    cfg = _build(Config, tree)
    check_ranges(cfg)
    check_model_choices(cfg)
    return cfg


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML atomically (a crash never leaves a half-written config)."""
    from ..checkpoint import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
