"""ModelConfig: one small dataclass for every supported family, read from and written to HF config.json.

The architecture is spelled out in explicit trait fields (norm, mlp, positions, biases, ...), so the layers
read what to build instead of inferring it from the family's name. A trait left None takes the family's
value (TRAITS in families/<model_type>.py), the same value from_hf derives, so ModelConfig(model_type=...)
and a config.json of that family build the same model. The HF field names differ per family; each family's
file maps them, and every value read is type and range checked before any tensor is allocated, so a bad
config.json is a ValueError naming the field.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .families import FAMILIES
from .families.base import LAYER_TYPES, NEUTRAL_TRAITS as _NEUTRAL
from .hf_json import Fields, config_path, is_int, is_num, read_json, token_ids
from .rope import MAX_POSITIONS, check_rope_scaling, rotary_dims

# the values a trait may take, where it is not a number or a bool
_CHOICES = dict(norm=("layernorm", "rmsnorm"), mlp=("plain", "gated"), positions=("learned", "rotary"),
                rotary_layout=("half", "interleaved"), activation=("gelu_tanh", "gelu", "relu", "silu"))

@dataclass
class ModelConfig:
    model_type: str = "gpt2"      # a key of families.FAMILIES
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0            # 0 -> n_head (no GQA)
    d_model: int = 768
    d_ff: int = 0                 # 0 -> 4*d_model (plain MLP) or the llama 8/3 rule rounded to 256 (gated)
    head_dim: int = 0             # 0 -> d_model // n_head
    max_seq_len: int = 1024       # positions the model serves (rope scaling can make it > max_position_embeddings)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None   # the first EOS id; GenerationDefaults.eos_token_ids has them all
    rope_scaling: dict | None = None  # HF rope parameters without rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 0  # HF's field (rope scaling reads it); 0 -> max_seq_len
    sliding_window: int = 0       # keys a windowed layer's query sees, itself included; 0: no window
    layer_types: list | None = None  # per layer, one of LAYER_TYPES; None: every layer windowed iff sliding_window
    # --- architectural traits; None: the family's (see the module docstring) ---
    norm: str | None = None               # "layernorm" | "rmsnorm"
    norm_offset: float | None = None      # the norm scales by (offset + weight)
    mlp: str | None = None                # "plain": act(x W1) W2; "gated": (act(x Wg) * x Wu) W2 (SwiGLU, GeGLU)
    activation: str | None = None         # gelu_tanh | gelu | relu | silu (a gated MLP: silu or gelu_tanh)
    positions: str | None = None          # "learned" (an embedding table) | "rotary"
    rotary_fraction: float | None = None  # the share of each head's dims that is rotated
    # "half": rotate_half pairs (i, i + r/2); "interleaved": GPT-J's pairs (2i, 2i + 1). The layers rotate
    # halves only: the loader permutes an interleaved checkpoint's q/k rows (and saving permutes them back),
    # which leaves every q.k product, so the attention, unchanged
    rotary_layout: str | None = None
    parallel_residual: bool | None = None  # attention and MLP both read the block's input, their sum is added
    shared_norm: bool | None = None       # parallel: one norm feeds both (GPT-J); else each has its own (NeoX)
    attn_scale: float | None = None       # attention softmax scale; None: 1/sqrt(head_dim)
    qk_norm: bool | None = None           # an RMSNorm over each head's q and k, before the rotation (Qwen3)
    embed_scale: float | None = None      # token embeddings multiplied by it (Gemma: sqrt(d_model))
    bias: bool | None = None              # the attention output projection's bias, and the default of the two below
    qkv_bias: bool | None = None          # q/k/v projections' bias
    mlp_bias: bool | None = None          # the MLP linears' biases
    head_bias: bool | None = None         # an untied LM head's bias (GPT-J)

    def __post_init__(self):
        if not isinstance(self.model_type, str) or self.model_type not in FAMILIES:
            raise ValueError(f"model_type must be one of {tuple(FAMILIES)}, got {self.model_type!r}")
        self._resolve_traits()
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "head_dim", "max_seq_len",
                     "max_position_embeddings", "sliding_window"):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not is_num(v) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {v!r}")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.d_model // max(self.n_head, 1)
        self.max_position_embeddings = self.max_position_embeddings or self.max_seq_len
        if not self.d_ff:
            self.d_ff = 4 * self.d_model if self.mlp == "plain" else 256 * -(-(8 * self.d_model // 3) // 256)
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_dim % 8 or self.head_dim > 256:  # what the attention kernels take
            raise ValueError(f"head_dim {self.head_dim} not supported: must be a multiple of 8 up to 256")
        if self.max_seq_len > MAX_POSITIONS:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the supported {MAX_POSITIONS}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        # learned positions: the attention's head dims are the model's (GPT-2's c_attn is d_model wide)
        if self.positions == "learned" and self.head_dim * self.n_head != self.d_model:
            raise ValueError(f"{self.model_type} needs d_model ({self.d_model}) divisible by n_head ({self.n_head})")
        if self.positions == "rotary" and (self.rotary_dim % 2 or not self.rotary_dim):
            raise ValueError(f"the rotated dims of each head (head_dim {self.head_dim} x rotary_fraction "
                             f"{self.rotary_fraction} = {self.rotary_dim}) must be even and positive")
        if self.rope_scaling is not None:
            self.rope_scaling = check_rope_scaling(self.rope_scaling, self.rotary_dim, self.max_position_embeddings)
        self._check_layer_types()
        FAMILIES[self.model_type].check(self)

    def _resolve_traits(self):
        traits = FAMILIES[self.model_type].TRAITS
        if self.head_bias is None and self.tie_embeddings:  # a tied head is the embedding: no bias of its own
            self.head_bias = False
        for name in (*_NEUTRAL, *_CHOICES, "bias"):
            if getattr(self, name) is None:
                setattr(self, name, traits.get(name, _NEUTRAL.get(name)))
        for name in ("qkv_bias", "mlp_bias"):
            if getattr(self, name) is None:
                setattr(self, name, traits.get(name, self.bias))
        for name in ("parallel_residual", "shared_norm", "qk_norm", "bias", "qkv_bias", "mlp_bias", "head_bias",
                     "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("norm_offset", "rotary_fraction", "attn_scale", "embed_scale"):
            v = getattr(self, name)
            if v is not None and (not is_num(v) or isinstance(v, bool) or not math.isfinite(v) or v < 0):
                raise ValueError(f"{name} must be a non-negative finite number, got {v!r}")
        for name in ("attn_scale", "embed_scale"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive or None, got {getattr(self, name)!r}")
        if not 0 < self.rotary_fraction <= 1:
            raise ValueError(f"rotary_fraction must be in (0, 1], got {self.rotary_fraction!r}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not supported (supported: {allowed})")
        if self.mlp == "gated" and self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"activation: a gated MLP takes silu (SwiGLU) or gelu_tanh (GeGLU), "
                             f"got {self.activation!r}")
        if self.shared_norm and not self.parallel_residual:
            raise ValueError("shared_norm needs parallel_residual (a sequential block normalizes twice)")
        if self.head_bias and self.tie_embeddings:
            raise ValueError("head_bias needs an untied head (tie_embeddings=False)")

    def _check_layer_types(self):
        lt = self.layer_types
        if lt is not None:
            if (not isinstance(lt, (list, tuple)) or len(lt) != self.n_layer
                    or not all(isinstance(t, str) and t in LAYER_TYPES for t in lt)):
                raise ValueError(f"layer_types must list one of {LAYER_TYPES} per layer ({self.n_layer}), got {lt!r}")
            self.layer_types = list(lt)
            if "sliding_attention" in lt and not self.sliding_window:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is 0")
        # only these families' HF checkpoints can say which layers are windowed
        if any(self.windowed) and not FAMILIES[self.model_type].WINDOWED:
            w = [mt for mt, fam in FAMILIES.items() if fam.WINDOWED]
            raise ValueError(f"sliding_window: {self.model_type} has no windowed attention "
                             f"({', '.join(w[:-1])} and {w[-1]} do)")

    @property
    def windowed(self) -> list[bool]:
        """Per layer: whether it attends through the sliding window."""
        if self.layer_types is None:
            return [self.sliding_window > 0] * self.n_layer
        return [t == "sliding_attention" for t in self.layer_types]

    @property
    def window_sizes(self) -> list[tuple[int, int]]:
        """Per layer, the kernels' causal window_size=(left, right): a window of W keys, the query's own
        included, is (W - 1, 0); (-1, -1) is plain causal attention."""
        return [(self.sliding_window - 1, 0) if w else (-1, -1) for w in self.windowed]

    @property
    def rotary_dim(self) -> int:
        """The rotated dims of each head: its first rotary_dim."""
        return rotary_dims(self.head_dim, self.rotary_fraction)

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def n_params(self) -> int:
        d, f, hd = self.d_model, self.d_ff, self.head_dim
        attn = d * hd * (self.n_head * 2 + self.n_kv_head * 2)
        mlp = d * f * (3 if self.mlp == "gated" else 2)
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2) + (self.vocab_size if self.head_bias else 0)
        pos = self.max_seq_len * d if self.positions == "learned" else 0
        return self.n_layer * (attn + mlp) + emb + pos

    # --- HF config.json: each family's file maps its fields -------------------------------
    def to_hf(self) -> dict:
        return FAMILIES[self.model_type].to_hf(self)

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        """From a parsed HF config.json; every field is type/range checked (ValueError naming it)."""
        if not isinstance(d, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        f = Fields(d)
        eos = token_ids(d.get("eos_token_id"), "eos_token_id")
        bos = f.opt_int("bos_token_id", 0)
        if not isinstance(mt, str) or mt not in FAMILIES:
            raise ValueError(f"config.json: unsupported model_type {mt!r}; supported: {tuple(FAMILIES)}")
        return cls(model_type=mt, **FAMILIES[mt].from_hf(d, f), bos_token_id=bos, eos_token_id=eos[0] if eos else None)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """From a model directory or a config.json file."""
        d = read_json(config_path(path), required=True)
        if "d_model" in d:  # our own field names
            try:
                return cls(**d)
            except TypeError as e:
                raise ValueError(f"config.json: {e}") from None
        return cls.from_hf(d)

    def to_dict(self) -> dict:
        return asdict(self)
