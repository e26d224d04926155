"""The layers of a decoder block: Norm, Linear, Attention, MLP, and Block itself, on the kernels ops.

Each layer runs two ways: a dense causal forward over (B, T, C) (training, model(input_ids)) and an
engine step over packed tokens with a paged KV cache (StepMeta). On CPU float32 inference a decode
step's whole block is one call into the C++ extension (Block.decode_step), over the GEMM weights
GPT.pack_for_cpu packed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt_engine.kernels import (decode_layer, decode_layer_applies, flash_attention, flash_attention_varlen, glu,
                                layer_norm, pack_layer, paged_attention, rms_norm, rope_, store_kvcache)

from .config import ModelConfig
from .formats import Dense, WeightFormat
from .parallel import TPGroup, local_heads
from .rope import Rotary

if TYPE_CHECKING:
    from .lora import LoRASlots, LoRAStep


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
    lora: LoRAStep | None = None  # the tokens' LoRA adapters, when any token has one (models/lora.py)


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dim, scaling by (offset + weight) (Gemma's 1 + w); rms forces
    RMSNorm (the per-head q/k norm)."""

    def __init__(self, cfg: ModelConfig, dim: int | None = None, rms: bool = False):
        super().__init__()
        self.rms, self.eps, self.offset = rms or cfg.norm == "rmsnorm", cfg.norm_eps, cfg.norm_offset
        self.weight = nn.Parameter(torch.ones(dim or cfg.d_model))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(dim or cfg.d_model))

    def scale(self) -> torch.Tensor:
        """The weight the norm multiplies by."""
        return self.weight + self.offset if self.offset else self.weight

    def forward(self, x, residual=None):
        if self.rms:
            return rms_norm(x, self.scale(), self.eps, residual)
        return layer_norm(x, self.scale(), self.bias, self.eps, residual)


