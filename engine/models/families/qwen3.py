"""Qwen3: qwen2 without the q/k/v biases (attention_bias puts one on q, k, v and o alike), an RMSNorm over each
head's q and k before the rotation (q_norm, k_norm), and head_dim given in config.json rather than
hidden_size / heads. Sliding windows as qwen2's."""
from __future__ import annotations

from ..hf_json import Fields
from . import llama, qwen2
from .base import Plan, fixed_traits

TRAITS = dict(llama.TRAITS, qk_norm=True)
PREFIX = llama.PREFIX
WINDOWED = True
check = qwen2.check


def from_hf(d: dict, f: Fields) -> dict:
    d = {"head_dim": 128, **d}  # transformers' default, not hidden_size / heads
    bias = f.bool("attention_bias", False)
    return {**qwen2.from_hf(d, Fields(d)), **TRAITS, "bias": bias, "qkv_bias": bias}


def to_hf(cfg) -> dict:
    fixed_traits(cfg, TRAITS, free=("bias", "qkv_bias"))
    if cfg.qkv_bias != cfg.bias:
        raise ValueError("qwen3 has one attention_bias for q, k, v and o (qkv_bias == bias)")
    return dict(qwen2.to_hf_fields(cfg), model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                head_dim=cfg.head_dim, attention_bias=cfg.bias)


def plan(cfg) -> tuple[Plan, str]:
    p, skip = llama.plan(cfg)
    for i in range(cfg.n_layer):
        p.whole(f"layers.{i}.self_attn.q_norm", f"layers.{i}.attn.q_norm", ("weight",))
        p.whole(f"layers.{i}.self_attn.k_norm", f"layers.{i}.attn.k_norm", ("weight",))
    return p, skip
