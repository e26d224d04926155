"""Qwen2: llama with biases on the q/k/v projections, and a sliding window only with use_sliding_window,
in the layers its layer_types names (by default those from max_window_layers on), as transformers builds
its masks."""
from __future__ import annotations

from ..hf_json import Fields
from . import llama
from .base import LAYER_TYPES, fixed_traits, normalized

TRAITS = dict(llama.TRAITS, qkv_bias=True)
PREFIX = llama.PREFIX
WINDOWED = True
plan = llama.plan
check = llama.check


def _sliding_layers(d: dict, f: Fields, n_layer: int) -> tuple[int, list[str] | None]:
    on = f.bool("use_sliding_window", False) and d.get("sliding_window") is not None
    window = f.int("sliding_window") if on else 0
    types = d.get("layer_types")
    if types is None:
        first = f.int("max_window_layers", 28, lo=0)
        types = [LAYER_TYPES[bool(window) and i >= first] for i in range(n_layer)]
    elif not isinstance(types, list) or len(types) != n_layer or not all(t in LAYER_TYPES for t in types):
        raise ValueError(f"config.json: layer_types must list one of {LAYER_TYPES} per layer ({n_layer}), "
                         f"got {types!r}")
    if "sliding_attention" in types and not window:
        raise ValueError("config.json: layer_types has sliding_attention layers without use_sliding_window and "
                         "a sliding_window")
    return normalized(window, types)


def from_hf(d: dict, f: Fields) -> dict:
    window, layer_types = _sliding_layers(d, f, f.int("num_hidden_layers"))
    return dict(llama.hf_kwargs("qwen2", d, f, 32768), sliding_window=window, layer_types=layer_types)


def to_hf(cfg) -> dict:
    fixed_traits(cfg, TRAITS)
    return dict(to_hf_fields(cfg), model_type="qwen2", architectures=["Qwen2ForCausalLM"])


def to_hf_fields(cfg) -> dict:
    """The config.json fields of qwen2 and qwen3: llama's and the windowed layers."""
    w = cfg.windowed
    if not any(w):  # transformers derives the layer types from these
        return dict(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer, **llama.hf_arch(cfg))
    return dict(use_sliding_window=True, sliding_window=cfg.sliding_window, max_window_layers=w.index(True),
                layer_types=[LAYER_TYPES[x] for x in w], **llama.hf_arch(cfg))
