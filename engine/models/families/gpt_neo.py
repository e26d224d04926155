"""GPT-Neo: GPT-2's block with separate q/k/v projections (no bias; out_proj and the MLP have one),
unscaled attention scores (HF's GPTNeoSelfAttention), and per layer global or local (sliding window)
attention from attention_types, expanded as transformers expands it."""
from __future__ import annotations

from ..hf_json import Fields
from ..rope import MAX_POSITIONS
from . import gpt2
from .base import LAYER_TYPES, Plan, common_hf, fixed_traits, normalized, qkv_sizes

TRAITS = dict(gpt2.TRAITS, qkv_bias=False, attn_scale=1.0)
PREFIX = "transformer."
WINDOWED = True


def from_hf(d: dict, f: Fields) -> dict:
    n_layer, d_model = f.int("num_layers"), f.int("hidden_size")
    spec = d.get("attention_types", [[["global", "local"], 12]])
    try:
        types = [t for kinds, n in spec for _ in range(n) for t in kinds]
    except (TypeError, ValueError):
        raise ValueError(f"config.json: attention_types must be [[[\"global\" | \"local\", ...], count], ...], "
                         f"got {spec!r}") from None
    if len(types) != n_layer or not all(t in ("global", "local") for t in types):
        raise ValueError(f"config.json: attention_types must give global or local for each of the {n_layer} "
                         f"layers, got {types!r}")
    window, layer_types = normalized(f.int("window_size", 256), [LAYER_TYPES[t == "local"] for t in types])
    return dict(TRAITS, vocab_size=f.int("vocab_size"), n_layer=n_layer, n_head=f.int("num_heads"),
                d_model=d_model, d_ff=f.opt_int("intermediate_size", 1) or 4 * d_model,
                max_seq_len=f.int("max_position_embeddings", 2048, hi=MAX_POSITIONS),
                norm_eps=f.float("layer_norm_epsilon", 1e-5), tie_embeddings=f.bool("tie_word_embeddings", True),
                activation=gpt2.activation(f, "gpt_neo"), sliding_window=window, layer_types=layer_types)


def to_hf(cfg) -> dict:
    fixed_traits(cfg, TRAITS, free=("activation",))
    types = ["local" if w else "global" for w in cfg.windowed]
    period = next(p for p in range(1, cfg.n_layer + 1) if types == types[:p] * (cfg.n_layer // p))
    return dict(model_type="gpt_neo", architectures=["GPTNeoForCausalLM"], hidden_size=cfg.d_model,
                num_layers=cfg.n_layer, num_heads=cfg.n_head, intermediate_size=cfg.d_ff,
                max_position_embeddings=cfg.max_seq_len, window_size=cfg.sliding_window or 256,
                attention_types=[[types[:period], cfg.n_layer // period]], layer_norm_epsilon=cfg.norm_eps,
                activation_function=gpt2.HF_GELU[cfg.activation], resid_dropout=0.0, embed_dropout=0.0,
                attention_dropout=0.0, **common_hf(cfg))


def check(cfg) -> None:
    pass


def plan(cfg) -> tuple[Plan, str]:
    p = Plan()
    gpt2.learned_plan(cfg, p, conv1d=False)
    for i in range(cfg.n_layer):
        h, ours = f"h.{i}.attn.attention.", f"layers.{i}.attn."
        p.split([h + f"{x}_proj" for x in "qkv"], ours + "qkv", qkv_sizes(cfg))
        p.whole(h + "out_proj", ours + "proj")
    return p, gpt2.MASK_BUFFERS
