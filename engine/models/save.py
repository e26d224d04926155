"""Writing a model as an HF-format directory (config.json, model.safetensors [, tokenizer.json]) that
transformers' from_pretrained loads with the same logits. Each file is written under a temporary name
and renamed over the old one, so a crash mid-save never leaves a half-written file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from .gpt import GPT
from .loader import to_hf


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename over path, so a crash never leaves a half-written file: the
    file is fsynced before the rename and the directory after it, so a power loss cannot leave
    the new name pointing at unwritten data, nor lose the rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model(model: GPT, directory: str | Path, tokenizer=None) -> None:
    """Write an HF-format directory: config.json, model.safetensors [, tokenizer.json]."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu") for k, v in to_hf(model).items()}
    atomic_write(d / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    config = json.dumps(model.config.to_hf(), indent=2)
    atomic_write(d / "config.json", lambda p: Path(p).write_text(config))
    if tokenizer is not None:
        tokenizer.save(d)
