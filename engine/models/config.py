"""ModelConfig: one small dataclass for the supported families, read from and written to HF config.json;
GenerationDefaults: EOS ids and sampling defaults from config.json + generation_config.json."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

FAMILIES = ("gpt2", "gpt_neo", "llama", "mistral", "qwen2")
LEARNED_POSITIONS = ("gpt2", "gpt_neo")  # LayerNorm + GELU MLP + learned positions; the others: RoPE, RMSNorm, SwiGLU
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
MAX_POSITIONS = 1 << 24  # rotary tables are allocated up front: refuse absurd context lengths


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
            if not _is_int(v) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not _is_num(v) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        for name in ("tie_embeddings", "bias", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
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
    def from_hf(cls, d: dict) -> "ModelConfig":
        """From a parsed HF config.json; every field is type/range checked (ValueError naming it)."""
        if not isinstance(d, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        f = _Fields(d)
        eos = _token_ids(d.get("eos_token_id"), "eos_token_id")
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
            if not _is_num(theta) or not math.isfinite(theta) or theta <= 1:
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
    def load(cls, path: str | Path) -> "ModelConfig":
        """From a model directory or a config.json file."""
        d = read_json(_config_path(path), required=True)
        if "d_model" in d:  # our own field names
            try:
                return cls(**d)
            except TypeError as e:
                raise ValueError(f"config.json: {e}") from None
        return cls.from_hf(d)

    def to_dict(self) -> dict:
        return asdict(self)


# --- attention layer types -----------------------------------------------------------------
_HF_GELU = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def _activation(f: "_Fields", mt: str) -> str:
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    act = f.str("activation_function", "gelu_new")
    if act not in acts:
        raise ValueError(f"config.json: unsupported {mt} activation_function {act!r}")
    return acts[act]


def _normalized(window: int, types: list[str]) -> tuple[int, list[str] | None]:
    """(sliding_window, layer_types) with no window at all stated one way: (0, None)."""
    return (window, types) if "sliding_attention" in types else (0, None)


def _sliding_layers(mt: str, d: dict, f: "_Fields", n_layer: int) -> tuple[int, list[str] | None]:
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


def _gpt_neo_from_hf(cls, d: dict, f: "_Fields", bos, eos) -> "ModelConfig":
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


# --- rope scaling ---------------------------------------------------------------------------
def check_rope_scaling(rp: dict, head_dim: int, max_pos: int, original: int | None = None) -> dict | None:
    """HF rope parameters (rope_parameters / rope_scaling, new or legacy keys) -> a normalized dict with every
    value the rotary tables need resolved as transformers resolves it, or None for plain RoPE. ValueError naming
    the field on anything transformers would not run the same way."""
    if not isinstance(rp, dict):
        raise ValueError(f"rope_scaling must be an object, got {rp!r}")
    t = rp.get("rope_type", rp.get("type", "default"))
    if t not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type {t!r} is not supported; supported: {ROPE_TYPES}")
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"rope_scaling.partial_rotary_factor {rp['partial_rotary_factor']!r} is not supported")
    if t == "default":
        return None

    def num(key, default=None, required=False, positive=True):
        v = rp.get(key, default)
        if v is None and not required:
            return None
        if not _is_num(v) or not math.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"rope_scaling.{key} must be a {'positive ' if positive else ''}number, got {v!r}")
        return float(v)

    out: dict = {"rope_type": t}
    if t in ("llama3", "yarn", "longrope"):
        orig = original or rp.get("original_max_position_embeddings") or max_pos
        if not _is_int(orig) or not 0 < orig <= MAX_POSITIONS:
            raise ValueError(f"rope_scaling.original_max_position_embeddings must be a positive int, got {orig!r}")
        out["original_max_position_embeddings"] = orig
    if t in ("linear", "dynamic", "llama3"):
        out["factor"] = num("factor", required=True)
    if t == "llama3":
        out["low_freq_factor"] = num("low_freq_factor", required=True)
        out["high_freq_factor"] = num("high_freq_factor", required=True)
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            raise ValueError("rope_scaling.high_freq_factor must be greater than low_freq_factor")
    elif t == "yarn":
        factor = num("factor")
        out["factor"] = factor = factor if factor is not None else max_pos / orig
        attn = num("attention_factor")
        if attn is None:
            mscale, mscale_all = num("mscale", positive=False), num("mscale_all_dim", positive=False)
            if mscale and mscale_all:
                attn = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
            else:
                attn = _yarn_mscale(factor)
        out["attention_factor"] = float(attn)
        out["beta_fast"] = num("beta_fast", positive=False) or 32.0  # transformers: `or 32`, `or 1`
        out["beta_slow"] = num("beta_slow", positive=False) or 1.0
        truncate = rp.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ValueError(f"rope_scaling.truncate must be a bool, got {truncate!r}")
        out["truncate"] = truncate
    elif t == "longrope":
        for key in ("short_factor", "long_factor"):
            v = rp.get(key)
            if (not isinstance(v, list) or len(v) != head_dim // 2
                    or not all(_is_num(x) and math.isfinite(x) and x > 0 for x in v)):
                raise ValueError(f"rope_scaling.{key} must be a list of {head_dim // 2} positive numbers, got {v!r}")
            out[key] = [float(x) for x in v]
        factor = num("factor")
        factor = factor if factor is not None else max_pos / out["original_max_position_embeddings"]
        attn = num("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(out["original_max_position_embeddings"]))
        out["factor"], out["attention_factor"] = factor, float(attn)
    return out


def rope_context_len(max_pos: int, scaling: dict | None) -> int:
    """Positions a scaled-rope model serves (vLLM's rule): linear/dynamic extend max_position_embeddings by
    factor, yarn extends original_max_position_embeddings by factor; llama3/longrope configs already give the
    extended length as max_position_embeddings."""
    if scaling is None or scaling["rope_type"] in ("llama3", "longrope"):
        n = max_pos
    elif scaling["rope_type"] == "yarn":
        n = max(max_pos, int(scaling["original_max_position_embeddings"] * scaling["factor"]))
    else:
        n = max(max_pos, int(max_pos * scaling["factor"]))
    if n > MAX_POSITIONS:
        raise ValueError(f"rope_scaling.factor gives a context of {n} positions, over the supported {MAX_POSITIONS}")
    return n


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# --- generation_config.json -------------------------------------------------------------------
@dataclass
class GenerationDefaults:
    """What a model directory says about generation: every EOS id (config.json and generation_config.json,
    each an int or a list; the tokenizer's EOS only where neither names one) and the default sampling
    parameters, as SamplingParams keyword arguments (only those the directory sets)."""
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    sampling: dict = field(default_factory=dict)  # subset of temperature, top_p, top_k, min_p, repetition_penalty, max_tokens


def load_generation_config(path: str | Path, tokenizer=None, vocab_size: int | None = None) -> GenerationDefaults:
    """GenerationDefaults of a model directory (config.json and generation_config.json, both optional).
    `do_sample: false` maps to temperature 0 (greedy, as transformers would run it); HF's top_k 0 to -1."""
    d = Path(path)
    cfg = read_json(_config_path(d), required=False)
    gen = read_json(d / "generation_config.json" if d.is_dir() else d.parent / "generation_config.json",
                     required=False)
    eos: list[int] = []
    for src, name in ((cfg, "config.json"), (gen, "generation_config.json")):
        for i in _token_ids(src.get("eos_token_id"), f"{name}: eos_token_id"):
            if i not in eos:
                eos.append(i)
    if not eos and tokenizer is not None:
        eos.extend(getattr(tokenizer, "eos_token_ids", None) or
                   ([tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []))
    if vocab_size is not None and any(i >= vocab_size for i in eos):
        raise ValueError(f"eos_token_id {eos} out of range for vocab_size {vocab_size}")
    g = _Fields(gen, "generation_config.json")
    sampling: dict = {}
    if "temperature" in gen and gen["temperature"] is not None:
        sampling["temperature"] = g.float("temperature", lo=0.0)
    if "top_p" in gen and gen["top_p"] is not None:
        sampling["top_p"] = g.float("top_p", hi=1.0)
    if "top_k" in gen and gen["top_k"] is not None:
        sampling["top_k"] = g.int("top_k", lo=0) or -1
    if "min_p" in gen and gen["min_p"] is not None:
        sampling["min_p"] = g.float("min_p", lo=0.0, hi=1.0)
    if "repetition_penalty" in gen and gen["repetition_penalty"] is not None:
        sampling["repetition_penalty"] = g.float("repetition_penalty")
    if "max_new_tokens" in gen and gen["max_new_tokens"] is not None:
        sampling["max_tokens"] = g.int("max_new_tokens")
    if g.bool("do_sample", True) is False:
        sampling["temperature"] = 0.0
    bos = _Fields(cfg).opt_int("bos_token_id", 0)
    bos = g.opt_int("bos_token_id", 0) if gen.get("bos_token_id") is not None else bos
    pad = g.opt_int("pad_token_id", 0) if gen.get("pad_token_id") is not None else _Fields(cfg).opt_int("pad_token_id", 0)
    return GenerationDefaults(eos_token_ids=eos, bos_token_id=bos, pad_token_id=pad, sampling=sampling)


# --- validation helpers ----------------------------------------------------------------------
_REQUIRED = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Fields:
    """Typed reads of a parsed JSON object; a ValueError names the file and the field."""

    def __init__(self, d: dict, src: str = "config.json"):
        self.d, self.src = d, src

    def _get(self, key, default):
        v = self.d.get(key, default)
        if v is _REQUIRED:
            raise ValueError(f"{self.src}: missing required field {key!r}")
        return v

    def int(self, key, default=_REQUIRED, lo=1, hi=None):
        v = self._get(key, default)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not _is_int(v) or v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise ValueError(f"{self.src}: {key} must be an int {rng}, got {v!r}")
        return v

    def opt_int(self, key, lo=1):
        return None if self.d.get(key) is None else self.int(key, lo=lo)

    def float(self, key, default=_REQUIRED, lo=None, hi=None):
        v = self._get(key, default)
        if (not _is_num(v) or not math.isfinite(v) or (v <= 0 if lo is None else v < lo)
                or (hi is not None and v > hi)):
            rng = ("> 0" if lo is None else f">= {lo}") + (f" and <= {hi}" if hi is not None else "")
            raise ValueError(f"{self.src}: {key} must be a finite number {rng}, got {v!r}")
        return float(v)

    def bool(self, key, default=_REQUIRED):
        v = self._get(key, default)
        if v is None:
            v = default
        if not isinstance(v, bool):
            raise ValueError(f"{self.src}: {key} must be true or false, got {v!r}")
        return v

    def str(self, key, default=_REQUIRED):
        v = self._get(key, default)
        if not isinstance(v, str):
            raise ValueError(f"{self.src}: {key} must be a string, got {v!r}")
        return v


def _token_ids(v, name: str) -> list[int]:
    """An HF token-id field (None, an int or a list of ints) -> a list."""
    if v is None:
        return []
    ids = v if isinstance(v, list) else [v]
    if not all(_is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"{name} must be a non-negative int or a list of them, got {v!r}")
    return list(ids)


def _config_path(path) -> Path:
    p = Path(path)
    return p / "config.json" if p.is_dir() else p


def read_json(p: Path, required: bool = False) -> dict:
    """A JSON object file; {} when absent (unless required); ValueError naming the file when malformed."""
    if not p.is_file():
        if required:
            raise FileNotFoundError(f"no {p.name} at {p}")
        return {}
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p} must hold a JSON object")
    return d


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
