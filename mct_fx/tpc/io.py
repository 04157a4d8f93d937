"""TPC to JSON and back, with errors that name the bad field (``tpc.operator_sets[3].name``)."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import types
import typing
from typing import Any

from mct_fx.tpc.schema import TargetPlatformCapabilities, TPCError

__all__ = ["tpc_to_dict", "tpc_from_dict", "save_tpc", "load_tpc"]

_SCHEMA_VERSION = 1


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    return obj


def tpc_to_dict(tpc: TargetPlatformCapabilities) -> dict:
    """Plain JSON-ready dict of a TPC."""
    return {"schema_version": _SCHEMA_VERSION, **_to_plain(tpc)}


def _build(tp: Any, data: Any, where: str) -> Any:
    """Build a value of annotated type ``tp`` from plain JSON data."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _build(inner, data, where)
    if origin is tuple:
        if not isinstance(data, list):
            raise TPCError(f"{where}: expected a list, got {type(data).__name__}")
        args = typing.get_args(tp)
        return tuple(_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(data))
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise TPCError(f"{where}: expected an object, got {type(data).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise TPCError(f"{where}.{unknown[0]}: unknown field (expected one of {sorted(fields)})")
        kwargs = {name: _build(hints[name], data[name], f"{where}.{name}") for name in fields if name in data}
        try:
            return tp(**kwargs)
        except TPCError as e:
            raise TPCError(f"{where}.{e}") from None
        except TypeError as e:
            raise TPCError(f"{where}: {e}") from None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            raise TPCError(f"{where}: {data!r} is not one of {[m.value for m in tp]}") from None
    if tp in (int, float, str, bool):
        ok = isinstance(data, tp) and not (tp is not bool and isinstance(data, bool))
        if tp is float and isinstance(data, int) and not isinstance(data, bool):
            ok = True
        if not ok:
            raise TPCError(f"{where}: expected {tp.__name__}, got {data!r}")
        return data
    raise TPCError(f"{where}: unsupported field type {tp!r}")  # pragma: no cover


def tpc_from_dict(data: dict) -> TargetPlatformCapabilities:
    """Validate and build a TPC from a plain dict (as written by :func:`tpc_to_dict`)."""
    if not isinstance(data, dict):
        raise TPCError(f"tpc: expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    version = data.pop("schema_version", _SCHEMA_VERSION)
    if version != _SCHEMA_VERSION:
        raise TPCError(f"tpc.schema_version: unsupported version {version!r} (this mct_fx reads {_SCHEMA_VERSION})")
    return _build(TargetPlatformCapabilities, data, "tpc")


def save_tpc(tpc: TargetPlatformCapabilities, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        json.dump(tpc_to_dict(tpc), f, indent=2)


def load_tpc(path: str | os.PathLike) -> TargetPlatformCapabilities:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TPCError(f"{path}: not valid JSON ({e})") from None
    return tpc_from_dict(data)
