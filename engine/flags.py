"""Command-line flags generated from a config dataclass: one source for names, types,
defaults and help text (field metadata "help", optional "choices" and "flag")."""
from __future__ import annotations

import argparse
import dataclasses
import typing


def _base_type(tp):
    """int | None -> int; the field's annotation as a plain type."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_dataclass_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, skip=()) -> None:
    """One --kebab-case flag per field of cls (its defaults become None: only what the user
    set is passed on, the dataclass keeps the defaults). A bool defaulting to True gets --no-NAME."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        help_ = f.metadata.get("help", "")
        tp = _base_type(hints[f.name])
        name = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        if tp is bool:
            if f.default is True:
                parser.add_argument("--no-" + name[2:], dest=f.name, action="store_false", default=None, help=help_)
            else:
                parser.add_argument(name, dest=f.name, action="store_true", default=None, help=help_)
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            parser.add_argument(name, dest=f.name, type=tp if tp in (int, float) else str, default=None,
                                choices=f.metadata.get("choices"),
                                help=f"{help_} (default: {default})" if default is not None else help_)


def from_args(cls, args: argparse.Namespace, **overrides):
    """cls built from the flags the user set (others keep the dataclass defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return cls(**{**given, **overrides})
