"""Mistral: llama with a sliding window over every layer when config.json sets sliding_window (as
transformers builds its masks), none when it is null."""
from __future__ import annotations

from ..hf_json import Fields
from . import llama
from .base import fixed_traits

TRAITS = llama.TRAITS
PREFIX = llama.PREFIX
WINDOWED = True
plan = llama.plan


def window(d: dict, f: Fields) -> int:
    """config.json's sliding_window (every layer), 0 for null."""
    return 0 if d.get("sliding_window") is None else f.int("sliding_window")


def from_hf(d: dict, f: Fields) -> dict:
    return dict(llama.hf_kwargs("mistral", d, f, 131072), sliding_window=window(d, f))


def to_hf(cfg) -> dict:
    fixed_traits(cfg, TRAITS)
    return dict(model_type="mistral", architectures=["MistralForCausalLM"], head_dim=cfg.head_dim,
                sliding_window=cfg.sliding_window or None, **llama.hf_arch(cfg))


def check(cfg) -> None:
    if cfg.layer_types is not None:
        if not all(cfg.windowed):
            raise ValueError(f"layer_types: {cfg.model_type} windows every layer or none (sliding_window set or 0)")
        cfg.layer_types = None  # what from_hf gives: every layer windowed
