"""Weight formats: how one GEMM weight W (N, K) is held and multiplied.

Every linear layer (layers.Linear, and GPT's output head) holds exactly one WeightFormat and calls
fmt.apply(x, bias, activation); the model code never asks which format it has. The formats:

  Dense   the float parameter itself (fp32 / fp16 / bf16): training, GPU, any model that keeps its
          parameters; bf16 / fp16 storage on a float32 model is this with the values rounded
  Stored  a float tensor held here instead of a parameter: bf16 storage on CPU, or the float32
          weight of a model the engine loaded itself, until it is packed
  Int8    int8 weight-only, one scale per output channel or per group of inputs; with its parameter
          kept (GPU) that holds the dequantised values for large GEMMs, and decode-sized batches
          stream the int8 weight instead (the Triton w8a16 kernel)
  W8A8    int8 weights, and the GEMM quantises its input to int8 too (CPU float32 models)
  Packed  any of those copied into the CPU GEMM's panel layout for CPU float32 inference; off that
          kernel (autograd, TRITON_INTERPRET=1) it computes as the format it was packed from

GPT.set_weight_format picks one per layer at load (weight_format below), GPT.pack_for_cpu replaces
it with its packed form. A released format (released=True) holds the weight's only copy: the float
parameter is gone, because a float32 copy beside an int8 or bf16 one would be most of the model's
memory. Formats are plain objects, not modules: their tensors stay out of parameters and state
dicts, which keep the float checkpoint's names and shapes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt_engine.kernels import (QuantizedWeight, decode_layer_applies, dequantize, linear, linear_int8, linear_w8a8,
                                pack_linear, packed_linear, packed_rows, quantize_int8, triton_w8a16, unpack_linear)


class WeightFormat:
    """One GEMM weight W (N, K) in some format. Subclasses implement apply, dense_weight and storage."""
    released = False          # the float parameter is gone: this object holds the weight's only copy
    int8_activations = False  # the packed GEMM quantises its input per 32 values (w8a8)
    packed = None             # kernels.pack_linear's PackedLinear, once packed for the CPU GEMM (Packed)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None, activation=None) -> torch.Tensor:
        """act(x @ W^T + bias): x (..., K) -> (..., N)."""
        raise NotImplementedError

    def dense_weight(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """W as the GEMM computes with it, (N, K): the parameter, or a temporary rebuilt from the
        stored form in dtype (on device)."""
        raise NotImplementedError

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """W[ids] (..., K): a tied embedding's lookup, read from the head's own format."""
        return F.embedding(ids, self.dense_weight(torch.float32))

    def storage(self):
        """W in this format, as kernels.pack_linear takes it: a float tensor or a QuantizedWeight."""
        raise NotImplementedError

    def held(self) -> tuple[torch.Tensor, ...]:
        """The tensors this object holds besides the module's parameters and the CPU pack."""
        return ()

    def pack(self) -> WeightFormat:
        """This weight with a copy in the CPU GEMM's layout (Packed), or self where that kernel
        cannot take it (not on CPU, or the extension not built)."""
        p = pack_linear(self.storage(), int8_activations=self.int8_activations)
        return self if p is None else Packed(p, self)

    def unpack(self) -> WeightFormat:
        """This weight without a CPU pack it does not need: the format it was packed from, unless
        the pack is its only copy."""
        return self


def _storage_of(w: torch.Tensor, storage_dtype: torch.dtype | None) -> torch.Tensor:
    # bf16 storage keeps bf16, exactly (the values were rounded to it); fp16 has no packed CPU format,
    # so an fp16-rounded weight stays in its float32 form
    return w.to(torch.bfloat16) if storage_dtype == torch.bfloat16 and w.dtype == torch.float32 else w


class Dense(WeightFormat):
    """The owner module's float parameter `weight`. Read at each call, not kept here: loading
    (load_state_dict(assign=True)), FSDP and torch.func.functional_call swap the parameter object."""

    def __init__(self, owner: nn.Module, storage_dtype: torch.dtype | None = None):
        self.owner, self.storage_dtype = owner, storage_dtype

    def apply(self, x, bias=None, activation=None):
        return linear(x, self.owner.weight, bias, activation)

    def dense_weight(self, dtype=torch.float32, device=None):
        return self.owner.weight  # as it is: the parameter the GEMM and autograd see

    def rows(self, ids):
        return F.embedding(ids, self.owner.weight)

    def storage(self):
        return _storage_of(self.owner.weight.detach(), self.storage_dtype)


