"""ModelConfig: one small dataclass for both families, read from and written to HF config.json."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

FAMILIES = ("gpt2", "llama")


@dataclass
class ModelConfig:
    model_type: str = "gpt2"      # gpt2: learned positions, LayerNorm, GELU MLP; llama: RoPE, RMSNorm, SwiGLU
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0            # 0 -> n_head (no GQA)
    d_model: int = 768
    d_ff: int = 0                 # 0 -> 4*d_model (gpt2) or the llama 8/3 rule rounded to 256
    head_dim: int = 0             # 0 -> d_model // n_head
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = True             # gpt2 linears carry biases; llama's do not
    activation: str = "gelu_tanh"
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(f"model_type must be one of {FAMILIES}, got {self.model_type!r}")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.d_model // max(self.n_head, 1)
        if not self.d_ff:
            self.d_ff = 4 * self.d_model if self.model_type == "gpt2" else 256 * -(-(8 * self.d_model // 3) // 256)
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.model_type == "gpt2" and self.head_dim * self.n_head != self.d_model:
            raise ValueError(f"gpt2 needs d_model ({self.d_model}) divisible by n_head ({self.n_head})")

    @property
    def n_params(self) -> int:
        d, f, hd = self.d_model, self.d_ff, self.head_dim
        attn = d * hd * (self.n_head * 2 + self.n_kv_head * 2)
        mlp = d * f * (2 if self.model_type == "gpt2" else 3)
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        pos = self.max_seq_len * d if self.model_type == "gpt2" else 0
        return self.n_layer * (attn + mlp) + emb + pos

    # --- HF config.json ---------------------------------------------------------------
    def to_hf(self) -> dict:
        common = dict(vocab_size=self.vocab_size, tie_word_embeddings=self.tie_embeddings,
                      bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, torch_dtype="float32")
        if self.model_type == "gpt2":
            return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=self.d_model,
                        n_layer=self.n_layer, n_head=self.n_head, n_inner=self.d_ff, n_positions=self.max_seq_len,
                        n_ctx=self.max_seq_len, layer_norm_epsilon=self.norm_eps,
                        activation_function={"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[self.activation],
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        return dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=self.d_model,
                    intermediate_size=self.d_ff, num_hidden_layers=self.n_layer, num_attention_heads=self.n_head,
                    num_key_value_heads=self.n_kv_head, head_dim=self.head_dim, hidden_act="silu",
                    max_position_embeddings=self.max_seq_len, rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta,
                    attention_bias=False, mlp_bias=False, **common)

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        mt = d.get("model_type")
        if mt == "gpt2":
            act = d.get("activation_function", "gelu_new")
            acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
            if act not in acts:
                raise ValueError(f"unsupported gpt2 activation_function {act!r}")
            return cls(model_type="gpt2", vocab_size=d["vocab_size"], n_layer=d["n_layer"], n_head=d["n_head"],
                       d_model=d["n_embd"], d_ff=d.get("n_inner") or 4 * d["n_embd"],
                       max_seq_len=d.get("n_positions", 1024), norm_eps=d.get("layer_norm_epsilon", 1e-5),
                       tie_embeddings=d.get("tie_word_embeddings", True), bias=True, activation=acts[act],
                       bos_token_id=d.get("bos_token_id"), eos_token_id=_first(d.get("eos_token_id")))
        if mt == "llama":
            if d.get("hidden_act", "silu") != "silu":
                raise ValueError(f"unsupported llama hidden_act {d.get('hidden_act')!r}")
            if d.get("attention_bias") or d.get("mlp_bias"):
                raise ValueError("llama with attention_bias/mlp_bias is not supported")
            rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
            if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
                raise ValueError(f"unsupported rope scaling {rope!r}")
            return cls(model_type="llama", vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"],
                       n_head=d["num_attention_heads"], n_kv_head=d.get("num_key_value_heads") or 0,
                       d_model=d["hidden_size"], d_ff=d["intermediate_size"], head_dim=d.get("head_dim") or 0,
                       max_seq_len=d.get("max_position_embeddings", 2048), norm_eps=d.get("rms_norm_eps", 1e-6),
                       rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
                       tie_embeddings=d.get("tie_word_embeddings", False), bias=False, activation="silu",
                       bos_token_id=d.get("bos_token_id"), eos_token_id=_first(d.get("eos_token_id")))
        raise ValueError(f"unsupported model_type {mt!r}; supported: {FAMILIES}")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """From a model directory or a config.json file."""
        p = Path(path)
        p = p / "config.json" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"no config.json at {p}")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from None
        return cls(**d) if "d_model" in d else cls.from_hf(d)  # our own field names, or HF's

    def to_dict(self) -> dict:
        return asdict(self)


def _first(x):
    return x[0] if isinstance(x, list) else x


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


def resolve_config(spec: str, **overrides) -> ModelConfig:
    """A preset name or a config.json path."""
    if spec in PRESETS:
        return ModelConfig(**{**PRESETS[spec], **overrides})
    if Path(spec).exists():
        cfg = ModelConfig.load(spec)
        return ModelConfig(**{**cfg.to_dict(), **overrides})
    raise ValueError(f"unknown model {spec!r}: give a preset ({', '.join(PRESETS)}) or a config.json path")
