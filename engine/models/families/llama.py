"""Llama: RMSNorm, a gated SiLU MLP (SwiGLU: gate_proj and up_proj, fused here as one GEMM), rotary
positions (rope scaling checked in rope.py), no linear biases, `model.`-prefixed tensors with q/k/v
split.

mistral.py and qwen2.py are this family plus a sliding window (and qwen2's q/k/v biases): they build
on hf_kwargs, hf_arch and plan below, which is what a new llama-like family reuses too.
"""
from __future__ import annotations

import math

from ..hf_json import Fields, is_num
from ..rope import MAX_POSITIONS, check_rope_scaling, rope_context_len, rotary_dims
from .base import Plan, common_hf, fixed_traits, qkv_sizes, with_bias

TRAITS = dict(norm="rmsnorm", mlp="gated", activation="silu", positions="rotary", bias=False)
PREFIX = "model."
WINDOWED = False


def hf_kwargs(mt: str, d: dict, f: Fields, max_pos_default: int, partial: bool = False,
              acts: dict | None = None) -> dict:
    """ModelConfig keyword arguments from the config.json fields every llama-like family shares. partial: the
    family rotates a partial_rotary_factor share of each head (transformers' llama cannot); acts: its HF
    hidden_act names -> ours (default silu only)."""
    acts = acts or {"silu": "silu"}
    act = f.str("hidden_act", next(iter(acts)))
    if act not in acts:
        raise ValueError(f"config.json: unsupported {mt} hidden_act {act!r} (supported: {tuple(acts)})")
    n_head, d_model = f.int("num_attention_heads"), f.int("hidden_size")
    head_dim = f.opt_int("head_dim", 1) or d_model // n_head
    max_pos = f.int("max_position_embeddings", max_pos_default, hi=MAX_POSITIONS)
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}  # transformers 5 prefers rope_scaling
    if not isinstance(rope, dict):
        raise ValueError(f"config.json: rope_scaling must be an object, got {rope!r}")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    if not is_num(theta) or not math.isfinite(theta) or theta <= 1:
        raise ValueError(f"config.json: rope_theta must be a number > 1, got {theta!r}")
    prf = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if prf != 1.0 and not partial:
        raise ValueError(f"config.json: {mt} with partial_rotary_factor {prf!r} is not supported (only 1.0)")
    if not is_num(prf) or not 0 < prf <= 1:
        raise ValueError(f"config.json: partial_rotary_factor must be in (0, 1], got {prf!r}")
    scaling = check_rope_scaling(rope, rotary_dims(head_dim, prf), max_pos,
                                 f.opt_int("original_max_position_embeddings", 1))
    return dict(TRAITS, activation=acts[act], rotary_fraction=float(prf), vocab_size=f.int("vocab_size"),
                n_layer=f.int("num_hidden_layers"), n_head=n_head,
                n_kv_head=f.opt_int("num_key_value_heads", 1) or 0, d_model=d_model,
                d_ff=f.int("intermediate_size"), head_dim=head_dim, max_seq_len=rope_context_len(max_pos, scaling),
                max_position_embeddings=max_pos, norm_eps=f.float("rms_norm_eps", 1e-6), rope_theta=float(theta),
                tie_embeddings=f.bool("tie_word_embeddings", False), rope_scaling=scaling)


def hf_arch(cfg, act: str = "silu") -> dict:
    """The config.json fields every llama-like family writes the same way (act: HF's hidden_act)."""
    # rope_theta at the top and rope_scaling (None when default): both transformers 4.4x and 5.x read these
    return dict(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, hidden_act=act,
                max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
                **common_hf(cfg))


def from_hf(d: dict, f: Fields) -> dict:
    for key in ("attention_bias", "mlp_bias"):
        if f.bool(key, False):
            raise ValueError(f"config.json: llama with {key}=true is not supported")
    return hf_kwargs("llama", d, f, 2048)


def to_hf(cfg) -> dict:
    fixed_traits(cfg, TRAITS)
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], head_dim=cfg.head_dim,
                attention_bias=False, mlp_bias=False, **hf_arch(cfg))


def check(cfg) -> None:
    pass


def plan(cfg, fused: bool = False) -> tuple[Plan, str]:
    """fused: q/k/v in one qkv_proj and gate/up in one gate_up_proj (Phi-3), as our parameters hold them."""
    p = Plan()
    p.whole("embed_tokens", "tok_emb", ("weight",))
    p.whole("norm", "norm_f", ("weight",))
    for i in range(cfg.n_layer):
        h, ours = f"layers.{i}.", f"layers.{i}."
        p.whole(h + "input_layernorm", ours + "norm1", ("weight",))
        p.whole(h + "post_attention_layernorm", ours + "norm2", ("weight",))
        p.whole(h + "self_attn.o_proj", ours + "attn.proj", with_bias(cfg.bias))
        p.whole(h + "mlp.down_proj", ours + "mlp.proj", with_bias(cfg.mlp_bias))
        if fused:
            p.whole(h + "self_attn.qkv_proj", ours + "attn.qkv", with_bias(cfg.qkv_bias))
            p.whole(h + "mlp.gate_up_proj", ours + "mlp.fc", with_bias(cfg.mlp_bias))
            continue
        p.split([h + f"self_attn.{x}_proj" for x in "qkv"], ours + "attn.qkv", qkv_sizes(cfg), with_bias(cfg.qkv_bias))
        p.split([h + "mlp.gate_proj", h + "mlp.up_proj"], ours + "mlp.fc", [cfg.d_ff, cfg.d_ff],
                with_bias(cfg.mlp_bias))
    return p, r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
