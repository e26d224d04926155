"""Command-line flags generated from a config dataclass (EngineConfig, TrainConfig): one source
for names, types, defaults and help text. Field metadata: "help"; optional "choices", "flag"
(another name), "hidden" (left out of --help), "cpu"/"gpu" (what a None default becomes there), "parse" (the
function that reads the flag's text, where the type cannot)."""
from __future__ import annotations

import argparse
import dataclasses
import typing


def _base_type(hint):
    """int | None -> int."""
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


def _help(f) -> str:
    meta = f.metadata
    if meta.get("hidden"):
        return argparse.SUPPRESS
    text = meta.get("help", "")
    if meta.get("cpu") is not None:
        text += f" (default: {meta['cpu']} on CPU, {meta['gpu']} on GPU)"
    elif f.default not in (None, dataclasses.MISSING) and not isinstance(f.default, bool):
        text += f" (default: {f.default})"
    return text.replace("%", "%%")  # argparse %-formats help texts


def flag(f, hint) -> tuple[str, dict]:
    """A field's flag: --kebab-name of the field's type and default; a bool is a switch that turns
    its default around (--x for False or None, --no-x for True)."""
    name = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
    kwargs = dict(dest=f.name, help=_help(f))
    tp = _base_type(hint)
    if tp is bool:
        if f.default is True:
            if kwargs["help"] != argparse.SUPPRESS:
                kwargs["help"] = f"turn off: {f.metadata.get('help', '')} (on by default)"
            return "--no-" + name[2:], dict(kwargs, action="store_false", default=True)
        return name, dict(kwargs, action="store_true", default=f.default)
    kwargs["type"] = f.metadata.get("parse", tp)
    choices = f.metadata.get("choices")
    if choices:
        kwargs["choices"] = choices
    else:
        kwargs["metavar"] = {int: "N", float: "F"}.get(tp, f.name.upper())
    if f.default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = f.default
    return name, kwargs


def add_dataclass_args(parser, cls, skip=()) -> None:
    """One flag per field of cls (but those in skip), on parser or an argument group."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            name, kwargs = flag(f, hints[f.name])
            parser.add_argument(name, **kwargs)


def from_args(cls, args: argparse.Namespace, **overrides):
    """cls built from the parsed flags (fields without a flag keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **overrides})
