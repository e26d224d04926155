"""GPT-2: LayerNorm, a plain GELU MLP, learned positions, biases on every linear, and Conv1D weights
(stored transposed, q/k/v fused in one c_attn). Checkpoints name tensors with or without `transformer.`
(the hub's original layout also carries the attention's bias / masked_bias mask buffers).

gpt_neo.py reads this file's activation mapping and the learned-positions tensor plan.
"""
from __future__ import annotations

from ..hf_json import Fields
from ..rope import MAX_POSITIONS
from .base import Plan, common_hf, fixed_traits

TRAITS = dict(norm="layernorm", mlp="plain", activation="gelu_tanh", positions="learned", bias=True)
PREFIX = "transformer."
WINDOWED = False

MASK_BUFFERS = r"h\.\d+\.attn\.(attention\.)?(bias|masked_bias)"  # causal masks saved by older checkpoints
HF_GELU = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}  # ours -> HF's activation_function


def activation(f: Fields, mt: str) -> str:
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    act = f.str("activation_function", "gelu_new")
    if act not in acts:
        raise ValueError(f"config.json: unsupported {mt} activation_function {act!r}")
    return acts[act]


def from_hf(d: dict, f: Fields) -> dict:
    act = activation(f, "gpt2")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        if f.bool(key, want) != want:
            raise ValueError(f"config.json: gpt2 with {key}={not want} is not supported")
    n_embd = f.int("n_embd")
    return dict(TRAITS, vocab_size=f.int("vocab_size"), n_layer=f.int("n_layer"), n_head=f.int("n_head"),
                d_model=n_embd, d_ff=f.opt_int("n_inner", 1) or 4 * n_embd,
                max_seq_len=f.int("n_positions", 1024, hi=MAX_POSITIONS),
                norm_eps=f.float("layer_norm_epsilon", 1e-5), tie_embeddings=f.bool("tie_word_embeddings", True),
                activation=act)


def to_hf(cfg) -> dict:
    fixed_traits(cfg, TRAITS, free=("activation",))
    return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=cfg.d_model, n_layer=cfg.n_layer,
                n_head=cfg.n_head, n_inner=cfg.d_ff, n_positions=cfg.max_seq_len, n_ctx=cfg.max_seq_len,
                layer_norm_epsilon=cfg.norm_eps, activation_function=HF_GELU[cfg.activation], resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0, **common_hf(cfg))


def check(cfg) -> None:
    pass


def learned_plan(cfg, plan: Plan, conv1d: bool) -> None:
    """Embeddings, norms and MLP of the GPT-2-style families (the attention is each family's own)."""
    plan.whole("wte", "tok_emb", ("weight",))
    plan.whole("wpe", "pos_emb", ("weight",))
    plan.whole("ln_f", "norm_f")
    for i in range(cfg.n_layer):
        h, p = f"h.{i}.", f"layers.{i}."
        plan.whole(h + "ln_1", p + "norm1")
        plan.whole(h + "ln_2", p + "norm2")
        plan.whole(h + "mlp.c_fc", p + "mlp.fc", transposed=conv1d)
        plan.whole(h + "mlp.c_proj", p + "mlp.proj", transposed=conv1d)


def plan(cfg) -> tuple[Plan, str]:
    p = Plan()
    learned_plan(cfg, p, conv1d=True)
    for i in range(cfg.n_layer):
        p.whole(f"h.{i}.attn.c_attn", f"layers.{i}.attn.qkv", transposed=True)
        p.whole(f"h.{i}.attn.c_proj", f"layers.{i}.attn.proj", transposed=True)
    return p, MASK_BUFFERS
