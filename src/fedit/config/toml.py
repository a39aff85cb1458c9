"""Reading and writing a config's TOML: nested dicts to checked dataclasses, ``--set``
overrides, and the resolved config back to TOML text. The dataclasses are in
:mod:`fedit.config`."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from typing import Any

from fedit.errors import ConfigError


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, tp: Any, root: type) -> Any:
    """Check ``value`` against the annotated type ``tp``; ints are accepted for floats,
    ``None`` for an optional (``float | None``: TOML has no null, a key left out is None)."""
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(arms) < len(typing.get_args(tp)):
            return None
        for arm in arms[:-1]:
            try:
                return _coerce(key, value, arm, root)
            except ConfigError:
                pass
        return _coerce(key, value, arms[-1], root)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table [{key}], got {value!r}")
        return build(typing.cast(type, tp), value, key + ".", root)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item, root) for i, v in enumerate(value)]
    if origin is dict:
        item = typing.get_args(tp)[1]
        if not isinstance(value, dict):
            kind = "strings" if item is str else "values"
            raise ConfigError(f"{key}: expected a table of {kind}, got {value!r}")
        if item is Any:  # a table a plug-in checks itself ([strategy.params])
            for k, v in value.items():
                if isinstance(v, dict):
                    raise ConfigError(f"{key}.{k}: expected a value, got a table")
            return dict(value)
        return {str(k): _coerce(f"{key}.{k}", v, str, root) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def build(cls: type, raw: dict[str, Any], prefix: str = "", root: type | None = None) -> Any:
    """``cls(**raw)`` with every key and value checked; ``root`` (default ``cls``) is the
    top-level config class, whose keys an unknown key is matched against."""
    root = root or cls
    hints = _field_types(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        if k not in known:
            raise ConfigError(_unknown_key(prefix + k, [prefix + n for n in known], root))
        kwargs[k] = _coerce(prefix + k, v, hints[k], root)
    return cls(**kwargs)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, prefix + f.name + ".")  # type: ignore[arg-type]
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(key: str, candidates: list[str], root: type) -> str:
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in _all_keys(root) if k.rsplit(".", 1)[-1] == leaf]  # 'lr' -> 'train.lr'
    close = same_leaf or difflib.get_close_matches(key, candidates + _all_keys(root), n=1,
                                                   cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{key}'{hint}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4); the value is read as TOML, else text."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.lr=1e-4")
    key, _, text = item.partition("=")
    key, text = key.strip(), text.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: the key is empty")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word such as fedprox or a path
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key=value`` override set (tables created)."""
    out = _deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is a value, not a table")
            node = nxt
        node[path[-1]] = value
    return out


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def toml_text(d: dict[str, Any]) -> str:
    """A config's nested dicts as TOML text: top-level values, then a table a section.
    A None (an optional key not set, ``float | None = None``) is left out: TOML has no
    null, and the key left out loads back as its default None."""
    top = [f"{k} = {_toml_value(v)}" for k, v in d.items()
           if v is not None and not isinstance(v, dict)]
    lines = top
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{_toml_key(a)} = {_toml_value(b)}"
                                       for a, b in v.items() if b is not None]
    return "\n".join(lines) + "\n"
