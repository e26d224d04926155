"""ModelConfig: one small dataclass for every supported family, read from and written to HF config.json.

The HF field names differ per family (n_embd / hidden_size, n_layer / num_hidden_layers, ...); from_hf and
to_hf map them onto one set of fields, and every value read is type and range checked here, before any
tensor is allocated, so a bad config.json is a ValueError naming the field.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .hf_json import Fields, config_path, is_int, is_num, read_json, token_ids
from .rope import MAX_POSITIONS, check_rope_scaling, rope_context_len

FAMILIES = ("gpt2", "gpt_neo", "llama", "mistral", "qwen2")
LEARNED_POSITIONS = ("gpt2", "gpt_neo")  # LayerNorm + GELU MLP + learned positions; the others: RoPE, RMSNorm, SwiGLU
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ModelConfig:
    model_type: str = "gpt2"      # one of FAMILIES
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0            # 0 -> n_head (no GQA)
    d_model: int = 768
    d_ff: int = 0                 # 0 -> 4*d_model (gpt2, gpt_neo) or the llama 8/3 rule rounded to 256
    head_dim: int = 0             # 0 -> d_model // n_head
    max_seq_len: int = 1024       # positions the model serves (rope scaling can make it > max_position_embeddings)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = True             # gpt2 linears carry biases; llama's do not
    activation: str = "gelu_tanh"
    bos_token_id: int | None = None
    eos_token_id: int | None = None   # the first EOS id; GenerationDefaults.eos_token_ids has them all
    qkv_bias: bool = False        # q/k/v projections carry a bias even where `bias` is False (qwen2)
    rope_scaling: dict | None = None  # HF rope parameters without rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 0  # HF's field (rope scaling reads it); 0 -> max_seq_len
    sliding_window: int = 0       # keys a windowed layer's query sees, itself included; 0: no window
    layer_types: list | None = None  # per layer, one of LAYER_TYPES; None: every layer windowed iff sliding_window

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(f"model_type must be one of {FAMILIES}, got {self.model_type!r}")
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "head_dim", "max_seq_len",
                     "max_position_embeddings", "sliding_window"):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not is_num(v) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        for name in ("tie_embeddings", "bias", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {v!r}")
        if self.activation not in ("gelu_tanh", "gelu", "relu", "silu"):
            raise ValueError(f"activation must be gelu_tanh, gelu, relu or silu, got {self.activation!r}")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.d_model // max(self.n_head, 1)
        self.max_position_embeddings = self.max_position_embeddings or self.max_seq_len
        if not self.d_ff:
            self.d_ff = 4 * self.d_model if not self.rotary else 256 * -(-(8 * self.d_model // 3) // 256)
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_seq_len > MAX_POSITIONS:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the supported {MAX_POSITIONS}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if not self.rotary and self.head_dim * self.n_head != self.d_model:
            raise ValueError(f"{self.model_type} needs d_model ({self.d_model}) divisible by n_head ({self.n_head})")
        if self.rotary and self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            self.rope_scaling = check_rope_scaling(self.rope_scaling, self.head_dim, self.max_position_embeddings)
        self._check_layer_types()

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
        if any(self.windowed) and self.model_type not in ("gpt_neo", "mistral", "qwen2"):
            raise ValueError(f"sliding_window: {self.model_type} has no windowed attention (gpt_neo, mistral and "
                             "qwen2 do)")
        if self.model_type == "mistral" and lt is not None:
            if not all(self.windowed):
                raise ValueError("layer_types: mistral windows every layer or none (sliding_window set or 0)")
            self.layer_types = None  # what from_hf gives: every layer windowed

    @property
    def rotary(self) -> bool:
        return self.model_type not in LEARNED_POSITIONS

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
    def softmax_scale(self) -> float:
        # GPT-Neo does not scale its attention scores by 1/sqrt(head_dim) (HF's GPTNeoSelfAttention)
        return 1.0 if self.model_type == "gpt_neo" else 1.0 / math.sqrt(self.head_dim)

    @property
    def qkv_has_bias(self) -> bool:
        # gpt_neo: biases on out_proj and the MLP, none on q/k/v
        return self.qkv_bias or (self.bias and self.model_type != "gpt_neo")

    @property
    def n_params(self) -> int:
        d, f, hd = self.d_model, self.d_ff, self.head_dim
        attn = d * hd * (self.n_head * 2 + self.n_kv_head * 2)
        mlp = d * f * (3 if self.rotary else 2)
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        pos = 0 if self.rotary else self.max_seq_len * d
        return self.n_layer * (attn + mlp) + emb + pos

    # --- HF config.json ---------------------------------------------------------------
    def to_hf(self) -> dict:
        common = dict(vocab_size=self.vocab_size, tie_word_embeddings=self.tie_embeddings,
                      bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, torch_dtype="float32")
        if self.model_type == "gpt2":
            return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=self.d_model,
                        n_layer=self.n_layer, n_head=self.n_head, n_inner=self.d_ff, n_positions=self.max_seq_len,
                        n_ctx=self.max_seq_len, layer_norm_epsilon=self.norm_eps,
                        activation_function=_HF_GELU[self.activation], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, **common)
        if self.model_type == "gpt_neo":
            return self._gpt_neo_to_hf(common)
        # rope_theta at the top and rope_scaling (None when default): both transformers 4.4x and 5.x read these
        rope = dict(rope_theta=self.rope_theta, rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None)
        arch = dict(hidden_size=self.d_model, intermediate_size=self.d_ff, num_hidden_layers=self.n_layer,
                    num_attention_heads=self.n_head, num_key_value_heads=self.n_kv_head, hidden_act="silu",
                    max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.norm_eps, **rope, **common)
        if self.model_type == "qwen2":
            if not self.qkv_bias or self.bias:
                raise ValueError("qwen2 has biases on q/k/v only (qkv_bias=True, bias=False)")
            w = self.windowed
            return dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=any(w),
                        sliding_window=self.sliding_window if any(w) else None,
                        max_window_layers=w.index(True) if any(w) else self.n_layer,
                        layer_types=[LAYER_TYPES[x] for x in w], **arch)
        if self.qkv_bias or self.bias:
            raise ValueError(f"{self.model_type} checkpoints carry no linear biases (bias=False, qkv_bias=False)")
        if self.model_type == "mistral":
            return dict(model_type="mistral", architectures=["MistralForCausalLM"], head_dim=self.head_dim,
                        sliding_window=self.sliding_window or None, **arch)
        return dict(model_type="llama", architectures=["LlamaForCausalLM"], head_dim=self.head_dim,
                    attention_bias=False, mlp_bias=False, **arch)

    def _gpt_neo_to_hf(self, common: dict) -> dict:
        types = ["local" if w else "global" for w in self.windowed]
        period = next(p for p in range(1, self.n_layer + 1) if types == types[:p] * (self.n_layer // p))
        return dict(model_type="gpt_neo", architectures=["GPTNeoForCausalLM"], hidden_size=self.d_model,
                    num_layers=self.n_layer, num_heads=self.n_head, intermediate_size=self.d_ff,
                    max_position_embeddings=self.max_seq_len, window_size=self.sliding_window or 256,
                    attention_types=[[types[:period], self.n_layer // period]], layer_norm_epsilon=self.norm_eps,
                    activation_function=_HF_GELU[self.activation], resid_dropout=0.0, embed_dropout=0.0,
                    attention_dropout=0.0, **common)

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        """From a parsed HF config.json; every field is type/range checked (ValueError naming it)."""
        if not isinstance(d, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        f = Fields(d)
        eos = token_ids(d.get("eos_token_id"), "eos_token_id")
        bos = f.opt_int("bos_token_id", 0)
        if mt == "gpt2":
            act = _activation(f, mt)
            for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                              ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
                if f.bool(key, want) != want:
                    raise ValueError(f"config.json: gpt2 with {key}={not want} is not supported")
            n_embd = f.int("n_embd")
            return cls(model_type="gpt2", vocab_size=f.int("vocab_size"), n_layer=f.int("n_layer"),
                       n_head=f.int("n_head"), d_model=n_embd, d_ff=f.opt_int("n_inner", 1) or 4 * n_embd,
                       max_seq_len=f.int("n_positions", 1024, hi=MAX_POSITIONS),
                       norm_eps=f.float("layer_norm_epsilon", 1e-5), tie_embeddings=f.bool("tie_word_embeddings", True),
                       bias=True, activation=act, bos_token_id=bos, eos_token_id=eos[0] if eos else None)
        if mt == "gpt_neo":
            return _gpt_neo_from_hf(cls, d, f, bos, eos[0] if eos else None)
        if mt in ("llama", "mistral", "qwen2"):
            if f.str("hidden_act", "silu") != "silu":
                raise ValueError(f"config.json: unsupported {mt} hidden_act {d.get('hidden_act')!r}")
            for key in ("attention_bias", "mlp_bias") if mt == "llama" else ():
                if f.bool(key, False):
                    raise ValueError(f"config.json: llama with {key}=true is not supported")
            n_layer, n_head, d_model = f.int("num_hidden_layers"), f.int("num_attention_heads"), f.int("hidden_size")
            head_dim = f.opt_int("head_dim", 1) or d_model // n_head
            window, layer_types = _sliding_layers(mt, d, f, n_layer)
            max_pos = f.int("max_position_embeddings", {"llama": 2048, "mistral": 131072, "qwen2": 32768}[mt],
                            hi=MAX_POSITIONS)
            rope = d.get("rope_scaling") or d.get("rope_parameters") or {}  # transformers 5 prefers rope_scaling
            if not isinstance(rope, dict):
                raise ValueError(f"config.json: rope_scaling must be an object, got {rope!r}")
            theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
            if not is_num(theta) or not math.isfinite(theta) or theta <= 1:
                raise ValueError(f"config.json: rope_theta must be a number > 1, got {theta!r}")
            prf = d.get("partial_rotary_factor", 1.0)
            if prf != 1.0:
                raise ValueError(f"config.json: partial_rotary_factor {prf!r} is not supported (only 1.0)")
            scaling = check_rope_scaling(rope, head_dim, max_pos, f.opt_int("original_max_position_embeddings", 1))
            return cls(model_type=mt, vocab_size=f.int("vocab_size"), n_layer=n_layer,
                       n_head=n_head, n_kv_head=f.opt_int("num_key_value_heads", 1) or 0, d_model=d_model,
                       d_ff=f.int("intermediate_size"), head_dim=head_dim,
                       max_seq_len=rope_context_len(max_pos, scaling), max_position_embeddings=max_pos,
                       norm_eps=f.float("rms_norm_eps", 1e-6), rope_theta=float(theta),
                       tie_embeddings=f.bool("tie_word_embeddings", False), bias=False, qkv_bias=mt == "qwen2",
                       activation="silu", rope_scaling=scaling, bos_token_id=bos, eos_token_id=eos[0] if eos else None,
                       sliding_window=window, layer_types=layer_types)
        raise ValueError(f"config.json: unsupported model_type {mt!r}; supported: {FAMILIES}")

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


# --- per-family HF fields: activations, attention layer types ---------------------------------
_HF_GELU = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def _activation(f: Fields, mt: str) -> str:
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    act = f.str("activation_function", "gelu_new")
    if act not in acts:
        raise ValueError(f"config.json: unsupported {mt} activation_function {act!r}")
    return acts[act]


def _normalized(window: int, types: list[str]) -> tuple[int, list[str] | None]:
    """(sliding_window, layer_types) with no window at all stated one way: (0, None)."""
    return (window, types) if "sliding_attention" in types else (0, None)


def _sliding_layers(mt: str, d: dict, f: Fields, n_layer: int) -> tuple[int, list[str] | None]:
    """(sliding_window, layer_types) of a llama-style config as transformers builds its masks: mistral windows
    every layer when sliding_window is set; qwen2 only with use_sliding_window, in the layers its layer_types
    names (by default those from max_window_layers on)."""
    if mt == "llama":
        return 0, None
    if mt == "mistral":
        return (0 if d.get("sliding_window") is None else f.int("sliding_window")), None
    on = f.bool("use_sliding_window", False) and d.get("sliding_window") is not None
    window = f.int("sliding_window") if on else 0
    types = d.get("layer_types")
    if types is None:
        first = f.int("max_window_layers", 28, lo=0)
        types = [LAYER_TYPES[bool(window) and i >= first] for i in range(n_layer)]
    elif not isinstance(types, list) or len(types) != n_layer or not all(t in LAYER_TYPES for t in types):
        raise ValueError(f"config.json: layer_types must list one of {LAYER_TYPES} per layer ({n_layer}), "
                         f"got {types!r}")
    if "sliding_attention" in types and not window:
        raise ValueError("config.json: layer_types has sliding_attention layers without use_sliding_window and "
                         "a sliding_window")
    return _normalized(window, types)


def _gpt_neo_from_hf(cls, d: dict, f: Fields, bos, eos) -> ModelConfig:
    """GPT-Neo: a GPT-2-style block with separate q/k/v (no bias), unscaled attention scores, and per-layer
    global or local (sliding window) attention from attention_types, expanded as transformers expands it."""
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
    window, layer_types = _normalized(f.int("window_size", 256), [LAYER_TYPES[t == "local"] for t in types])
    return cls(model_type="gpt_neo", vocab_size=f.int("vocab_size"), n_layer=n_layer, n_head=f.int("num_heads"),
               d_model=d_model, d_ff=f.opt_int("intermediate_size", 1) or 4 * d_model,
               max_seq_len=f.int("max_position_embeddings", 2048, hi=MAX_POSITIONS),
               norm_eps=f.float("layer_norm_epsilon", 1e-5), tie_embeddings=f.bool("tie_word_embeddings", True),
               bias=True, activation=_activation(f, "gpt_neo"), bos_token_id=bos, eos_token_id=eos,
               sliding_window=window, layer_types=layer_types)
