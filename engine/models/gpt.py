"""The decoder-only transformer (gpt2/gpt_neo and llama/mistral/qwen2 families), built on the kernels ops.

Two entry points share every layer:
  model(input_ids)                      dense causal forward, (B, T) -> logits (B, T, V)
  model.step(ids, positions, kv, meta)  one engine step over a packed batch with a paged KV cache
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt_engine.kernels import flash_attention, flash_attention_varlen, layer_norm, linear, paged_attention, rms_norm
from gpt_engine.kernels.decode import (decode_layer, decode_layer_applies, pack_layer, pack_linear, packed_linear,
                                      packed_rows, rope_, swiglu, unpack_linear)
from gpt_engine.kernels.paged import store_kvcache
from gpt_engine.kernels._dispatch import cpu_inference, triton_w8a16
from gpt_engine.kernels.quant import QuantizedWeight, dequantize, linear_int8, linear_w8a8, quantize_int8

from .config import ModelConfig


@dataclass
class StepMeta:
    """Attention metadata for one engine step over B sequences and N new tokens."""
    slot_mapping: torch.Tensor   # (N,) int64 flat cache slot of each new token (-1: don't store)
    block_table: torch.Tensor    # (B, max_blocks) int32
    seq_lens: torch.Tensor       # (B,) int32 cached length after this step (new tokens included)
    cu_seqlens_q: torch.Tensor   # (B+1,) int32 offsets of each sequence's new tokens
    cu_seqlens_k: torch.Tensor   # (B+1,) int32 cumsum of seq_lens
    max_seqlen_q: int
    max_seqlen_k: int
    decode: bool                 # one new token per sequence: use paged decode attention
    fresh: bool = False          # no sequence has cached context: prefill attends to its own new K/V
    # (N,) int64, dynamic/longrope rope only: the sequence length each new token is rotated for where it is
    # not position + 1 (a prompt's tokens, rotated for the whole prompt as transformers' prefill does)
    rope_seq_lens: torch.Tensor | None = None


class Norm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rms, self.eps = cfg.rotary, cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x, residual=None):
        if self.rms:
            return rms_norm(x, self.weight, self.eps, residual)
        return layer_norm(x, self.weight, self.bias, self.eps, residual)


def released_form(stored, packed):
    """A GEMM weight whose float parameter was released, in its own format: what set_weight_format
    stored, or, once packed, read back from the pack (a bf16 / fp32 tensor or a QuantizedWeight)."""
    return stored if stored is not None else unpack_linear(packed)


def dense(w, dtype: torch.dtype) -> torch.Tensor:
    """released_form's weight as a dense (N, K) tensor of dtype."""
    return dequantize(w, dtype) if isinstance(w, QuantizedWeight) else w.to(dtype)


