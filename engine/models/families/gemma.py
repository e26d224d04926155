"""Gemma: llama with RMSNorm scaling by (1 + weight), token embeddings scaled by sqrt(hidden_size), a GeGLU
MLP (tanh GELU; the legacy hidden_act "gelu" means it too, as transformers reads it), head_dim given in
config.json (256 when absent) and a tied head."""
from __future__ import annotations

from ..hf_json import Fields
from . import llama
from .base import fixed_traits

TRAITS = dict(llama.TRAITS, activation="gelu_tanh", norm_offset=1.0)
PREFIX = llama.PREFIX
WINDOWED = False
plan = llama.plan
_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_tanh"}


def from_hf(d: dict, f: Fields) -> dict:
    for key in ("attention_bias", "use_bidirectional_attention"):
        if f.bool(key, False):
            raise ValueError(f"config.json: gemma with {key}=true is not supported")
    d = {"head_dim": 256, "tie_word_embeddings": True, **d}
    return dict(llama.hf_kwargs("gemma", d, Fields(d), 8192, acts=_ACTS), **TRAITS)


def to_hf(cfg) -> dict:
    fixed_traits(cfg, TRAITS, free=("embed_scale",))
    if cfg.embed_scale != cfg.d_model ** 0.5:
        raise ValueError(f"embed_scale: a gemma config.json states sqrt(d_model) = {cfg.d_model ** 0.5}, "
                         f"got {cfg.embed_scale}")
    return dict(llama.hf_arch(cfg, "gelu_pytorch_tanh"), model_type="gemma", architectures=["GemmaForCausalLM"],
                head_dim=cfg.head_dim, attention_bias=False)


def check(cfg) -> None:
    if cfg.embed_scale is None:  # the family's value depends on d_model: TRAITS cannot hold it
        cfg.embed_scale = cfg.d_model ** 0.5