class Stored(WeightFormat):
    """A float W (bf16 or float32) held here, without a parameter."""
    released = True

    def __init__(self, w: torch.Tensor):
        self.w = w

    def apply(self, x, bias=None, activation=None):
        return linear(x, self.dense_weight(x.dtype, x.device), bias, activation)

    def dense_weight(self, dtype=torch.float32, device=None):
        return self.w.to(device=device, dtype=dtype)

    def rows(self, ids):
        return self.w[ids].float()

    def storage(self):
        return self.w

    def held(self):
        return (self.w,)


class Int8(WeightFormat):
    """int8 W with fp32 scales (kernels.quantize_int8). owner: the module whose parameter `weight`
    holds the dequantised values (kept off CPU), or None (released: q is the only copy)."""

    def __init__(self, q: QuantizedWeight, owner: nn.Module | None = None):
        self.q, self.owner = q, owner
        self.released = owner is None

    def apply(self, x, bias=None, activation=None):
        if self.owner is not None and not triton_w8a16(x):
            # compute bound: the dequantised parameter's GEMM, without dequantising on every call
            return linear(x, self.owner.weight, bias, activation)
        return linear_int8(x, self.q, bias, activation)

    def dense_weight(self, dtype=torch.float32, device=None):
        if self.owner is not None:
            return self.owner.weight
        return dequantize(self.q, dtype).to(device=device)

    def rows(self, ids):
        if self.owner is not None:
            return F.embedding(ids, self.owner.weight)
        flat = ids.flatten()  # dequantise len(ids) rows, not the whole (V, C) table
        q = self.q
        return dequantize(QuantizedWeight(q.q[flat], q.scale[flat], q.group_size)).view(*ids.shape, -1)

    def storage(self):
        return self.q

    def held(self):
        return (self.q.q, self.q.scale)


class W8A8(Int8):
    """int8 W, and x quantised per 32 inputs too (kernels.reference.linear_w8a8): integer dot
    products in the packed CPU kernel. Always released: it exists for CPU float32 models only."""
    int8_activations = True

    def __init__(self, q: QuantizedWeight):
        super().__init__(q)

    def apply(self, x, bias=None, activation=None):
        return linear_w8a8(x, self.q, bias, activation)


class Packed(WeightFormat):
    """A format's W in the CPU GEMM's panel layout (kernels.pack_linear), for CPU float32
    inference. When the format it was packed from is released, the pack is the weight's only copy
    and that format is rebuilt from it (a temporary) for a call the packed kernel cannot serve;
    otherwise the pack is a snapshot of the parameter, taken again by pack()."""

    def __init__(self, packed, base: WeightFormat):
        self.packed = packed
        self.released, self.int8_activations = base.released, base.int8_activations
        self._base = None if base.released else base
        self._kind = type(base)

    def base(self) -> WeightFormat:
        """The format this was packed from, computing without the packed kernel."""
        return self._base if self._base is not None else self._kind(unpack_linear(self.packed))

    def apply(self, x, bias=None, activation=None):
        if decode_layer_applies(x, (self.packed.weight,)):
            return packed_linear(x, self.packed, bias, activation)
        return self.base().apply(x, bias, activation)

    def dense_weight(self, dtype=torch.float32, device=None):
        return self.base().dense_weight(dtype, device)

    def rows(self, ids):
        return packed_rows(self.packed, ids) if self._base is None else self._base.rows(ids)

    def storage(self):
        return self.base().storage()

    def held(self):
        return () if self._base is None else self._base.held()

    def pack(self):
        return self if self._base is None else self._base.pack()

    def unpack(self):
        return self if self._base is None else self._base


def weight_format(owner: nn.Module, storage_dtype: torch.dtype | None = None, quantization: str | None = None,
                  group_size: int | None = None, release: bool = False, int8_gemm: bool = True) -> WeightFormat:
    """The format of owner.weight, an (N, K) float parameter, for GPT.set_weight_format.

    storage_dtype: the precision its values were rounded to (bf16 is then what Stored keeps and
    the CPU pack holds). quantization "int8" / "w8a8": quantised per output channel, or per
    group_size inputs. release: the parameter goes (owner.weight = None) and the format holds the
    only copy; else a quantised weight's parameter is overwritten with its dequantised values, so
    every path computes on the same weight, and int8_gemm=False keeps no int8 copy beside it."""
    if quantization == "w8a8" and not release:
        raise ValueError("quantization 'w8a8' keeps the weights only as int8 (CPU float32 models)")
    w = owner.weight
    q = None if quantization is None else quantize_int8(w, group_size)
    if release:
        owner.weight = None
        if q is not None:
            return W8A8(q) if quantization == "w8a8" else Int8(q)
        return Stored(_storage_of(w.detach(), storage_dtype))
    if q is not None:
        w.copy_(dequantize(q, w.dtype))
        if int8_gemm:
            return Int8(q, owner)
    return Dense(owner, storage_dtype)
