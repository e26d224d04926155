"""GPT-NeoX (Pythia, GPT-NeoX-20B): LayerNorm, a plain GELU MLP, rotary positions on a rotary_pct share of
each head (rotate_half within it), attention and MLP in parallel off the block's input, each behind its own
norm (use_parallel_residual), biases on every linear (attention_bias for the attention's), an untied head
named embed_out, and q/k/v fused per head in one query_key_value tensor: rows (head, q|k|v, dim), which the
plan reorders into our (q|k|v, head, dim)."""
from __future__ import annotations

import torch

from ..hf_json import Fields
from . import gpt2, llama
from .base import Plan, common_hf, fixed_traits

TRAITS = dict(norm="layernorm", mlp="plain", activation="gelu", positions="rotary", bias=True,
              parallel_residual=True)
PREFIX = "gpt_neox."
HEAD = "embed_out"
WINDOWED = False
_FREE = ("activation", "rotary_fraction", "parallel_residual", "bias", "qkv_bias")


def from_hf(d: dict, f: Fields) -> dict:
    # the pre-transformers-5 names of the rope fields; hf_kwargs reads the llama ones
    d = dict(d)
    if "rope_parameters" not in d and "rope_scaling" not in d:
        d["rope_theta"] = d.get("rotary_emb_base", d.get("rope_theta", 10000.0))
        d["partial_rotary_factor"] = d.get("rotary_pct", d.get("partial_rotary_factor", 0.25))
    elif "partial_rotary_factor" not in (d.get("rope_parameters") or d.get("rope_scaling") or {}):
        d["partial_rotary_factor"] = d.get("rotary_pct", 0.25)
    acts = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
    kw = llama.hf_kwargs("gpt_neox", d, Fields(d), 2048, partial=True, acts=acts)
    bias = f.bool("attention_bias", True)
    return {**kw, **TRAITS, "activation": kw["activation"], "n_kv_head": 0,
            "norm_eps": f.float("layer_norm_eps", 1e-5), "bias": bias, "qkv_bias": bias, "mlp_bias": True,
            "parallel_residual": f.bool("use_parallel_residual", True)}


def to_hf(cfg) -> dict:
    fixed_traits(cfg, TRAITS, free=_FREE)
    check(cfg)
    if cfg.qkv_bias != cfg.bias:
        raise ValueError("gpt_neox has one attention_bias for query_key_value and dense (qkv_bias == bias)")
    arch = llama.hf_arch(cfg, {v: k for k, v in gpt2.HF_GELU.items()}[cfg.activation])
    for key in ("rms_norm_eps", "num_key_value_heads"):
        del arch[key]
    return dict(arch, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], layer_norm_eps=cfg.norm_eps,
                rotary_pct=cfg.rotary_fraction, rotary_emb_base=cfg.rope_theta,
                partial_rotary_factor=cfg.rotary_fraction, use_parallel_residual=cfg.parallel_residual,
                attention_bias=cfg.bias, hidden_dropout=0.0, attention_dropout=0.0)


def check(cfg) -> None:
    if cfg.n_kv_head != cfg.n_head:
        raise ValueError(f"n_kv_head: gpt_neox has no grouped-query attention ({cfg.n_kv_head} != {cfg.n_head})")
    if cfg.head_dim * cfg.n_head != cfg.d_model:
        raise ValueError(f"head_dim: gpt_neox heads split d_model ({cfg.n_head} x {cfg.head_dim} != {cfg.d_model})")


def _fused_order(cfg) -> torch.Tensor:
    """query_key_value's row (head, part, dim) -> our row (part, head, dim)."""
    h, d = cfg.n_head, cfg.head_dim
    return torch.arange(3 * h * d).view(3, h, d).permute(1, 0, 2).flatten()


def plan(cfg) -> tuple[Plan, str]:
    p = Plan()
    p.whole("embed_in", "tok_emb", ("weight",))
    p.whole("final_layer_norm", "norm_f")
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layer):
        h, ours = f"layers.{i}.", f"layers.{i}."
        p.whole(h + "input_layernorm", ours + "norm1")
        p.whole(h + "post_attention_layernorm", ours + "norm2")
        p.whole(h + "attention.query_key_value", ours + "attn.qkv", kinds, order=_fused_order(cfg))
        p.whole(h + "attention.dense", ours + "attn.proj", kinds)
        p.whole(h + "mlp.dense_h_to_4h", ours + "mlp.fc")
        p.whole(h + "mlp.dense_4h_to_h", ours + "mlp.proj")
    return p, r"layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)"
