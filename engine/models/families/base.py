"""What every family file shares: the per-layer attention kinds, the HF config fields common to all
families, and Plan, the table from HF tensor names to our parameters that loading and saving both read.

A family module (gpt2.py, llama.py, ...) defines:
  TRAITS        ModelConfig's architectural fields for this family (norm, mlp, positions, biases, ...):
                from_hf starts from them, and ModelConfig fills the ones a caller left None from them
  PREFIX        the HF tensor-name prefix (`transformer.`, `model.`) that load strips and save adds
  WINDOWED      whether its HF config can say that layers attend through a sliding window
  from_hf(d, f) a parsed config.json (f: its hf_json.Fields) -> ModelConfig keyword arguments
  to_hf(cfg)    ModelConfig -> the config.json dict transformers reads for this family
  check(cfg)    family rules on a built ModelConfig (ValueError naming the field)
  plan(cfg)     Plan: HF tensor name (PREFIX stripped) -> our parameter; and the names to skip (buffers)
"""
from __future__ import annotations

LAYER_TYPES = ("full_attention", "sliding_attention")

# (our parameter, the rows it fills or None for all, stored transposed as GPT-2's Conv1D stores its weights)
Target = tuple[str, "tuple[int, int] | None", bool]


class Plan(dict):
    """HF tensor name (prefix stripped) -> Target."""

    def whole(self, theirs: str, ours: str, kinds=("weight", "bias"), transposed: bool = False) -> None:
        for kind in kinds:
            self[f"{theirs}.{kind}"] = (f"{ours}.{kind}", None, transposed and kind == "weight")

    def split(self, names, ours: str, sizes, kinds=("weight",)) -> None:
        """HF's separate tensors `names` (e.g. q/k/v) filling consecutive row ranges of our fused parameter."""
        for kind in kinds:
            start = 0
            for name, n in zip(names, sizes):
                self[f"{name}.{kind}"] = (f"{ours}.{kind}", (start, start + n), False)
                start += n


def qkv_sizes(cfg) -> list[int]:
    return [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]


def with_bias(on: bool) -> tuple[str, ...]:
    return ("weight", "bias") if on else ("weight",)


def common_hf(cfg) -> dict:
    """The config.json fields every family writes the same way."""
    return dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
                eos_token_id=cfg.eos_token_id, torch_dtype="float32")


def normalized(window: int, types: list[str]) -> tuple[int, list[str] | None]:
    """(sliding_window, layer_types) with no window at all stated one way: (0, None)."""
    return (window, types) if "sliding_attention" in types else (0, None)
