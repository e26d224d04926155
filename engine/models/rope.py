"""Rotary position embeddings as transformers computes them, for every rope_scaling type it has
(linear, dynamic NTK, yarn, longrope, llama3): the HF rope parameters checked and resolved once when
the config is read, and the cos/sin tables the attention layers rotate q and k with.

The tables follow transformers' own arithmetic (fp32 angles, the attention factor folded into cos/sin)
because the engine's logits are held to HF's on the same weights.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .hf_json import is_int, is_num

if TYPE_CHECKING:
    from .config import ModelConfig

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
MAX_POSITIONS = 1 << 24  # rotary tables are allocated up front: refuse absurd context lengths


# --- config time: HF rope parameters -> one normalized dict -----------------------------------
def check_rope_scaling(rp: dict, rotary_dim: int, max_pos: int, original: int | None = None) -> dict | None:
    """HF rope parameters (rope_parameters / rope_scaling, new or legacy keys) -> a normalized dict with every
    value the rotary tables need resolved as transformers resolves it, or None for plain RoPE. ValueError naming
    the field on anything transformers would not run the same way. (partial_rotary_factor is the family's to
    read: it is ModelConfig.rotary_fraction.)"""
    if not isinstance(rp, dict):
        raise ValueError(f"rope_scaling must be an object, got {rp!r}")
    t = rp.get("rope_type", rp.get("type", "default"))
    if t in ("su", "yarn") and "short_factor" in rp:  # Phi-3's early names for longrope, as transformers reads them
        t = "longrope"
    if t not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type {t!r} is not supported; supported: {ROPE_TYPES}")
    if t == "default":
        return None

    def num(key, default=None, required=False, positive=True):
        v = rp.get(key, default)
        if v is None and not required:
            return None
        if not is_num(v) or not math.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"rope_scaling.{key} must be a {'positive ' if positive else ''}number, got {v!r}")
        return float(v)

    out: dict = {"rope_type": t}
    if t in ("llama3", "yarn", "longrope"):
        orig = original or rp.get("original_max_position_embeddings") or max_pos
        if not is_int(orig) or not 0 < orig <= MAX_POSITIONS:
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
            if (not isinstance(v, list) or len(v) != rotary_dim // 2
                    or not all(is_num(x) and math.isfinite(x) and x > 0 for x in v)):
                raise ValueError(f"rope_scaling.{key} must be a list of {rotary_dim // 2} positive numbers, "
                                 f"got {v!r}")
            out[key] = [float(x) for x in v]
        factor = num("factor")
        factor = factor if factor is not None else max_pos / out["original_max_position_embeddings"]
        attn = num("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(out["original_max_position_embeddings"]))
        out["factor"], out["attention_factor"] = factor, float(attn)
    return out


def rotary_dims(head_dim: int, fraction: float) -> int:
    """The rotated dims of each head: transformers' int(head_dim * partial_rotary_factor), with room for a
    fraction that is a ratio of ints (GPT-J's rotary_dim / head_dim) rounding a hair below."""
    return int(head_dim * fraction + 1e-6)


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


# --- the tables --------------------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig, seq_len=None) -> tuple[torch.Tensor, float]:
    """(inv_freq (R/2,) fp32, attention scaling of cos/sin) as transformers computes them for cfg.rope_scaling,
    R = cfg.rotary_dim; seq_len (an int or an int64 tensor of any shape, giving inv_freq (..., R/2)) matters for
    dynamic and longrope."""
    d, base, rs = cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling or {"rope_type": "default"}
    t = rs["rope_type"]
    expo = torch.arange(0, d, 2, dtype=torch.int64).float() / d  # (R/2,)
    inv = 1.0 / (base ** expo)
    if t == "linear":
        return inv / rs["factor"], 1.0
    if t == "dynamic":  # NTK: the base grows with the sequence once it passes max_position_embeddings
        max_pos, factor = cfg.max_position_embeddings, rs["factor"]
        if seq_len is None:
            return inv, 1.0
        n = torch.as_tensor(seq_len, dtype=torch.int64)
        n = torch.maximum(n, torch.tensor(max_pos, dtype=torch.int64))
        b = base * ((factor * n / max_pos) - (factor - 1)) ** (d / (d - 2))
        return 1.0 / (b.unsqueeze(-1) ** expo), 1.0
    if t == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, inv_l), 1.0
    if t == "yarn":
        factor, orig = rs["factor"], rs["original_max_position_embeddings"]

        def corr_dim(rot):
            return (d * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))
        low, high = corr_dim(rs["beta_fast"]), corr_dim(rs["beta_slow"])
        if rs["truncate"]:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        pos_freqs = base ** (torch.arange(0, d, 2).float() / d)
        extra = 1 - ramp
        inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
        return inv, rs["attention_factor"]
    if t == "longrope":  # short factors up to original_max_position_embeddings, long ones past it
        orig = rs["original_max_position_embeddings"]
        short, long = torch.tensor(rs["short_factor"]), torch.tensor(rs["long_factor"])
        ext = short if seq_len is None else torch.where((torch.as_tensor(seq_len) > orig).unsqueeze(-1), long, short)
        return 1.0 / (ext * base ** expo), rs["attention_factor"]
    return inv, 1.0


