"""Chunked linear + cross-entropy: the LM head and the loss in one custom op.

The full (tokens x vocab) logits never exist at once: forward walks over chunks of tokens,
computes each chunk's logits in fp32, its loss, and (when a gradient is wanted) its
gradients right away (Liger-style), so backward only scales the stored gradients. The
cost is the same three GEMMs a plain head would do, with O(chunk x vocab) extra memory.
"""
from __future__ import annotations

import functools
import warnings

import torch

from .data import IGNORE_INDEX


def default_chunk_size(vocab_size: int) -> int:
    # ~512 MiB of fp32 logits per chunk: big enough for full-speed GEMMs, small next to activations
    return max(256, (1 << 27) // vocab_size)


def _ce_chunk(logits, targets, ignore_index: int, want_grad: bool):
    # logits (n, V) in the compute dtype, targets (n,) -> (summed loss, d loss / d logits or None)
    lf = logits.double() if logits.dtype == torch.float64 else logits.float()
    valid = targets != ignore_index
    tsafe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(lf, dim=-1)                                   # (n,)
    loss = ((lse - lf.gather(1, tsafe[:, None]).squeeze(1)) * valid).sum()
    if not want_grad:
        return loss, None
    p = torch.exp(lf - lse[:, None])                                    # softmax
    p = p.scatter_add(1, tsafe[:, None], -torch.ones_like(lse)[:, None])  # - onehot
    return loss, (p * valid[:, None]).to(logits.dtype)


@functools.cache
def _compiled_ce_chunk():
    # on CUDA the per-chunk softmax/grad is memory-bound: one fused Triton kernel instead of a pass per op
    return torch.compile(_ce_chunk, dynamic=False)


def _run_chunk(logits, targets, ignore_index, want_grad):
    if logits.is_cuda:
        try:
            return _compiled_ce_chunk()(logits, targets, ignore_index, want_grad)
        except Exception as e:  # no working inductor here: eager is correct, only slower
            warnings.warn(f"compiled cross-entropy chunk failed ({type(e).__name__}: {e}); using eager")
            _compiled_ce_chunk.cache_clear()
    return _ce_chunk(logits, targets, ignore_index, want_grad)


@functools.cache
def _gemm_out_dtype_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """cuBLAS writes fp32 straight from a bf16/fp16 GEMM (torch.mm/addmm out_dtype, CUDA only)."""
    try:
        a = torch.ones(2, 2, device=device, dtype=dtype)
        return torch.addmm(torch.zeros(2, 2, device=device), a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def _wgrad_acc(grad_w, g, hc, acc):
    # grad_w (V, C) in acc dtype or None, plus g (n, V)^T @ hc (n, C). On CUDA the GEMM accumulates
    # into the fp32 sum itself: a bf16 product cast up and then added would take extra passes over
    # the (V, C) fp32 gradient for every chunk
    if g.is_cuda and g.dtype != acc and _gemm_out_dtype_ok(g.device, g.dtype):
        if grad_w is None:
            return torch.mm(g.t(), hc, out_dtype=acc)
        return torch.addmm(grad_w, g.t(), hc, out_dtype=acc)
    gw = (g.t() @ hc).to(acc)
    return gw if grad_w is None else grad_w + gw


def _none(like: torch.Tensor) -> torch.Tensor:
    # custom ops cannot return None: a gradient not asked for is an empty tensor
    return like.new_empty((0,))


def _acc_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


@torch.library.custom_op("gpt_engine::linear_cross_entropy", mutates_args=())
def _linear_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int, ignore_index: int,
               want_h: bool, want_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h (N, C), weight (V, C) (used in h's dtype), targets (N,) int64 -> summed loss over targets !=
    ignore_index (fp32, fp64 for fp64 h), d loss / d h (N, C) in h's dtype, d loss / d weight (V, C) in the
    loss's dtype; a gradient not wanted is empty (0,)."""
    acc, w = _acc_dtype(h), weight.to(h.dtype)
    losses, grad_hs, grad_w = [], [], None
    for s in range(0, h.shape[0], chunk_size):
        hc, tc = h[s:s + chunk_size], targets[s:s + chunk_size]
        chunk_loss, g = _run_chunk(hc @ w.t(), tc, ignore_index, want_h or want_w)  # logits (n, V)
        losses.append(chunk_loss.to(acc))
        if want_h:
            grad_hs.append(g @ w)
        if want_w:
            grad_w = _wgrad_acc(grad_w, g, hc, acc)
    loss = torch.stack(losses).sum() if losses else h.new_zeros((), dtype=acc)
    grad_h = _none(h)
    if want_h:
        grad_h = torch.cat(grad_hs) if grad_hs else torch.zeros_like(h)
    if not want_w:
        grad_w = _none(h)
    elif grad_w is None:  # no tokens
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device)
    return loss, grad_h, grad_w


@_linear_ce.register_fake
def _(h, weight, targets, chunk_size, ignore_index, want_h, want_w):
    acc = _acc_dtype(h)
    return (h.new_empty((), dtype=acc), h.new_empty(h.shape) if want_h else _none(h),
            h.new_empty(weight.shape, dtype=acc) if want_w else _none(h))


def _linear_ce_setup(ctx, inputs, output):
    ctx.weight_dtype = inputs[1].dtype
    ctx.save_for_backward(output[1], output[2])


def _linear_ce_grad(ctx, grad_out, _dgrad_h, _dgrad_w):
    # forward already computed the gradients: backward only scales them
    grad_h, grad_w = ctx.saved_tensors
    dh = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
    dw = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
    return dh, dw, None, None, None, None, None


_linear_ce.register_autograd(_linear_ce_grad, setup_context=_linear_ce_setup)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """sum over tokens of cross_entropy(h @ weight.T, targets), ignoring targets == ignore_index.

    h (..., C), weight (V, C), targets (...) int64. Returns a scalar fp32 sum; divide by
    the number of counted tokens for the mean (done by the caller, which knows the global count).
    """
    if h.shape[:-1] != targets.shape:
        raise ValueError(f"h {tuple(h.shape)} and targets {tuple(targets.shape)} disagree")
    if weight.shape[1] != h.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {h.shape[-1]}")
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    dev = h.device.type
    if torch.is_autocast_enabled(dev) and h.dtype != torch.float64:
        # a compiled graph runs the op without autocast: cast here as autocast casts a GEMM's input, so
        # eager and compiled compute alike
        h2 = h2.to(torch.get_autocast_dtype(dev))
    grad = torch.is_grad_enabled()
    return _linear_ce(h2, weight, t2, chunk_size or default_chunk_size(weight.shape[0]), ignore_index,
                      grad and h.requires_grad, grad and weight.requires_grad)[0]
