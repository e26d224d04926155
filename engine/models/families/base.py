"""What every family file shares: the per-layer attention kinds, the HF config fields common to all
families, and Plan, the table from HF tensor names to our parameters that loading and saving both read.

A family module (gpt2.py, llama.py, ...) defines:
  TRAITS        ModelConfig's architectural fields for this family (norm, mlp, positions, biases, ...):
                from_hf starts from them, and ModelConfig fills the ones a caller left None from them
  PREFIX        the HF tensor-name prefix (`transformer.`, `model.`) that load strips and save adds
  HEAD          the untied output head's tensor name, outside PREFIX (`lm_head`; GPT-NeoX: `embed_out`)
  WINDOWED      whether its HF config can say that layers attend through a sliding window
  from_hf(d, f) a parsed config.json (f: its hf_json.Fields) -> ModelConfig keyword arguments
  to_hf(cfg)    ModelConfig -> the config.json dict transformers reads for this family
  check(cfg)    family rules on a built ModelConfig (ValueError naming the field)
  plan(cfg)     Plan: HF tensor name (PREFIX stripped) -> our parameter; and the names to skip (buffers)
"""
from __future__ import annotations

import torch

LAYER_TYPES = ("full_attention", "sliding_attention")
# a trait's value when neither the caller nor the family's TRAITS gives one (ModelConfig's trait fields)
NEUTRAL_TRAITS = dict(norm_offset=0.0, rotary_fraction=1.0, rotary_layout="half", parallel_residual=False,
                      shared_norm=False, qk_norm=False, attn_scale=None, embed_scale=None, head_bias=False)

# (our parameter, the rows it fills or None for all, stored transposed as GPT-2's Conv1D stores its weights,
# None or the row each of the tensor's rows lands in: a checkpoint whose rows are in another order)
Target = tuple[str, "tuple[int, int] | None", bool, "torch.Tensor | None"]


class Plan(dict):
    """HF tensor name (prefix stripped) -> Target."""

    def whole(self, theirs: str, ours: str, kinds=("weight", "bias"), transposed: bool = False,
              order: torch.Tensor | None = None) -> None:
        for kind in kinds:
            self[f"{theirs}.{kind}"] = (f"{ours}.{kind}", None, transposed and kind == "weight", order)

    def split(self, names, ours: str, sizes, kinds=("weight",), orders=None) -> None:
        """HF's separate tensors `names` (e.g. q/k/v) filling consecutive row ranges of our fused parameter."""
        for kind in kinds:
            start = 0
            for i, (name, n) in enumerate(zip(names, sizes)):
                self[f"{name}.{kind}"] = (f"{ours}.{kind}", (start, start + n), False, orders and orders[i])
                start += n


def rotary_order(cfg, heads: int) -> torch.Tensor:
    """For the q or k projection (`heads` heads) of an interleaved-rotary checkpoint (GPT-J's pairs
    (2i, 2i + 1) of each head's first rotary_dim dims): the row each of its rows lands in, so that the
    pairs become (i, i + rotary_dim / 2), the halves the layers rotate. The other dims stay in place."""
    d, r = cfg.head_dim, cfg.rotary_dim
    within = torch.arange(d)
    within[:r] = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2)]).argsort()
    return (torch.arange(heads)[:, None] * d + within).flatten()


def qkv_sizes(cfg) -> list[int]:
    return [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]


def fixed_traits(cfg, traits: dict, free=()) -> None:
    """to_hf's guard: every trait but the `free` ones (those the family's config.json states) has the
    family's value, so transformers builds the model that was trained or loaded."""
    want = {**NEUTRAL_TRAITS, **traits}
    for name in ("norm", "mlp", "activation", "positions", *NEUTRAL_TRAITS, "bias", "qkv_bias", "mlp_bias"):
        expected = want.get(name, want["bias"] if name in ("qkv_bias", "mlp_bias") else None)
        if name not in free and getattr(cfg, name) != expected:
            raise ValueError(f"a {cfg.model_type} config.json cannot state {name}={getattr(cfg, name)!r} "
                             f"(the family has {expected!r})")


def with_bias(on: bool) -> tuple[str, ...]:
    return ("weight", "bias") if on else ("weight",)


def common_hf(cfg) -> dict:
    """The config.json fields every family writes the same way."""
    return dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
                eos_token_id=cfg.eos_token_id, torch_dtype="float32")


def normalized(window: int, types: list[str]) -> tuple[int, list[str] | None]:
    """(sliding_window, layer_types) with no window at all stated one way: (0, None)."""
    return (window, types) if "sliding_attention" in types else (0, None)
