"""Writing a model as an HF-format directory (config.json, model.safetensors [, tokenizer.json]) that
transformers' from_pretrained loads with the same logits. Each file is written under a temporary name
and renamed over the old one (atomic.py), so a crash or a full disk mid-save never leaves a half-written
file.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..atomic import atomic_write, write_text
from .gpt import GPT
from .loader import to_hf


def save_model(model: GPT, directory: str | Path, tokenizer=None) -> None:
    """Write an HF-format directory: config.json, model.safetensors [, tokenizer.json]."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu") for k, v in to_hf(model).items()}
    atomic_write(d / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_text(d / "config.json", json.dumps(model.config.to_hf(), indent=2))
    if tokenizer is not None:
        tokenizer.save(d)