class Linear(nn.Module):
    def __init__(self, d_in, d_out, bias, activation=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.in_features = d_in
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        self.activation = activation
        self.packed = None  # kernels.decode.PackedLinear from GPT.pack_for_cpu: a snapshot of the weight
        # kernels.quant.QuantizedWeight from GPT.set_weight_format; self.weight then holds its dequantised
        # values, so every path computes on the same weight
        self.quant = None
        # On CPU set_weight_format keeps an int8 / bf16 weight only in that format: self.weight is then
        # None and `stored` holds it (a QuantizedWeight or a bf16 tensor) until pack_for_cpu, whose
        # pack becomes the only copy. A float32 copy beside it would be most of the model's memory.
        self.stored = None
        self.int8_activations = False  # set_weight_format "w8a8": x is quantised too (kernels.reference.linear_w8a8)
        nn.init.normal_(self.weight, std=0.02)

    @property
    def released(self) -> bool:
        return self.weight is None

    def dense_weight(self, dtype: torch.dtype, device=None) -> torch.Tensor:
        """The weight the GEMM computes with, as a (N, K) tensor: the parameter, or, once released,
        a temporary built from its stored (or packed) int8 / bf16 form."""
        if self.weight is not None:
            return self.weight
        self._check_inference()
        w = dense(released_form(self.stored, self.packed), dtype)
        return w if device is None else w.to(device)

    def _check_inference(self):
        if self.training and torch.is_grad_enabled():
            raise RuntimeError("this model's GEMM weights live only in the CPU inference engine's packs (int8 / "
                               "bf16 formats, or a model LLM loaded itself): it cannot be trained; load it with "
                               "gpt_engine.models.loader.load_model (no quantization or bf16 dtype) to train")

    def forward(self, x):
        p = self.packed
        if p is not None and decode_layer_applies(x, (p.weight,)):  # CPU inference: the packed GEMM
            return packed_linear(x, p, self.bias, self.activation)
        if self.int8_activations:  # off the packed kernel: its arithmetic, on the int8 values
            self._check_inference()
            return linear_w8a8(x, released_form(self.stored, self.packed), self.bias, self.activation)
        if self.quant is not None and triton_w8a16(x):  # decode-sized GPU batches: the int8 weight stream
            return linear_int8(x, self.quant, self.bias, self.activation)
        return linear(x, self.dense_weight(x.dtype, x.device), self.bias, self.activation)


def rope_inv_freq(cfg: ModelConfig, seq_len=None) -> tuple[torch.Tensor, float]:
    """(inv_freq (D/2,) fp32, attention scaling of cos/sin) as transformers computes them for cfg.rope_scaling;
    seq_len (an int or an int64 tensor of any shape, giving inv_freq (..., D/2)) matters for dynamic and longrope."""
    d, base, rs = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling or {"rope_type": "default"}
    t = rs["rope_type"]
    expo = torch.arange(0, d, 2, dtype=torch.int64).float() / d  # (D/2,)
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
    """cos, sin (N, D/2) fp32 (attention scaling folded in) at positions pos (N,) int64, each in a forward
    over seq_len tokens (an int or an (N,) tensor; dynamic and longrope only)."""
    inv, scale = rope_inv_freq(cfg, seq_len if seq_dependent_rope(cfg) else None)  # (D/2,) or (N, D/2)
    ang = pos.float().unsqueeze(-1) * inv  # fp32 like transformers
    return ang.cos() * scale, ang.sin() * scale


def rope_tables(cfg: ModelConfig, n: int, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n, D/2) for positions 0..n-1. seq_len None: each position rotated as transformers rotates it
    when it is the newest token (dynamic/longrope switch per position, as in incremental decoding);
    seq_len T: every position as in a forward over T tokens."""
    pos = torch.arange(n, dtype=torch.int64)
    return rope_at(cfg, pos, pos + 1 if seq_len is None else seq_len)


class Rotary(nn.Module):
    """HF-style (rotate_half) rotary embedding with cos/sin tables precomputed to max_seq_len (rope scaling
    and its attention factor included)."""

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
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary | None = None, layer: int = 0):
        super().__init__()
        self.h, self.hkv, self.d = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.scale, self.window = cfg.softmax_scale, cfg.window_sizes[layer]  # window (-1, -1): plain causal
        self.qkv = Linear(cfg.d_model, (self.h + 2 * self.hkv) * self.d, cfg.qkv_has_bias)
        self.proj = Linear(self.h * self.d, cfg.d_model, cfg.bias)
        # one Rotary (its cos/sin tables) shared by every layer: GPT passes it in
        self.rotary = (rotary if rotary is not None else Rotary(cfg)) if cfg.rotary else None

    def _qkv(self, x, positions, rope=None):
        # (..., C) -> q (..., h, d), k and v (..., hkv, d): views of one fused projection
        h, hkv = self.h, self.hkv
        t = self.qkv(x).unflatten(-1, (h + 2 * hkv, self.d))
        if self.rotary is None:
            return t.split([h, hkv, hkv], dim=-2)
        if decode_layer_applies(t, ()) and t.is_contiguous():  # CPU inference: rotate in place, one pass
            cos, sin = rope if rope is not None else (self.rotary.cos, self.rotary.sin)
            rope_(t, cos[positions], sin[positions], h + hkv)
            return t.split([h, hkv, hkv], dim=-2)
        qk, v = t.split([h + hkv, hkv], dim=-2)
        q, k = self.rotary(qk, positions, rope).split([h, hkv], dim=-2)  # q and k side by side: one rotation
        return q, k, v

    def forward(self, x, positions, rope=None):
        # x (B, T, C) -> (B, T, C); rope: (cos, sin) tables replacing the cached ones (dynamic/longrope)
        q, k, v = self._qkv(x, positions, rope)
        o = flash_attention(q, k, v, causal=True, softmax_scale=self.scale, window_size=self.window)
        return self.proj(o.flatten(-2))

    def step(self, x, positions, cache, meta: StepMeta, rope=None):
        # x (N, C) packed new tokens; cache = (k_cache, v_cache) each (blocks, block_size, hkv, d)
        q, k, v = self._qkv(x, positions, rope)
        k_cache, v_cache = cache
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        attn = dict(softmax_scale=self.scale, window_size=self.window)
        if meta.decode:
            o = paged_attention(q, k_cache, v_cache, meta.block_table, meta.seq_lens, **attn)
        elif meta.fresh:  # the new K/V are the whole context: no reads back from the cache
            o = flash_attention_varlen(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_q, meta.max_seqlen_q,
                                       meta.max_seqlen_q, causal=True, **attn)
        else:
            o = flash_attention_varlen(q, k_cache, v_cache, meta.cu_seqlens_q, meta.cu_seqlens_k,
                                       meta.max_seqlen_q, meta.max_seqlen_k, causal=True,
                                       block_table=meta.block_table, **attn)
        return self.proj(o.flatten(-2))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.rotary
        if self.swiglu:  # gate and up projections as one GEMM
            self.fc = Linear(cfg.d_model, 2 * cfg.d_ff, cfg.bias)
        else:
            self.fc = Linear(cfg.d_model, cfg.d_ff, cfg.bias, activation=cfg.activation)
        self.proj = Linear(cfg.d_ff, cfg.d_model, cfg.bias)

    def forward(self, x):
        h = self.fc(x)
        if self.swiglu and decode_layer_applies(h, ()):  # CPU inference: one pass, not three
            h = swiglu(h)
        elif self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary | None = None, layer: int = 0):
        super().__init__()
        self.norm1, self.attn, self.norm2 = Norm(cfg), Attention(cfg, rotary, layer), Norm(cfg)
        self.mlp = MLP(cfg)
        # decode_layer's scalar arguments: n_head, eps, rms, activation, softmax scale, window
        self.decode_args = (cfg.n_head, cfg.norm_eps, self.norm1.rms, "swiglu" if self.mlp.swiglu else cfg.activation,
                            cfg.softmax_scale, self.attn.window)
        self.packed = None  # kernels.decode.PackedLayer from GPT.pack_for_cpu: a snapshot of the weights

    def forward(self, x, residual, positions, cache=None, meta=None, rope=None):
        # pre-norm with the residual add fused into each norm: returns (sublayer output, residual stream)
        h, residual = self.norm1(x, residual) if residual is not None else (self.norm1(x), x)
        h = self.attn(h, positions, rope) if meta is None else self.attn.step(h, positions, cache, meta, rope)
        h, residual = self.norm2(h, residual)
        return self.mlp(h), residual

    def decode_weights(self) -> tuple:
        """The layer's 12 tensors in kernels.decode's order (norm1, qkv, proj, norm2, fc, fc2: weight,
        bias), each GEMM's weight as its packed snapshot where it has one."""
        mods = (self.norm1, self.attn.qkv, self.attn.proj, self.norm2, self.mlp.fc, self.mlp.proj)
        return tuple(t for m in mods for t in (getattr(m, "packed", None) or m.weight, m.bias))

    def decode_step(self, x, residual, positions, cache, meta: StepMeta, rope):
        """forward() for a decode step: once packed (CPU fp32), the whole layer is one call into gpt_engine.kernels._C."""
        layer = self.packed
        if layer is None or not cpu_inference(x):
            return self(x, residual, positions, cache, meta)
        return decode_layer(x, residual, layer, *cache, meta.slot_mapping, meta.block_table, meta.seq_lens, rope,
                            *self.decode_args)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = None if cfg.rotary else nn.Embedding(cfg.max_seq_len, cfg.d_model)
        rotary = Rotary(cfg) if cfg.rotary else None  # tables to max_seq_len, shared by the layers
        self.layers = nn.ModuleList(Block(cfg, rotary, i) for i in range(cfg.n_layer))
        self.norm_f = Norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.packed_head = None  # kernels.decode.PackedLinear from pack_for_cpu
        # the head in set_weight_format's int8 / bf16 form once its float32 copy is released (as Linear.stored)
        self.head_stored = None
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 scaled init of the residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)

    weight_dtype = None  # set_weight_format's storage dtype (bf16/fp16 on a float32 model), None: the params'
    _format = (None, None, None)  # set_weight_format's arguments

    @torch.no_grad()
    def set_weight_format(self, weight_dtype: torch.dtype | None = None, quantization: str | None = None,
                          group_size: int | None = None, release: bool = False) -> None:
        """Inference weight formats, applied once at load. weight_dtype (torch.bfloat16 / torch.float16):
        every parameter is rounded to it (kept in the compute dtype, so every path sees the stored
        values) and pack_for_cpu packs the GEMM weights in bf16. quantization "int8": each GEMM weight
        (the transformer layers' and the head's, so a tied embedding's too) is quantised
        (kernels.quant.quantize_int8: per output channel, or per group_size inputs) and replaced by its
        dequantised values; the norms and other embeddings keep weight_dtype. "w8a8" (CPU float32
        models): int8 weights as "int8", and every GEMM quantises its input per 32 values too
        (kernels.reference.linear_w8a8). On CPU the low formats keep each GEMM weight only in its
        pack; release=True does so for float32 too (a model the engine loaded and owns). Call before
        pack_for_cpu."""
        if weight_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"weight_dtype must be None, torch.bfloat16 or torch.float16, got {weight_dtype!r}")
        if quantization not in (None, "int8", "w8a8"):
            raise ValueError(f"quantization must be None, 'int8' or 'w8a8', got {quantization!r}")
        if quantization == "w8a8":
            self._check_w8a8(group_size)
        if weight_dtype is not None:
            for p in self.parameters():
                if p.is_floating_point():
                    p.copy_(p.to(weight_dtype))
            self.weight_dtype = weight_dtype
        linears = [m for m in self.layers.modules() if isinstance(m, Linear)]
        if any(m.released for m in linears):
            if (weight_dtype, quantization, group_size) == self._format:
                return  # already in this format (a second LLM over the same module)
            raise ValueError(f"the model's GEMM weights are already stored as {self._format} without a float32 "
                             f"copy; load the model again for another format")
        head = self.head_weight
        head_quant = None
        if quantization in ("int8", "w8a8"):
            for m in linears:
                m.quant = quantize_int8(m.weight, group_size)
                m.weight.copy_(dequantize(m.quant, m.weight.dtype))
            # the head is the largest GEMM of a small model: left in float32 it would be most of a
            # decode step's weight reads (a tied embedding then holds the same int8 values)
            head_quant = quantize_int8(head, group_size)
            head.copy_(dequantize(head_quant, head.dtype))
            for m in (*linears, self):
                m.int8_activations = quantization == "w8a8"
        # CPU inference runs the packed int8 / bf16 copies (pack_for_cpu): the float32 parameters of
        # those GEMMs go, and a path without the packed kernel dequantises on the fly
        low = quantization is not None or weight_dtype == torch.bfloat16
        if (low or release) and all(w.device.type == "cpu" and w.dtype == torch.float32
                                    for w in (head, *(m.weight for m in linears))):
            for m in linears:
                m.stored = m.quant if m.quant is not None else self._packable(m.weight.detach())
                m.weight = None
            self.head_stored = head_quant if head_quant is not None else self._packable(head.detach())
            (self.tok_emb if self.lm_head is None else self.lm_head).weight = None
        self._format = (weight_dtype, quantization, group_size)

    int8_activations = False  # set_weight_format "w8a8", for the head (as Linear.int8_activations)

    def _check_w8a8(self, group_size):
        params = list(self.parameters())
        if not all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
            raise ValueError("quantization 'w8a8' is for CPU float32 models (it quantises activations in the CPU "
                             "kernels); use 'int8' on other devices and dtypes")
        ks = {m.in_features for m in self.layers.modules() if isinstance(m, Linear)} | {self.config.d_model}
        for k in sorted(ks):
            g = group_size or k
            if k % 32 or g % 32:
                raise ValueError(f"quantization 'w8a8' needs every GEMM's input features and group size in multiples "
                                 f"of 32 (blocks of activations), got {k} inputs in groups of {g}; use 'int8'")

    def _packable(self, w: torch.Tensor):
        # bf16 storage packs bf16 (exact: the values were rounded to it); fp16 has no packed CPU format
        return w.to(torch.bfloat16) if self.weight_dtype == torch.bfloat16 and w.dtype == torch.float32 else w

    def pack_for_cpu(self) -> list[torch.Tensor]:
        """Copies every GEMM weight (the head's too) into the CPU inference GEMM's layout
        (kernels.decode.pack_linear): CPU float32 inference then runs them on the packed kernel and
        a decode step's layer in one gpt_engine.kernels._C call. Elsewhere (not CPU float32) a no-op. The copies
        are in the weight format (set_weight_format: int8, bf16 or the params' float32), add to the
        params' memory, and are a snapshot: pack again after changing the weights.
        Returns the packed tensors."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        if self.norm_f.weight.dtype != torch.float32:  # the packed kernels compute in float32 only
            for m in (*linears, *self.layers):
                if not m.released:  # a released weight's pack is its only copy
                    m.packed = None
            if self.head_weight is not None:
                self.packed_head = None
            return []
        for m in linears:
            if m.released:
                if m.stored is not None:
                    m.packed = pack_linear(m.stored, int8_activations=m.int8_activations)
                    if m.packed is not None:  # the pack is now the weight's one copy
                        m.stored = m.quant = None
                continue
            m.packed = pack_linear(m.quant if m.quant is not None else self._packable(m.weight.detach()))
        if self.head_weight is not None:
            self.packed_head = pack_linear(self._packable(self.head_weight.detach()))
        elif self.head_stored is not None:
            self.packed_head = pack_linear(self.head_stored, int8_activations=self.int8_activations)
            if self.packed_head is not None:
                self.head_stored = None
        for layer in self.layers:
            layer.packed = pack_layer(layer.decode_weights())
        return [p.weight for p in (*(m.packed for m in linears), self.packed_head) if p is not None]

    def state_dict(self, *args, **kwargs):
        if self.head_weight is None or any(isinstance(m, Linear) and m.released for m in self.modules()):
            raise RuntimeError("this model's GEMM weights live only in the CPU inference engine's packs (int8 / "
                               "bf16 formats, or a model LLM loaded itself), without their float32 parameters, so "
                               "it has no full state dict; save the model it was loaded from instead")
        return super().state_dict(*args, **kwargs)

    def memory_bytes(self) -> dict:
        """Bytes of the tensors the model holds, each tensor once (tied ones too): params (parameters and buffers),
        packed (pack_for_cpu's copies), stored (int8 / bf16 weights not yet packed), and gemm, the
        part of all three that holds the transformer layers' GEMM weights."""
        seen: set = set()

        def size(ts) -> int:
            n = 0
            for t in ts:
                if t is None:
                    continue
                if isinstance(t, QuantizedWeight):
                    n += size((t.q, t.scale))
                    continue
                # by the tensor's own bytes: hugepages.adopt puts many tensors in one shared storage
                key = (t.data_ptr(), t.device)
                if key not in seen:
                    seen.add(key)
                    n += t.numel() * t.element_size()
            return n

        linears = [m for m in self.layers.modules() if isinstance(m, Linear)]
        gemm = size(t for m in linears for t in (m.weight, m.packed and m.packed.weight, m.stored, m.quant))
        seen.clear()
        return dict(params=size((*self.parameters(), *self.buffers())),
                    packed=size(p.weight for p in (*(m.packed for m in self.modules() if isinstance(m, Linear)),
                                                   self.packed_head) if p is not None),
                    stored=size((self.head_stored, *(t for m in linears for t in (m.stored, m.quant)))),
                    gemm=gemm)

    @property
    def head_weight(self):
        """The head's float parameter; None once set_weight_format released it (head_stored / packed_head)."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def dense_head(self, dtype: torch.dtype) -> torch.Tensor:
        """The head's (V, C) weight as the GEMM computes with it (as Linear.dense_weight)."""
        if self.head_weight is not None:
            return self.head_weight
        return dense(released_form(self.head_stored, self.packed_head), dtype)

    def embed(self, input_ids):
        if self.tok_emb.weight is not None:
            return self.tok_emb(input_ids)
        # a tied embedding released with the head: its rows from the head's int8 / bf16 form
        if self.head_stored is None:
            return packed_rows(self.packed_head, input_ids)
        w = self.head_stored
        if isinstance(w, QuantizedWeight):
            return dequantize(QuantizedWeight(w.q[input_ids.flatten()], w.scale[input_ids.flatten()], w.group_size)
                              ).view(*input_ids.shape, -1)
        return w[input_ids].float()

    def hidden(self, input_ids, positions, kv_caches=None, meta=None, rope=None):
        """Final-norm hidden states (..., C) for input_ids (...); rope: (cos, sin) replacing the rotary tables
        in a dense forward (Rotary.tables_for)."""
        x = self.embed(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        residual = None
        if meta is not None and meta.decode:
            rotary = self.layers[0].attn.rotary
            # the rotary tables at the positions, shared by the layers (only the CPU path takes them)
            rope = None if rotary is None or not x.is_cpu else (rotary.cos[positions], rotary.sin[positions])
            for layer, cache in zip(self.layers, kv_caches):
                x, residual = layer.decode_step(x, residual, positions, cache, meta, rope)
        else:
            if meta is not None and meta.rope_seq_lens is not None:
                # one table row per token, rotated for its own sequence length
                cos, sin = rope_at(self.config, positions.cpu(), meta.rope_seq_lens.cpu())
                rope = cos.to(x.device), sin.to(x.device)
                positions = torch.arange(len(positions), device=x.device)
            for i, layer in enumerate(self.layers):
                x, residual = layer(x, residual, positions, None if kv_caches is None else kv_caches[i], meta,
                                    rope)
        return self.norm_f(x, residual)[0]

    def forward(self, input_ids):
        # input_ids (B, T) int64 -> logits (B, T, V)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_seq_len:  # checked here, not in hidden(): step() must not sync
            raise ValueError(f"position {input_ids.shape[1] - 1} exceeds max_seq_len {self.config.max_seq_len}")
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        rotary = self.layers[0].attn.rotary if len(self.layers) else None
        rope = None if rotary is None else rotary.tables_for(input_ids.shape[1])
        return self.logits(self.hidden(input_ids, pos, rope=rope))

    def logits(self, h):
        head = self.packed_head
        if head is not None and decode_layer_applies(h, (head.weight,)):  # CPU inference: the packed GEMM
            return packed_linear(h, head)
        if self.int8_activations:
            return linear_w8a8(h, released_form(self.head_stored, self.packed_head))
        return linear(h, self.dense_head(h.dtype))

    @torch.no_grad()
    def step(self, input_ids, positions, kv_caches, meta: StepMeta, logits_indices=None):
        """One engine step: input_ids/positions (N,) packed; returns logits (len(logits_indices), V)."""
        h = self.hidden(input_ids, positions, kv_caches, meta)
        return self.logits(h if logits_indices is None else h[logits_indices])
