"""Phi-3: llama with q/k/v fused in one qkv_proj and gate/up in one gate_up_proj (both already our fused
layouts), a partial_rotary_factor, longrope scaling in the 128k variants (original_max_position_embeddings
at the top of config.json) and, when config.json sets sliding_window, a window over every layer."""
from __future__ import annotations

from ..hf_json import Fields
from . import llama, mistral
from .base import Plan, fixed_traits

TRAITS, PREFIX, WINDOWED, check = llama.TRAITS, llama.PREFIX, True, mistral.check


def from_hf(d: dict, f: Fields) -> dict:
    return dict(llama.hf_kwargs("phi3", d, f, 4096, partial=True), sliding_window=mistral.window(d, f))


def to_hf(cfg) -> dict:
    fixed_traits(cfg, TRAITS, free=("rotary_fraction",))
    hf = dict(llama.hf_arch(cfg), model_type="phi3", architectures=["Phi3ForCausalLM"],
              partial_rotary_factor=cfg.rotary_fraction, sliding_window=cfg.sliding_window or None,
              resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, pad_token_id=None)
    if cfg.head_dim * cfg.n_head != cfg.d_model:  # Phi3's rotary derives the head dim from hidden_size
        raise ValueError(f"head_dim: phi3 heads split d_model ({cfg.n_head} x {cfg.head_dim} != {cfg.d_model})")
    if cfg.rope_scaling and "original_max_position_embeddings" in cfg.rope_scaling:
        hf["original_max_position_embeddings"] = cfg.rope_scaling["original_max_position_embeddings"]
    return hf


def plan(cfg) -> tuple[Plan, str]:
    return llama.plan(cfg, fused=True)
