"""GPT-J: LayerNorm, a plain tanh-GELU MLP, attention and MLP in parallel behind one shared norm (ln_1),
rotary positions on the first rotary_dim dims of each head in the interleaved ("rotate every two") layout,
no attention biases but MLP biases, and an untied head with a bias. The plan reorders the q/k rows of the
interleaved layout into the halves the layers rotate (ModelConfig.rotary_layout)."""
from __future__ import annotations

from ..hf_json import Fields
from ..rope import MAX_POSITIONS
from . import gpt2
from .base import Plan, common_hf, fixed_traits, rotary_order

TRAITS = dict(norm="layernorm", mlp="plain", activation="gelu_tanh", positions="rotary", rotary_layout="interleaved",
              parallel_residual=True, shared_norm=True, bias=False, mlp_bias=True, head_bias=True)
PREFIX = "transformer."
WINDOWED = False


def from_hf(d: dict, f: Fields) -> dict:
    n_embd, n_head = f.int("n_embd"), f.int("n_head")
    if n_embd % n_head:
        raise ValueError(f"config.json: gptj needs n_embd ({n_embd}) divisible by n_head ({n_head})")
    rotary_dim = f.int("rotary_dim", 64)
    if rotary_dim > n_embd // n_head or rotary_dim % 2:
        raise ValueError(f"config.json: rotary_dim must be even and at most the head dim {n_embd // n_head}, "
                         f"got {rotary_dim}")
    return dict(TRAITS, vocab_size=f.int("vocab_size"), n_layer=f.int("n_layer"), n_head=n_head, d_model=n_embd,
                d_ff=f.opt_int("n_inner", 1) or 4 * n_embd, max_seq_len=f.int("n_positions", 2048, hi=MAX_POSITIONS),
                norm_eps=f.float("layer_norm_epsilon", 1e-5), tie_embeddings=f.bool("tie_word_embeddings", False),
                activation=gpt2.activation(f, "gptj"), rotary_fraction=rotary_dim / (n_embd // n_head))


def to_hf(cfg) -> dict:
    fixed_traits(cfg, TRAITS, free=("activation", "rotary_fraction"))
    check(cfg)
    return dict(model_type="gptj", architectures=["GPTJForCausalLM"], n_embd=cfg.d_model, n_layer=cfg.n_layer,
                n_head=cfg.n_head, n_inner=cfg.d_ff, n_positions=cfg.max_seq_len, rotary_dim=cfg.rotary_dim,
                layer_norm_epsilon=cfg.norm_eps, activation_function=gpt2.HF_GELU[cfg.activation], resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0, **common_hf(cfg))


def check(cfg) -> None:
    if cfg.n_kv_head != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.d_model:
        raise ValueError("n_kv_head, head_dim: gptj heads split d_model, without grouped-query attention")
    if cfg.rope_scaling is not None or cfg.rope_theta != 10000.0:
        raise ValueError("rope_scaling, rope_theta: gptj rotates with the plain base 10000")


def plan(cfg) -> tuple[Plan, str]:
    p = Plan()
    p.whole("wte", "tok_emb", ("weight",))
    p.whole("ln_f", "norm_f")
    n = cfg.n_head * cfg.head_dim
    order = rotary_order(cfg, cfg.n_head)
    for i in range(cfg.n_layer):
        h, ours = f"h.{i}.", f"layers.{i}."
        p.whole(h + "ln_1", ours + "norm1")
        p.split([h + f"attn.{x}_proj" for x in "qkv"], ours + "attn.qkv", [n, n, n], orders=[order, order, None])
        p.whole(h + "attn.out_proj", ours + "attn.proj", ("weight",))
        p.whole(h + "mlp.fc_in", ours + "mlp.fc")
        p.whole(h + "mlp.fc_out", ours + "mlp.proj")
    return p, gpt2.MASK_BUFFERS + r"|h\.\d+\.attn\.embed_positions"
