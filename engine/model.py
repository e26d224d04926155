"""The decoder-only transformer (gpt2 and llama families), built on the kernels ops.

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
from gpt_engine.kernels.decode import (decode_layer, decode_layer_applies, pack_layer, pack_linear, packed_linear, rope_,
                            swiglu)
from gpt_engine.kernels.paged import store_kvcache

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


class Norm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rms, self.eps = cfg.model_type == "llama", cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x, residual=None):
        if self.rms:
            return rms_norm(x, self.weight, self.eps, residual)
        return layer_norm(x, self.weight, self.bias, self.eps, residual)


class Linear(nn.Module):
    def __init__(self, d_in, d_out, bias, activation=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        self.activation = activation
        self.packed = None  # kernels.decode.PackedLinear from GPT.pack_for_cpu: a snapshot of the weight
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        p = self.packed
        if p is not None and decode_layer_applies(x, (p.weight,)):  # CPU inference: the packed GEMM
            return packed_linear(x, p, self.bias, self.activation)
        return linear(x, self.weight, self.bias, self.activation)


class Rotary(nn.Module):
    """HF-style (rotate_half) rotary embedding with cos/sin tables precomputed to max_seq_len."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.head_dim
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv)  # (T, d/2)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def forward(self, x, positions):
        # x (..., T, h, d), positions (..., T)
        cos, sin = self.cos[positions].float().unsqueeze(-2), self.sin[positions].float().unsqueeze(-2)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.hkv, self.d = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = Linear(cfg.d_model, (self.h + 2 * self.hkv) * self.d, cfg.bias)
        self.proj = Linear(self.h * self.d, cfg.d_model, cfg.bias)
        self.rotary = Rotary(cfg) if cfg.model_type == "llama" else None

    def _qkv(self, x, positions):
        # (..., C) -> q (..., h, d), k and v (..., hkv, d): views of one fused projection
        h, hkv = self.h, self.hkv
        t = self.qkv(x).unflatten(-1, (h + 2 * hkv, self.d))
        if self.rotary is None:
            return t.split([h, hkv, hkv], dim=-2)
        if decode_layer_applies(t, ()) and t.is_contiguous():  # CPU inference: rotate in place, one pass
            rope_(t, self.rotary.cos[positions], self.rotary.sin[positions], h + hkv)
            return t.split([h, hkv, hkv], dim=-2)
        qk, v = t.split([h + hkv, hkv], dim=-2)
        q, k = self.rotary(qk, positions).split([h, hkv], dim=-2)  # q and k side by side: one rotation
        return q, k, v

    def forward(self, x, positions):
        # x (B, T, C) -> (B, T, C)
        q, k, v = self._qkv(x, positions)
        return self.proj(flash_attention(q, k, v, causal=True).flatten(-2))

    def step(self, x, positions, cache, meta: StepMeta):
        # x (N, C) packed new tokens; cache = (k_cache, v_cache) each (blocks, block_size, hkv, d)
        q, k, v = self._qkv(x, positions)
        k_cache, v_cache = cache
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.decode:
            o = paged_attention(q, k_cache, v_cache, meta.block_table, meta.seq_lens)
        elif meta.fresh:  # the new K/V are the whole context: no reads back from the cache
            o = flash_attention_varlen(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_q, meta.max_seqlen_q,
                                       meta.max_seqlen_q, causal=True)
        else:
            o = flash_attention_varlen(q, k_cache, v_cache, meta.cu_seqlens_q, meta.cu_seqlens_k,
                                               meta.max_seqlen_q, meta.max_seqlen_k, causal=True,
                                               block_table=meta.block_table)
        return self.proj(o.flatten(-2))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.model_type == "llama"
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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = Norm(cfg), Attention(cfg), Norm(cfg), MLP(cfg)
        # decode_layer's scalar arguments: n_head, eps, rms, activation, softmax scale
        self.decode_args = (cfg.n_head, cfg.norm_eps, self.norm1.rms, "swiglu" if self.mlp.swiglu else cfg.activation,
                            1.0 / math.sqrt(cfg.head_dim))
        self.packed = None  # kernels.decode.PackedLayer from GPT.pack_for_cpu: a snapshot of the weights

    def forward(self, x, residual, positions, cache=None, meta=None):
        # pre-norm with the residual add fused into each norm: returns (sublayer output, residual stream)
        h, residual = self.norm1(x, residual) if residual is not None else (self.norm1(x), x)
        h = self.attn(h, positions) if meta is None else self.attn.step(h, positions, cache, meta)
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
        if layer is None or not decode_layer_applies(x, layer.tensors):
            return self(x, residual, positions, cache, meta)
        return decode_layer(x, residual, layer, *cache, meta.slot_mapping, meta.block_table, meta.seq_lens, rope,
                            *self.decode_args)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.model_type == "gpt2" else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = Norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.packed_head = None  # kernels.decode.PackedLinear from pack_for_cpu
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

    def pack_for_cpu(self) -> list[torch.Tensor]:
        """Copies every GEMM weight (the head's too) into the CPU inference GEMM's layout
        (kernels.decode.pack_linear): CPU float32 inference then runs them on the packed kernel and
        a decode step's layer in one gpt_engine.kernels._C call. Elsewhere (not CPU float32) a no-op. The copies
        double the GEMM weights' memory, and are a snapshot: pack again after changing the weights.
        Returns the packed tensors."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        for m in linears:
            m.packed = pack_linear(m.weight.detach())
        self.packed_head = pack_linear(self.head_weight.detach())
        for layer in self.layers:
            layer.packed = pack_layer(layer.decode_weights())
        return [p.weight for p in (*(m.packed for m in linears), self.packed_head) if p is not None]

    @property
    def head_weight(self):
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def hidden(self, input_ids, positions, kv_caches=None, meta=None):
        """Final-norm hidden states (..., C) for input_ids (...)."""
        x = self.tok_emb(input_ids)
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
            for i, layer in enumerate(self.layers):
                x, residual = layer(x, residual, positions, None if kv_caches is None else kv_caches[i], meta)
        return self.norm_f(x, residual)[0]

    def forward(self, input_ids):
        # input_ids (B, T) int64 -> logits (B, T, V)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_seq_len:  # checked here, not in hidden(): step() must not sync
            raise ValueError(f"position {input_ids.shape[1] - 1} exceeds max_seq_len {self.config.max_seq_len}")
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.logits(self.hidden(input_ids, pos))

    def logits(self, h):
        head = self.packed_head
        if head is not None and decode_layer_applies(h, (head.weight,)):  # CPU inference: the packed GEMM
            return packed_linear(h, head)
        return linear(h, self.head_weight)

    @torch.no_grad()
    def step(self, input_ids, positions, kv_caches, meta: StepMeta, logits_indices=None):
        """One engine step: input_ids/positions (N,) packed; returns logits (len(logits_indices), V)."""
        h = self.hidden(input_ids, positions, kv_caches, meta)
        return self.logits(h if logits_indices is None else h[logits_indices])
