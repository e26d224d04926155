"""The decoder-only transformer of every family (families/), built from ModelConfig's traits on the kernels ops.

Two entry points share every layer:
  model(input_ids)                      dense causal forward, (B, T) -> logits (B, T, V)
  model.step(ids, positions, kv, meta)  one engine step over a packed batch with a paged KV cache

For inference the engine sets each GEMM weight's format once (set_weight_format: int8, w8a8, bf16
storage, or float32 held by the engine alone) and packs them for the CPU kernels (pack_for_cpu);
formats.py holds the formats, so nothing here depends on which one a layer has.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig
from .formats import Dense, WeightFormat, weight_format
from .layers import Block, Linear, Norm, StepMeta
from .parallel import TPGroup, check_tensor_parallel, shard_state, vocab_rows
from .rope import Rotary, rope_at


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None):
        """tp: this rank's slice of a tensor-parallel model (parallel.py; the config stays the whole model's)."""
        super().__init__()
        self.config, self.tp = cfg, tp
        rows = vocab_rows(cfg.vocab_size, tp.world) if tp else cfg.vocab_size
        self.tok_emb = nn.Embedding(rows, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        rotary = Rotary(cfg) if cfg.positions == "rotary" else None  # tables to max_seq_len, shared by the layers
        self.layers = nn.ModuleList(Block(cfg, rotary, i, tp) for i in range(cfg.n_layer))
        self.norm_f = Norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, rows, bias=cfg.head_bias)
        # the head's weight format; tied, its weight is the embedding's, which then reads its rows from it
        self.head: WeightFormat = Dense(self._head_owner)
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
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def _head_owner(self) -> nn.Module:
        return self.tok_emb if self.lm_head is None else self.lm_head

    def linears(self) -> list[Linear]:
        """The transformer layers' GEMMs (the head is self.head)."""
        return [m for m in self.layers.modules() if isinstance(m, Linear)]

    _format = (None, None, None)  # set_weight_format's arguments

    @torch.no_grad()
    def set_weight_format(self, weight_dtype: torch.dtype | None = None, quantization: str | None = None,
                          group_size: int | None = None, release: bool = False) -> None:
        """Inference weight formats (formats.py), applied once at load. weight_dtype (torch.bfloat16 /
        torch.float16): every parameter is rounded to it (kept in the compute dtype, so every path sees
        the stored values) and pack_for_cpu packs the GEMM weights in bf16. quantization "int8": each
        GEMM weight (the transformer layers' and the head's, so a tied embedding's too) is quantised
        per output channel, or per group_size inputs; the norms and other embeddings keep weight_dtype.
        "w8a8" (CPU float32 models): int8 weights as "int8", and every GEMM quantises its input per 32
        values too. On CPU the low formats keep each GEMM weight only in its format (then its pack);
        release=True does so for float32 too (a model the engine loaded and owns). Call before
        pack_for_cpu."""
        if weight_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"weight_dtype must be None, torch.bfloat16 or torch.float16, got {weight_dtype!r}")
        if quantization not in (None, "int8", "w8a8"):
            raise ValueError(f"quantization must be None, 'int8' or 'w8a8', got {quantization!r}")
        if quantization == "w8a8":
            self._check_w8a8(group_size)
        if self.released:
            if (weight_dtype, quantization, group_size) == self._format:
                return  # already in this format (a second LLM over the same module)
            raise ValueError(f"the model's GEMM weights are already stored as {self._format} without a float32 "
                             f"copy; load the model again for another format")
        if weight_dtype is not None:
            for p in self.parameters():
                if p.is_floating_point():
                    p.copy_(p.to(weight_dtype))
        linears = self.linears()
        # CPU inference runs the packed int8 / bf16 copies (pack_for_cpu): the float32 parameters of
        # those GEMMs go, and a path without the packed kernel rebuilds the weight from its format
        low = quantization is not None or weight_dtype == torch.bfloat16
        release = (low or release) and all(w.device.type == "cpu" and w.dtype == torch.float32
                                           for w in (self.head_weight, *(m.weight for m in linears)))
        for m in linears:
            m.format = weight_format(m, weight_dtype, quantization, group_size, release)
        # the head is the largest GEMM of a small model: left in float32 it would be most of a decode
        # step's weight reads (a tied embedding then holds the same int8 values). Where its parameter
        # stays, it runs the dense GEMM on the dequantised values, keeping no int8 copy.
        self.head = weight_format(self._head_owner, weight_dtype, quantization, group_size, release, int8_gemm=False)
        self._format = (weight_dtype, quantization, group_size)

    def _check_w8a8(self, group_size):
        params = list(self.parameters())
        if not all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
            raise ValueError("quantization 'w8a8' is for CPU float32 models (it quantises activations in the CPU "
                             "kernels); use 'int8' on other devices and dtypes")
        ks = {m.in_features for m in self.linears()} | {self.config.d_model}
        for k in sorted(ks):
            g = group_size or k
            if k % 32 or g % 32:
                raise ValueError(f"quantization 'w8a8' needs every GEMM's input features and group size in multiples "
                                 f"of 32 (blocks of activations), got {k} inputs in groups of {g}; use 'int8'")

    @property
    def released(self) -> bool:
        """Whether the GEMM weights live only in their formats, without float parameters (set_weight_format
        releases the head's with the layers')."""
        return self.head.released

    def pack_for_cpu(self) -> list[torch.Tensor]:
        """Copies every GEMM weight (the head's too) into the CPU inference GEMM's layout
        (kernels.pack_linear): CPU float32 inference then runs them on the packed kernel and
        a decode step's layer in one gpt_engine.kernels._C call. Elsewhere (not CPU float32) a no-op. The copies
        are in the weight format (set_weight_format: int8, bf16 or the params' float32), add to the
        params' memory unless released, and are a snapshot: pack again after changing the weights.
        Returns the packed tensors."""
        linears = self.linears()
        packing = self.norm_f.weight.dtype == torch.float32  # the packed kernels compute in float32 only
        for m in linears:
            m.format = m.format.pack() if packing else m.format.unpack()
        self.head = self.head.pack() if packing else self.head.unpack()
        for layer in self.layers:
            layer.pack_for_cpu()
        return [f.packed.weight for f in (*(m.format for m in linears), self.head) if f.packed is not None]

    def state_dict(self, *args, **kwargs):
        if self.released:
            raise RuntimeError("this model's GEMM weights live only in the CPU inference engine's packs (int8 / "
                               "bf16 formats, or a model LLM loaded itself), without their float32 parameters, so "
                               "it has no full state dict; save the model it was loaded from instead")
        return super().state_dict(*args, **kwargs)

    def memory_bytes(self) -> dict:
        """Bytes of the tensors the model holds, each tensor once (tied ones too): params (parameters and buffers),
        packed (pack_for_cpu's copies), stored (int8 / bf16 weights held by their formats besides the params and
        packs), and gemm, the part of all three that holds the transformer layers' GEMM weights."""
        seen: set = set()

        def size(ts) -> int:
            n = 0
            for t in ts:
                if t is None:
                    continue
                # by the tensor's own bytes: hugepages.adopt puts many tensors in one shared storage
                key = (t.data_ptr(), t.device)
                if key not in seen:
                    seen.add(key)
                    n += t.numel() * t.element_size()
            return n

        def pack(f: WeightFormat) -> tuple:
            return () if f.packed is None else (f.packed.weight,)

        linears = self.linears()
        formats = [*(m.format for m in linears), self.head]
        gemm = size(t for m in linears for t in (m.weight, *pack(m.format), *m.format.held()))
        seen.clear()
        return dict(params=size((*self.parameters(), *self.buffers())),
                    packed=size(t for f in formats for t in pack(f)),
                    stored=size(t for f in formats for t in f.held()),
                    gemm=gemm)

    @property
    def head_weight(self):
        """The head's float parameter; None once set_weight_format released it (self.head holds it)."""
        return self._head_owner.weight

    def shard(self, tp: TPGroup) -> "GPT":
        """This model's slice for one tensor-parallel rank (parallel.py), sharing no storage with it."""
        check_tensor_parallel(self.config, tp.world)
        with torch.device("meta"):
            local = GPT(self.config, tp)
        local.load_state_dict(shard_state(self.state_dict(), self.config, tp.rank, tp.world), strict=True,
                              assign=True)
        for name, b in self.named_buffers():  # the rotary tables, not in the state dict
            mod, _, attr = name.rpartition(".")
            setattr(local.get_submodule(mod), attr, b)
        return local.eval().requires_grad_(False)

    @property
    def kv_heads(self) -> int:
        """The KV heads this rank's cache holds."""
        return self.layers[0].attn.hkv if len(self.layers) else self.config.n_kv_head

    def embed(self, input_ids):
        tp = self.tp
        ids = input_ids
        if tp is not None:  # vocab-parallel: the rows this rank holds, zeros for the others, summed over ranks
            rows = self.tok_emb.num_embeddings
            ids = input_ids - tp.rank * rows
            held = (ids >= 0) & (ids < rows)
            ids = ids.clamp(0, rows - 1)
        # tied: the rows of the head's weight, in the head's format
        x = self.head.rows(ids) if self.lm_head is None else self.tok_emb(ids)
        if tp is not None:
            x = tp.all_reduce(x * held.unsqueeze(-1).to(x.dtype))
        scale = self.config.embed_scale
        # in the activations' dtype, as transformers rounds Gemma's sqrt(d_model)
        return x if scale is None else x * torch.tensor(scale, dtype=x.dtype)

    def hidden(self, input_ids, positions, kv_caches=None, meta=None, rope=None):
        """Final-norm hidden states (..., C) for input_ids (...); rope: (cos, sin) replacing the rotary tables
        in a dense forward (Rotary.tables_for)."""
        if self.training and torch.is_grad_enabled() and self.released:
            raise RuntimeError("this model's GEMM weights live only in the CPU inference engine's packs (int8 / "
                               "bf16 formats, or a model LLM loaded itself): it cannot be trained; load it with "
                               "gpt_engine.load_model (no quantization or bf16 dtype) to train")
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
        y = self.head.apply(h, None if self.lm_head is None else self.lm_head.bias)
        # vocab-parallel: every rank's slice, the last one's padding cut
        return y if self.tp is None else self.tp.all_gather(y)[..., :self.config.vocab_size]

    @torch.no_grad()
    def step(self, input_ids, positions, kv_caches, meta: StepMeta, logits_indices=None):
        """One engine step: input_ids/positions (N,) packed; returns logits (len(logits_indices), V)."""
        h = self.hidden(input_ids, positions, kv_caches, meta)
        return self.logits(h if logits_indices is None else h[logits_indices])
