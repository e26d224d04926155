"""CPU tensors on transparent huge pages, for what the engine reads every step.

A CPU decode step streams the whole KV cache in use and every weight from DRAM (together
more than the L3), block by block through a pool the TLB cannot cover in 4 KB pages. torch's allocator asks for huge
pages only under a process-wide environment variable, so the engine maps its own memory and
advises the kernel (MADV_HUGEPAGE; Linux only, elsewhere plain zeros).
"""
from __future__ import annotations

import ctypes
import math
import mmap
from typing import Iterable

import torch

HUGE = 2 << 20  # the x86-64 huge page
_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)


def zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed contiguous CPU tensor, on huge pages where the OS offers them. Its memory is an
    anonymous mapping that lives as long as the tensor (or any view of it), backed from the
    start: left to fault in on first write, the KV cache's untouched blocks would slow every
    prefill that first touches them, and the block manager hands out fresh blocks for many steps
    before it reuses any."""
    nbytes = math.prod(shape) * dtype.itemsize
    if _ADVICE is None or nbytes < HUGE:
        return torch.zeros(shape, dtype=dtype)
    # private anonymous memory (zero-filled; shared would be shmem, which THP skips); the extra
    # huge page leaves room to align the start
    buf = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(_ADVICE)
    except OSError:  # THP off in this kernel: the mapping is still good memory
        pass
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE  # only 2 MB-aligned ranges can be huge pages
    out = raw[start:start + nbytes]
    out[::4096].zero_()  # a write per 4 KB page backs it (a whole huge page at its first)
    return out.view(dtype).view(shape)


def adopt(tensors: Iterable[torch.Tensor]) -> None:
    """Moves the CPU tensors (a module's parameters and buffers, say) into one huge-page arena, in
    place: the same tensor objects, values and shapes, new storage. A tensor given twice (tied
    weights) moves once."""
    unique, seen = [], set()
    for t in tensors:
        if t.device.type == "cpu" and id(t) not in seen:
            seen.add(id(t))
            unique.append(t)
    tensors = unique
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // 64) * 64  # cache-line aligned
    if total < HUGE:
        return
    arena = zeros((total,), torch.uint8)
    with torch.no_grad():
        for t, off in zip(tensors, offsets):
            n = t.numel() * t.element_size()
            new = arena[off:off + n].view(t.dtype).view(t.shape)
            new.copy_(t)
            t.data = new
    _trim()


def _trim() -> None:
    """Hands the heap's free pages back to the OS (glibc): the storages the tensors just left, and
    a checkpoint's float32 copies freed by quantisation, would otherwise stay resident."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