def seq_dependent_rope(cfg: ModelConfig) -> bool:
    """Whether a token's rotation depends on the length of the sequence it is computed in."""
    return (cfg.rope_scaling or {}).get("rope_type") in ("dynamic", "longrope")


def rope_at(cfg: ModelConfig, pos: torch.Tensor, seq_len=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (N, R/2) fp32 (attention scaling folded in) at positions pos (N,) int64, each in a forward
    over seq_len tokens (an int or an (N,) tensor; dynamic and longrope only)."""
    inv, scale = rope_inv_freq(cfg, seq_len if seq_dependent_rope(cfg) else None)  # (R/2,) or (N, R/2)
    ang = pos.float().unsqueeze(-1) * inv  # fp32 like transformers
    return ang.cos() * scale, ang.sin() * scale


def rope_tables(cfg: ModelConfig, n: int, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n, R/2) for positions 0..n-1. seq_len None: each position rotated as transformers rotates it
    when it is the newest token (dynamic/longrope switch per position, as in incremental decoding);
    seq_len T: every position as in a forward over T tokens."""
    pos = torch.arange(n, dtype=torch.int64)
    return rope_at(cfg, pos, pos + 1 if seq_len is None else seq_len)


class Rotary(nn.Module):
    """HF-style (rotate_half) rotary embedding of each head's first rotary_dim dims, with cos/sin tables
    precomputed to max_seq_len (rope scaling and its attention factor included)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        cos, sin = rope_tables(cfg, cfg.max_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def tables_for(self, seq_len: int):
        """(cos, sin) for a dense forward over seq_len tokens where they differ from the cached tables
        (dynamic past max_position_embeddings, longrope past original_max_position_embeddings), else None."""
        rs = self.config.rope_scaling or {}
        t = rs.get("rope_type")
        if ((t == "dynamic" and seq_len > self.config.max_position_embeddings)
                or (t == "longrope" and seq_len > rs["original_max_position_embeddings"])):
            cos, sin = rope_tables(self.config, seq_len, seq_len)
            return cos.to(self.cos.device), sin.to(self.sin.device)
        return None

    def forward(self, x, positions, tables=None):
        # x (..., T, h, d), positions (..., T)
        cos, sin = tables if tables is not None else (self.cos, self.sin)
        cos, sin = cos[positions].float().unsqueeze(-2), sin[positions].float().unsqueeze(-2)
        r = 2 * cos.shape[-1]
        x1, x2 = x[..., :r].float().chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return out if r == x.shape[-1] else torch.cat([out, x[..., r:]], dim=-1)
