"""Reading the small JSON files of an HF model directory (config.json, generation_config.json,
tokenizer_config.json): read_json loads one, Fields reads typed values from it so that a bad value
is a ValueError naming the file and the field, never a crash deep in model construction."""
from __future__ import annotations

import json
import math
from pathlib import Path

REQUIRED = object()  # Fields' default for a field the file must have


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Fields:
    """Typed reads of a parsed JSON object; a ValueError names the file and the field."""

    def __init__(self, d: dict, src: str = "config.json"):
        self.d, self.src = d, src

    def _get(self, key, default):
        v = self.d.get(key, default)
        if v is REQUIRED:
            raise ValueError(f"{self.src}: missing required field {key!r}")
        return v

    def int(self, key, default=REQUIRED, lo=1, hi=None):
        v = self._get(key, default)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not is_int(v) or v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise ValueError(f"{self.src}: {key} must be an int {rng}, got {v!r}")
        return v

    def opt_int(self, key, lo=1):
        return None if self.d.get(key) is None else self.int(key, lo=lo)

    def float(self, key, default=REQUIRED, lo=None, hi=None):
        v = self._get(key, default)
        if (not is_num(v) or not math.isfinite(v) or (v <= 0 if lo is None else v < lo)
                or (hi is not None and v > hi)):
            rng = ("> 0" if lo is None else f">= {lo}") + (f" and <= {hi}" if hi is not None else "")
            raise ValueError(f"{self.src}: {key} must be a finite number {rng}, got {v!r}")
        return float(v)

    def bool(self, key, default=REQUIRED):
        v = self._get(key, default)
        if v is None:
            v = default
        if not isinstance(v, bool):
            raise ValueError(f"{self.src}: {key} must be true or false, got {v!r}")
        return v

    def str(self, key, default=REQUIRED):
        v = self._get(key, default)
        if not isinstance(v, str):
            raise ValueError(f"{self.src}: {key} must be a string, got {v!r}")
        return v


def token_ids(v, name: str) -> list[int]:
    """An HF token-id field (None, an int or a list of ints) -> a list."""
    if v is None:
        return []
    ids = v if isinstance(v, list) else [v]
    if not all(is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"{name} must be a non-negative int or a list of them, got {v!r}")
    return list(ids)


def config_path(path) -> Path:
    """config.json of a model directory, or path itself when it names the file."""
    p = Path(path)
    return p / "config.json" if p.is_dir() else p


def read_json(p: Path, required: bool = False) -> dict:
    """A JSON object file; {} when absent (unless required); ValueError naming the file when malformed."""
    if not p.is_file():
        if required:
            raise FileNotFoundError(f"no {p.name} at {p}")
        return {}
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p} must hold a JSON object")
    return d