class Linear(nn.Module):
    """act(x @ W^T + b), W (d_out, d_in) held in one weight format (formats.py): the float parameter
    `weight` until GPT.set_weight_format or GPT.pack_for_cpu give it another. With LoRA slots (`lora`,
    models/lora.py) and a step's LoRAStep, each token's adapter update is added before the activation.
    reduce: a row-parallel layer's tensor-parallel group, whose ranks' partial outputs it sums (parallel.py)."""
    lora: LoRASlots | None = None

    def __init__(self, d_in, d_out, bias, activation=None, reduce: TPGroup | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.in_features, self.out_features = d_in, d_out
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        self.activation, self.reduce = activation, reduce
        self.format: WeightFormat = Dense(self)
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x, lora: LoRAStep | None = None):
        if lora is None or self.lora is None:
            y = self.format.apply(x, self.bias, self.activation)
        else:
            y = self.lora.apply(self.format.apply(x, self.bias), x, lora, self.activation)
        return y if self.reduce is None else self.reduce.all_reduce(y)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary | None = None, layer: int = 0, tp: TPGroup | None = None):
        super().__init__()
        # this rank's heads (all of them without tensor parallelism)
        self.h, self.hkv, _ = local_heads(cfg, tp.rank, tp.world) if tp else (cfg.n_head, cfg.n_kv_head, 0)
        self.d = cfg.head_dim
        self.scale, self.window = cfg.softmax_scale, cfg.window_sizes[layer]  # window (-1, -1): plain causal
        self.qkv = Linear(cfg.d_model, (self.h + 2 * self.hkv) * self.d, cfg.qkv_bias)
        self.proj = Linear(self.h * self.d, cfg.d_model, cfg.bias, reduce=tp)
        # Qwen3's RMSNorm over each head's q and k
        self.q_norm = Norm(cfg, self.d, rms=True) if cfg.qk_norm else None
        self.k_norm = Norm(cfg, self.d, rms=True) if cfg.qk_norm else None
        # one Rotary (its cos/sin tables) shared by every layer: GPT passes it in
        self.rotary = (rotary if rotary is not None else Rotary(cfg)) if cfg.positions == "rotary" else None

    def _qkv(self, x, positions, rope=None, lora=None):
        # (..., C) -> q (..., h, d), k and v (..., hkv, d): views of one fused projection
        h, hkv = self.h, self.hkv
        t = self.qkv(x, lora).unflatten(-1, (h + 2 * hkv, self.d))
        inplace = decode_layer_applies(t, ()) and t.is_contiguous()  # CPU inference: one pass each, in place
        if self.q_norm is not None:
            q, k = self.q_norm(t[..., :h, :]), self.k_norm(t[..., h:h + hkv, :])
            if inplace:
                t[..., :h, :], t[..., h:h + hkv, :] = q, k
            else:
                t = torch.cat([q, k, t[..., h + hkv:, :]], dim=-2)
        if self.rotary is None:
            return t.split([h, hkv, hkv], dim=-2)
        if inplace:
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
        # x (N, C) packed new tokens; cache = (k_cache, v_cache) each (blocks, block_size, hkv, d), and a
        # quantised (int8 / fp8) cache's (k_scale, v_scale) each (blocks, block_size, hkv)
        q, k, v = self._qkv(x, positions, rope, meta.lora)
        k_cache, v_cache, *scales = cache
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping, *scales)
        attn = dict(softmax_scale=self.scale, window_size=self.window)
        if scales:
            attn.update(k_scale=scales[0], v_scale=scales[1])
        if meta.decode:
            o = paged_attention(q, k_cache, v_cache, meta.block_table, meta.seq_lens, **attn)
        elif meta.fresh:  # the new K/V are the whole context: no reads back from the cache
            o = flash_attention_varlen(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_q, meta.max_seqlen_q,
                                       meta.max_seqlen_q, causal=True, softmax_scale=self.scale,
                                       window_size=self.window)
        else:
            o = flash_attention_varlen(q, k_cache, v_cache, meta.cu_seqlens_q, meta.cu_seqlens_k,
                                       meta.max_seqlen_q, meta.max_seqlen_k, causal=True,
                                       block_table=meta.block_table, **attn)
        return self.proj(o.flatten(-2), meta.lora)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None):
        super().__init__()
        self.gated, self.activation = cfg.mlp == "gated", cfg.activation
        f = cfg.d_ff // tp.world if tp else cfg.d_ff
        if self.gated:  # gate and up projections as one GEMM, [gate | up]
            self.fc = Linear(cfg.d_model, 2 * f, cfg.mlp_bias)
        else:
            self.fc = Linear(cfg.d_model, f, cfg.mlp_bias, activation=cfg.activation)
        self.proj = Linear(f, cfg.d_model, cfg.mlp_bias, reduce=tp)

    def forward(self, x, lora: LoRAStep | None = None):
        h = self.fc(x, lora)
        if self.gated and decode_layer_applies(h, ()):  # CPU inference: one pass, not three
            h = glu(h, self.activation)
        elif self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = (F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")) * up
        return self.proj(h, lora)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary | None = None, layer: int = 0, tp: TPGroup | None = None):
        super().__init__()
        self.norm1, self.attn, self.mlp = Norm(cfg), Attention(cfg, rotary, layer, tp), MLP(cfg, tp)
        self.tp = tp
        self.norm2 = None if cfg.shared_norm else Norm(cfg)
        # decode_layer's parallel: 0 sequential, 1 parallel with a norm each (NeoX), 2 one shared norm (GPT-J)
        self.parallel = (1 + cfg.shared_norm) if cfg.parallel_residual else 0
        act = {"silu": "swiglu", "gelu_tanh": "geglu"}[cfg.activation] if self.mlp.gated else cfg.activation
        # decode_layer's scalar arguments: n_head, eps, rms, activation, softmax scale, window
        self.decode_args = (self.attn.h, cfg.norm_eps, self.norm1.rms, act, cfg.softmax_scale, self.attn.window)
        self.packed = None  # kernels.pack_layer's PackedLayer, from pack_for_cpu: a snapshot of the weights

    def forward(self, x, residual, positions, cache=None, meta=None, rope=None):
        # pre-norm with the residual add fused into each norm: returns (sublayer output, residual stream)
        h, residual = self.norm1(x, residual) if residual is not None else (self.norm1(x), x)
        a = self.attn(h, positions, rope) if meta is None else self.attn.step(h, positions, cache, meta, rope)
        lora = None if meta is None else meta.lora
        if not self.parallel:
            h, residual = self.norm2(a, residual)
            return self.mlp(h, lora), residual
        # parallel: attention and MLP both read the stream; the next norm adds their sum to it
        return a + self.mlp(h if self.norm2 is None else self.norm2(residual), lora), residual

    def pack_for_cpu(self) -> None:
        """The fused decode layer (kernels.pack_layer) over the GEMMs' CPU packs, sharing their
        tensors; none unless every GEMM is packed and the norms are CPU float32."""
        a, m = self.attn, self.mlp
        packs = [lin.format.packed for lin in (a.qkv, a.proj, m.fc, m.proj)]
        if any(p is None for p in packs):
            self.packed = None
            return
        qkv, proj, fc, fc2 = packs
        n2 = (None, None) if self.norm2 is None else (self.norm2.scale(), self.norm2.bias)
        qk = () if a.q_norm is None else (a.q_norm.scale(), a.k_norm.scale())
        # decode_layer's order: norm1, qkv, proj, norm2, fc, fc2, each (weight, bias) [, q_norm, k_norm]
        self.packed = pack_layer((self.norm1.scale(), self.norm1.bias, qkv, a.qkv.bias, proj, a.proj.bias, *n2,
                                  fc, m.fc.bias, fc2, m.proj.bias, *qk))

    def decode_step(self, x, residual, positions, cache, meta: StepMeta, rope):
        """forward() for a decode step: once packed (CPU fp32), the whole layer is one call into
        gpt_engine.kernels._C, LoRA adapters' updates included (each token's own, in the kernel)."""
        layer = self.packed
        if layer is None or (meta.lora is not None and self.tp is not None) or not decode_layer_applies(x, ()):
            return self(x, residual, positions, cache, meta)
        args = (*cache[:2], meta.slot_mapping, meta.block_table, meta.seq_lens, rope, *self.decode_args)
        kw = dict(k_scale=cache[2], v_scale=cache[3]) if len(cache) == 4 else {}  # a quantised cache's scales
        if meta.lora is not None:
            lins = (self.attn.qkv, self.attn.proj, self.mlp.fc, self.mlp.proj)
            kw.update(lora=[t for lin in lins for t in (lin.lora.slot_views if lin.lora else (None, None))],
                      lora_slots=meta.lora.slots)
        if self.tp is None:
            return decode_layer(x, residual, layer, *args, parallel=self.parallel, **kw)
        # tensor parallel: the layer in its two halves, each rank's partial outputs summed between them
        a, stream = decode_layer(x, residual, layer, *args, parallel=self.parallel, part=1, **kw)
        if not self.parallel:
            m, stream = decode_layer(self.tp.all_reduce(a), stream, layer, *args, parallel=0, part=2, **kw)
            return self.tp.all_reduce(m), stream
        m, _ = decode_layer(a, stream, layer, *args, parallel=self.parallel, part=2, **kw)
        return self.tp.all_reduce(m.add_(a)), stream
