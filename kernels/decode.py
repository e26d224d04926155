"""One decoder layer of a CPU decode step in a single call into gpt_engine.kernels._C.

The engine's decode step on CPU runs ~10 kernel calls per layer, and on small models their
Python wrappers (argument checks, dispatch) are a large share of the step. csrc/decode_cpu.cpp's
decode_layer runs the same kernels back to back from C++, each behind its entry point's checks.
kernel (csrc/decode_cpu.cpp) -> packing (pack_layer: the GEMM weights through kernels.packed) ->
public function decode_layer. Inference and eager only (fp32 CPU activations and compute, no
autograd), like kernels.packed, so no custom op.
kernels.reference.decode_layer (on the unpacked weights) is its twin.
"""
from __future__ import annotations

import torch

from . import _checks as C
from . import _dispatch as dispatch
from ._ext import ext
from .gemm import _ACT_IDS
from .packed import pack_linear
from .weights import PackedLayer, PackedLinear

# the gated MLPs: fc yields [gate | up], the MLP takes act(gate) * up (swiglu: silu, geglu: tanh GELU)
GATED = {"swiglu": 4, "geglu": 5}
ACTIVATIONS = (*_ACT_IDS, *GATED)
GEMMS = (2, 4, 8, 10)  # the weights of qkv, proj, fc and fc2 among a layer's 12 tensors


def decode_layer_applies(x: torch.Tensor, weights) -> bool:
    """Whether the CPU inference kernels here and in kernels.packed, rotary and glu serve x and
    weights (kernels._dispatch.cpu_decode_layer)."""
    return dispatch.cpu_decode_layer(x, weights)


def pack_layer(weights) -> PackedLayer | None:
    """weights: norm1 w, b | qkv w, b | proj w, b | norm2 w, b | fc w, b | fc2 w, b, and optionally
    q_norm w | k_norm w (Qwen3's per-head RMSNorm of q and k, (D,)). Biases may be None, and so may
    norm2's weight (GPT-J's parallel block) and the q/k norm weights; a GEMM weight may be given
    already packed, as a PackedLinear. -> the PackedLayer decode_layer runs, or None where it cannot
    (not CPU float32, or no gpt_engine.kernels._C). The GEMM weights are copied: a snapshot, to pack
    again after changing them."""
    if len(weights) not in (12, 14):
        raise ValueError(f"weights must hold the layer's 12 tensors (or 14 with the q and k norms' weights), "
                         f"got {len(weights)}")
    t = list(weights) + [None] * (14 - len(weights))
    for i in GEMMS:
        t[i] = t[i] if isinstance(t[i], PackedLinear) else pack_linear(t[i])
        if t[i] is None:
            return None
    if any(w is not None and i not in GEMMS and (w.device.type != "cpu" or w.dtype != torch.float32)
           for i, w in enumerate(t)):
        return None
    return PackedLayer(tuple(w.weight if i in GEMMS else w for i, w in enumerate(t)), tuple(t[i].n for i in GEMMS))


def decode_layer(x, residual, layer: PackedLayer, k_cache, v_cache, slot_mapping, block_table, seq_lens, rope,
                 n_head: int, eps: float, rms: bool, activation, softmax_scale: float, window_size=(-1, -1),
                 parallel: int = 0, part: int = 0, k_scale=None, v_scale=None, lora=None, lora_slots=None):
    """x (B, C) entering the layer; residual (B, C) or None in the first layer (x is the stream);
    layer from pack_layer (with q/k norm weights: q and k heads RMS-normalised, eps, before the
    rotary); rope None or (cos, sin) each (B, R/2) at the tokens' positions, rotating each head's
    first R <= D dims; activation one of ACTIVATIONS; window_size (left, right) as in
    paged_attention (a sliding-window layer sees its last left + 1 keys). parallel: 0 the
    sequential pre-norm block; 1 GPT-NeoX's attn(norm1(s)) + mlp(norm2(s)) on the stream s; 2
    GPT-J's attn(norm1(s)) + mlp(norm1(s)) (norm2's weights None). Writes the new K/V at
    slot_mapping. Returns (x, residual) for the next layer: its norm1 adds x to residual.
    part (tensor parallelism, whose all-reduces fall between the halves): 0 the whole layer; 1 the
    attention half -> (its output, the stream); 2 the MLP half -> (its output, the stream), given the
    stream as residual and, in a sequential block, the reduced attention output as x (a parallel
    block's caller sums both halves' outputs and reduces once). The caches are float32, bfloat16, or int8
    with k_scale/v_scale, as store_kvcache and paged_attention take them. lora (LoRA adapters, S-LoRA's
    gathered form): None, or 8 tensors, A (L, W, K) and B (L, W, N) float32 of qkv, proj, fc and fc2 (None,
    None for a GEMM without them), with lora_slots (B,) int64 each token's slot in [0, L), -1 for none:
    each GEMM adds x[i] @ A[s]^T @ B[s] to token i's output before its activation."""
    if not isinstance(layer, PackedLayer):
        raise TypeError(f"layer must be a PackedLayer from pack_layer, got {type(layer).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    left = C.window(window_size)[0]
    C.tensors(x=x, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping, block_table=block_table,
              seq_lens=seq_lens)
    C.scales(k_scale, v_scale)
    if torch.is_grad_enabled() or dispatch.use_triton(x) or ext() is None:
        raise ValueError("decode_layer runs CPU inference: under torch.no_grad(), not under TRITON_INTERPRET=1, "
                         "with gpt_engine.kernels._C built")
    cos, sin = rope if rope is not None else (None, None)
    act = GATED[activation] if activation in GATED else _ACT_IDS[activation]
    x, residual = ext().decode_layer(x, residual, list(layer.tensors), list(layer.n), k_cache, v_cache, slot_mapping,
                                     block_table, seq_lens, cos, sin, int(n_head), float(eps), bool(rms), act,
                                     float(softmax_scale), left, int(parallel), int(part), k_scale, v_scale,
                                     list(lora) if lora is not None else [], lora_slots)
    return x, residual
