"""Argument checks shared by the public ops: wrong input raises ValueError/TypeError naming it.

Index values (block tables, slots, sequence offsets) are checked against the cache by the C++ CPU
kernels always (csrc/bindings.cpp), and on the other paths (Triton, torch) only with
GPT_ENGINE_DEBUG_CHECKS=1 (read at each call): reading them costs a device sync, and on CUDA a bad
index is silent memory corruption. The rules below are the bindings', rule for rule.
"""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name, x, ndim=None, dtypes=FLOAT_DTYPES):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of {', '.join(map(str, dtypes))}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def same(ref_name, ref, **others):
    """Every tensor in `others` shares ref's device and dtype."""
    for name, x in others.items():
        if x is None:
            continue
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
        if x.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}")


def int_tensor(name, x, ndim, device):
    tensor(name, x, ndim, dtypes=(torch.int32,))
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")
    return x


def window(window_size):
    """window_size (left, right): a pair of ints >= -1 (-1: unbounded on that side) -> (left, right)."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got {window_size!r}")
    return left, right


def band(window_size, causal):
    """The keys query i sees, as offsets from its diagonal i + Sk - Sq: (left, right), -1 unbounded.
    Causal is the band's right edge at 0, whatever window_size says on the right (FlashAttention's rule)."""
    left, right = window(window_size)
    return left, 0 if causal else right


# ---- index values (debug mode): the rules of csrc/bindings.cpp's CPU entry points

def debug_checks() -> bool:
    """GPT_ENGINE_DEBUG_CHECKS=1: the public ops check index values on the paths without the C++ checks."""
    return os.environ.get("GPT_ENGINE_DEBUG_CHECKS") == "1"


def _host(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        # a capture cannot sync; the runner then decodes eagerly, where every call is checked
        raise RuntimeError("GPT_ENGINE_DEBUG_CHECKS=1 reads indices on the host, which a CUDA graph capture "
                           "cannot do")
    return x.detach().to("cpu", torch.int64)


def _in_range(name, x, lo, hi, why=""):
    """Every entry of x (1-D, on the host) in [lo, hi]."""
    bad = ((x < lo) | (x > hi)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{name}[{i}] = {int(x[i])} is outside [{lo}, {hi}]{why}")


def _table_rows(table, lens, num_blocks, block_size):
    """The blocks holding the first lens[b] tokens of each row b are blocks of the cache; entries
    past them are padding, never read."""
    used = torch.arange(table.shape[1])[None, :] < ((lens + block_size - 1) // block_size)[:, None]
    bad = (used & ((table < 0) | (table >= num_blocks))).nonzero()
    if len(bad):
        b, j = bad[0].tolist()
        raise ValueError(f"block_table[{b}, {j}] = {int(table[b, j])} is outside [0, {num_blocks - 1}] "
                         f"(the cache's blocks)")


def paged_indices(block_table, seq_lens, k_cache):
    """paged_attention: seq_lens[b] in [1, max_blocks * block_size], and the blocks they cover exist."""
    table, lens = _host(block_table), _host(seq_lens)
    num_blocks, bs = k_cache.shape[:2]
    _in_range("seq_lens", lens, 1, table.shape[1] * bs, f" (block_table's {table.shape[1]} entries x "
              f"block size {bs})")
    _table_rows(table, lens, num_blocks, bs)


def slot_indices(slot_mapping, k_cache):
    """store_kvcache: each slot in [-1, num_blocks * block_size) (-1 skips a token)."""
    _in_range("slot_mapping", _host(slot_mapping), -1, k_cache.shape[0] * k_cache.shape[1] - 1,
              " (-1 skips a token)")


def _offsets(name, cu, rows, of):
    """cu (B + 1) rises from 0, within rows (None: unbounded)."""
    lo = torch.cat([cu.new_zeros(1), cu[:-1]])  # entry i lies at or past entry i - 1 (0 for the first)
    bad = cu < lo
    if rows is not None:
        bad |= cu > rows
    bad = bad.nonzero()
    if len(bad):
        i = int(bad[0])
        where = (f"[{int(lo[i])}, {rows}] (offsets rise from 0 within {of}'s {rows} rows)" if rows is not None
                 else f"[{int(lo[i])}, ...) (offsets rise from 0)")
        raise ValueError(f"{name}[{i}] = {int(cu[i])} is outside {where}")


def varlen_indices(cu_seqlens_q, cu_seqlens_k, q, k, block_table=None):
    """flash_attention_varlen: the offsets rise from 0 within q's rows (and k's when packed); with
    block_table, sequence b's cu_seqlens_k[b + 1] - cu_seqlens_k[b] cached keys fit its table row
    and the blocks they cover exist."""
    cq, ck = _host(cu_seqlens_q), _host(cu_seqlens_k)
    if len(cq) < 2:  # no sequence, nothing read
        return
    _offsets("cu_seqlens_q", cq, q.shape[0], "q")
    _offsets("cu_seqlens_k", ck, None if block_table is not None else k.shape[0], "k")
    if block_table is None:
        return
    table, lens = _host(block_table), ck[1:] - ck[:-1]
    num_blocks, bs = k.shape[:2]
    cap = table.shape[1] * bs
    bad = (lens > cap).nonzero()
    if len(bad):
        b = int(bad[0])
        raise ValueError(f"cu_seqlens_k gives sequence {b} {int(lens[b])} cached keys, outside [0, {cap}] "
                         f"(block_table's {table.shape[1]} entries x block size {bs})")
    _table_rows(table, lens, num_blocks, bs)
