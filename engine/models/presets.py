"""Named model shapes for training from scratch (`gpt-engine train --model PRESET`, benchmarks, tests):
GPT-2-style and llama-style sizes, and GPT-3's table laid out as GPT-Neo models. resolve_config turns
a preset name or a config.json path into a ModelConfig."""
from __future__ import annotations

from pathlib import Path

from .config import ModelConfig
from .families.base import LAYER_TYPES

PRESETS = {
    # ~10M params: what `make run` trains on a 2-core CPU in a few minutes
    "gpt2-tiny": dict(model_type="gpt2", n_layer=4, n_head=4, d_model=256, max_seq_len=256, vocab_size=4096),
    "gpt2-small": dict(model_type="gpt2", n_layer=6, n_head=8, d_model=512, max_seq_len=512, vocab_size=8192),
    "gpt2": dict(model_type="gpt2", n_layer=12, n_head=12, d_model=768, max_seq_len=1024, vocab_size=50304),
    "gpt2-medium": dict(model_type="gpt2", n_layer=24, n_head=16, d_model=1024, max_seq_len=1024, vocab_size=50304),
    "llama-tiny": dict(model_type="llama", n_layer=4, n_head=8, n_kv_head=2, d_model=256, max_seq_len=256,
                       vocab_size=4096, norm_eps=1e-5, tie_embeddings=True, bias=False, activation="silu"),
    "llama-small": dict(model_type="llama", n_layer=8, n_head=8, n_kv_head=2, d_model=512, max_seq_len=1024,
                        vocab_size=8192, norm_eps=1e-5, bias=False, activation="silu"),
}


def _gpt3(n_layer: int, d_model: int, n_head: int, max_seq_len: int = 2048, window: int = 256,
          vocab_size: int = 50304) -> dict:
    """GPT-3's architecture (Brown et al. 2020, table 2.1) as a gpt_neo model: dense and locally banded
    (sliding window) attention layers alternating, dense first, as GPT-Neo lays them out."""
    return dict(model_type="gpt_neo", n_layer=n_layer, n_head=n_head, d_model=d_model, max_seq_len=max_seq_len,
                vocab_size=vocab_size, sliding_window=window, layer_types=[*LAYER_TYPES] * (n_layer // 2))


# GPT-3's table gives the 1.3B 24 heads of 128 (3072 != d_model 2048) and the 13B d_model 5140: these use
# 16 heads of 128 (as GPT-Neo 1.3B does) and 5120 = 40 heads of 128
PRESETS.update({
    "gpt3-tiny": _gpt3(4, 256, 4, max_seq_len=256, window=64, vocab_size=4096),  # for tests and `make run`-sized runs
    "gpt3-small": _gpt3(12, 768, 12),
    "gpt3-medium": _gpt3(24, 1024, 16),
    "gpt3-large": _gpt3(24, 1536, 16),
    "gpt3-xl": _gpt3(24, 2048, 16),
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    "gpt3-13b": _gpt3(40, 5120, 40),
    "gpt3-175b": _gpt3(96, 12288, 96),
})


def resolve_config(spec: str, **overrides) -> ModelConfig:
    """A preset name or a config.json path."""
    if spec in PRESETS:
        return ModelConfig(**{**PRESETS[spec], **overrides})
    if Path(spec).exists():
        cfg = ModelConfig.load(spec)
        return ModelConfig(**{**cfg.to_dict(), **overrides})
    raise ValueError(f"unknown model {spec!r}: give a preset ({', '.join(PRESETS)}) or a config.json path")
