"""Command-line flags and one serialisation, generated from config dataclasses.

A config field made with :func:`option` states its flag once: help text, and where the flag
differs from the field, its name (``--kv-cache-mb``) and conversions (MiB <-> bytes). Then

* :func:`add_arguments` adds a flag per such field to an argparse parser (type from the
  default, ``--x/--no-x`` for booleans, ``choices`` as declared);
* :func:`from_args` builds the dataclass back from the parsed namespace, so validation stays
  in the dataclass's ``__post_init__`` (``ValueError`` quoting the values);
* :func:`to_json` / :func:`from_json` pass a whole config between processes (the local
  launcher hands each child its config this way, never as rebuilt flag strings);
* :func:`replace` updates fields by their flat names (``replace(worker, tp=2, num_blocks=64)``).

A field holding another config dataclass (``option(nested=True)``) contributes that class's
flags unprefixed (``--tp``, not ``--parallel-tp``); fields of a nested class without
``option`` metadata (``ParallelConfig``) take the nested field's help as a template
(``"{NAME} degree of the instance"``). Fields without ``option`` metadata have no flag.
Flat names are unique within a config, as its flags are.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import MISSING, Field
from typing import Any, Callable


def option(default: Any = MISSING, *, help: str, flag: str = "", default_factory: Any = MISSING,
           choices: tuple | None = None, to_field: Callable | None = None, from_field: Callable | None = None,
           unset: bool = False, nested: bool = False, build: Callable | None = None, repr: bool = True) -> Field:
    """A dataclass field with its command-line flag.

    ``flag``: the flag's name (default ``--`` + the field name with dashes). ``to_field`` turns
    the flag's value into the field's (``from_field`` the field's default into the flag's
    default). ``unset``: the flag defaults to None and, when not given, is left out, so
    ``build`` (default: the class) supplies it, e.g. from the environment. ``nested``: the
    field is a config dataclass whose fields add their own flags (``build`` makes it).
    """
    meta = {"help": help, "flag": flag, "choices": choices, "to_field": to_field,
            "from_field": from_field, "unset": unset, "nested": nested, "build": build}
    return dataclasses.field(default=default, default_factory=default_factory, repr=repr, metadata=meta)


def _nested_type(cls: type, f: Field) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if dataclasses.is_dataclass(a))
    return hint


def _default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def _flagged(cls: type, only=None, template: str | None = None):
    """(field, metadata, nested class or None) of ``cls``'s fields that have flags."""
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata) if "help" in f.metadata else (
            {"help": template.format(name=f.name, NAME=f.name.upper())} if template else None)
        if meta is None or (only is not None and f.name not in only):
            continue
        yield f, meta, _nested_type(cls, f) if meta.get("nested") else None


def _flag_name(f: Field, meta: dict, prefix: str) -> str:
    return "--" + prefix + (meta.get("flag") or f.name).lstrip("-").replace("_", "-")


def _dest(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def add_arguments(cls: type, parser, *, only=None, prefix: str = "", help: str | None = None,
                  defaults: dict | None = None) -> None:
    """Add a flag for each flagged field of ``cls`` (those in ``only`` when given) to ``parser``.
    ``prefix`` goes in front of every flag name (``prefill-`` gives ``--prefill-tp``); ``help``
    is the template for fields without ``option`` metadata; ``defaults`` (field name -> value)
    replaces field defaults (``cleave serve --port`` is 50051 where a worker's is 0)."""
    for f, meta, sub in _flagged(cls, only, help):
        if sub is not None:
            add_arguments(sub, parser, prefix=prefix, help=meta["help"] if "{" in meta["help"] else None)
            continue
        default = (defaults or {}).get(f.name, _default(f))
        kwargs: dict[str, Any] = {"help": meta["help"]}
        if meta.get("unset"):
            kwargs["default"] = None
            kwargs["type"] = type(default)
        elif isinstance(default, bool):
            kwargs.update(default=default, action=argparse.BooleanOptionalAction)
        else:
            shown = meta["from_field"](default) if meta.get("from_field") else default
            kwargs.update(default=shown, type=type(shown))
        if meta.get("choices"):
            kwargs["choices"] = list(meta["choices"])
        parser.add_argument(_flag_name(f, meta, prefix), **kwargs)


def values(cls: type, ns: argparse.Namespace, *, only=None, prefix: str = "", help: str | None = None) -> dict:
    """Field name -> value of the flags :func:`add_arguments` added (nested configs built)."""
    out = {}
    for f, meta, sub in _flagged(cls, only, help):
        if sub is not None:
            sub_help = meta["help"] if "{" in meta["help"] else None
            out[f.name] = (meta.get("build") or sub)(**values(sub, ns, prefix=prefix, help=sub_help))
            continue
        value = getattr(ns, _dest(_flag_name(f, meta, prefix)))
        if value is None and meta.get("unset"):
            continue
        out[f.name] = meta["to_field"](value) if meta.get("to_field") else value
    return out


def from_args(cls: type, ns: argparse.Namespace, **fixed):
    """``cls`` from the parsed flags; ``fixed`` fields (those without flags) as given."""
    return cls(**values(cls, ns), **fixed)


def to_dict(obj) -> dict:
    """A config as plain JSON values (fields with ``repr=False``, i.e. secrets, left out)."""
    out = {}
    for f in dataclasses.fields(obj):
        if not f.repr:
            continue
        value = getattr(obj, f.name)
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else \
            list(value) if isinstance(value, tuple) else value
    return out


def from_dict(cls: type, data: dict, **fixed):
    """The inverse of :func:`to_dict` (nested configs and tuples rebuilt); ``fixed`` adds fields."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if isinstance(value, dict):
            value = from_dict(_nested_type(cls, f), value)
        elif isinstance(value, list) and typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[f.name] = value
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**kwargs, **fixed)


def to_json(obj) -> str:
    return json.dumps(to_dict(obj), sort_keys=True)


def from_json(cls: type, text: str, **fixed):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a {cls.__name__} in JSON: {exc}") from None
    return from_dict(cls, data, **fixed)


def replace(obj, **flat):
    """``obj`` with fields set by their flat names, wherever they sit in its nested configs:
    ``replace(worker, tp=2, num_blocks=64)`` sets ``worker.runtime.parallel.tp`` and
    ``worker.runtime.num_blocks``. Raises ``ValueError`` naming a field that does not exist."""
    changes, rest = {}, dict(flat)
    for f in dataclasses.fields(obj):
        if f.name in rest:
            changes[f.name] = rest.pop(f.name)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if rest and dataclasses.is_dataclass(value) and f.name not in changes:
            names = _flat_names(value)
            mine = {k: rest.pop(k) for k in list(rest) if k in names}
            if mine:
                changes[f.name] = replace(value, **mine)
    if rest:
        raise ValueError(f"{type(obj).__name__} has no fields {sorted(rest)}")
    return dataclasses.replace(obj, **changes)


def _flat_names(obj) -> set[str]:
    names = set()
    for f in dataclasses.fields(obj):
        names.add(f.name)
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            names |= _flat_names(value)
    return names
