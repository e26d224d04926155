"""GPT_ENGINE_DEBUG_CHECKS=1: the ops that take block tables, slots or sequence offsets check their
values against the cache on the paths without the C++ kernel's own checks (Triton, torch), by the
C++ kernels' rules (csrc/checks.cpp, which both paths run); unset, no check runs.

fp32 CPU tensors under TRITON_INTERPRET=1 take the Triton path, float64 the torch path. The bad-input
tests replace every kernel behind the check with one that fails the test, so no bad index reaches a
kernel, and a missing check shows as that failure rather than as a wild read.
"""
from __future__ import annotations

import os

import pytest
import torch

from gpt_engine.kernels import _checks, attention, paged
from gpt_engine.kernels import reference as R

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest without a GPU
DTYPES = [pytest.param(torch.float32, id="triton"), pytest.param(torch.float64, id="torch")]

BS, HKV, H, D = 16, 1, 2, 32
NUM_BLOCKS = 6
LENS = [5, 20]  # one block, two blocks
# table width 3 holds 48 tokens; entries past a sequence's blocks are padding, any value
TABLE = [[4, -1, 99], [1, 3, -7]]
CHECKS = ("paged_indices", "slot_indices", "varlen_indices")  # in kernels/_checks.py


def _batch(dtype):
    torch.manual_seed(0)
    kc = torch.randn(NUM_BLOCKS, BS, HKV, D, dtype=dtype)
    vc = torch.randn(NUM_BLOCKS, BS, HKV, D, dtype=dtype)
    return kc, vc, _i32(TABLE), _i32(LENS)


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


def _cu(lens):
    return _i32([0, *torch.tensor(lens).cumsum(0).tolist()])


def _decode(dtype, table=None, seq_lens=None):
    kc, vc, t, lens = _batch(dtype)
    q = torch.randn(len(LENS), H, D, dtype=dtype)
    return paged.paged_attention(q, kc, vc, t if table is None else table, lens if seq_lens is None else seq_lens)


def _store(dtype, slots):
    kc, vc, _, _ = _batch(dtype)
    k = torch.randn(len(slots), HKV, D, dtype=dtype)
    paged.store_kvcache(k, k, kc, vc, torch.tensor(slots))
    return kc, k


def _prefill(dtype, table=None, klens=LENS, qlens=(3, 20)):
    kc, vc, t, _ = _batch(dtype)
    q = torch.randn(sum(qlens), H, D, dtype=dtype)
    args = (_cu(qlens), _cu(klens), max(qlens), max(klens))
    return attention.flash_attention_varlen(q, kc, vc, *args, block_table=t if table is None else table)


def _varlen(dtype, rows, cu_q, cu_k, paged=True):
    """flash_attention_varlen on q of rows rows, over the paged caches or packed k/v of rows rows."""
    q = torch.randn(rows, H, D, dtype=dtype)
    k, v = _batch(dtype)[:2] if paged else (q, q)
    table = _i32(TABLE) if paged else None
    return attention.flash_attention_varlen(q, k, v, cu_q, cu_k, 20, 20, block_table=table)


def _bad(b, j, value):
    """TABLE with entry (b, j) set to value."""
    t = _i32(TABLE)
    t[b, j] = value
    return t


def _kernel_reached(*args, **kwargs):
    raise AssertionError("unchecked indices reached the kernel")


@pytest.fixture
def debug(monkeypatch):
    monkeypatch.setenv("GPT_ENGINE_DEBUG_CHECKS", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _stub_kernels(monkeypatch, fn, attention_fwd=None):
    """Every launcher behind the check (Triton and torch) replaced by fn (attention_fwd: Triton's varlen)."""
    from gpt_engine.kernels import triton_attention, triton_paged
    monkeypatch.setattr(triton_paged, "paged_attention_fwd", fn)
    monkeypatch.setattr(triton_paged, "store_kvcache_fwd", fn)
    monkeypatch.setattr(triton_attention, "attention_fwd", attention_fwd or fn)
    monkeypatch.setattr(paged, "_paged_sdpa", fn)
    monkeypatch.setattr(paged.reference, "store_kvcache", fn)
    monkeypatch.setattr(attention, "_varlen_sdpa", fn)


@pytest.fixture
def no_kernels(monkeypatch, debug):
    """Every launcher behind the check fails the test if reached."""
    _stub_kernels(monkeypatch, _kernel_reached)


# (what, call, message): each names the tensor, the bad value and the allowed range
BAD = [
    ("decode block id >= num_blocks", lambda dt: _decode(dt, table=_bad(1, 1, NUM_BLOCKS)),
     r"block_table\[1, 1\] = 6 is outside \[0, 5\]"),
    ("decode negative block id", lambda dt: _decode(dt, table=_bad(0, 0, -1)),
     r"block_table\[0, 0\] = -1 is outside \[0, 5\]"),
    ("decode seq_len beyond the table", lambda dt: _decode(dt, seq_lens=_i32([5, 49])),
     r"seq_lens\[1\] = 49 is outside \[1, 48\]"),
    ("decode seq_len 0", lambda dt: _decode(dt, seq_lens=_i32([0, 20])),
     r"seq_lens\[0\] = 0 is outside \[1, 48\]"),
    # seq_lens [5, 20] reach table[1, 1] but not table[1, 2]: a longer sequence makes the padding a block
    ("decode seq_len reaching a padding entry", lambda dt: _decode(dt, seq_lens=_i32([5, 33])),
     r"block_table\[1, 2\] = -7 is outside \[0, 5\]"),
    ("slot past the cache", lambda dt: _store(dt, [0, NUM_BLOCKS * BS]),
     r"slot_mapping\[1\] = 96 is outside \[-1, 95\]"),
    ("slot below -1", lambda dt: _store(dt, [-2, 3]), r"slot_mapping\[0\] = -2 is outside \[-1, 95\]"),
    ("prefill block id >= num_blocks", lambda dt: _prefill(dt, table=_bad(1, 0, 7)),
     r"block_table\[1, 0\] = 7 is outside \[0, 5\]"),
    ("prefill negative block id", lambda dt: _prefill(dt, table=_bad(1, 1, -3)),
     r"block_table\[1, 1\] = -3 is outside \[0, 5\]"),
    ("prefill cached length beyond the table", lambda dt: _prefill(dt, klens=[5, 49]),
     r"cu_seqlens_k gives sequence 1 49 cached keys, outside \[0, 48\]"),
    ("prefill q offsets past q", lambda dt: _varlen(dt, 10, _cu([3, 20]), _cu(LENS)),
     r"cu_seqlens_q\[2\] = 23 is outside \[3, 10\]"),
    ("prefill k offsets falling", lambda dt: _varlen(dt, 23, _cu([3, 20]), _i32([0, 5, 4])),
     r"cu_seqlens_k\[2\] = 4 is outside \[5, \.\.\.\)"),
    ("packed k offsets past k", lambda dt: _varlen(dt, 24, _cu([4, 20]), _cu([4, 21]), paged=False),
     r"cu_seqlens_k\[2\] = 25 is outside \[4, 24\]"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("what,call,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_indices_raise(what, call, msg, dtype, no_kernels):
    with pytest.raises(ValueError, match=msg):
        call(dtype)


@pytest.fixture
def counted(monkeypatch):
    """The index checks, counted as they run."""
    calls = []

    def counting(name, check):
        def run(*args, **kwargs):
            calls.append(name)
            return check(*args, **kwargs)
        return run

    for name in CHECKS:
        monkeypatch.setattr(_checks, name, counting(name, getattr(_checks, name)))
    return calls


@pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs the interpreter")
@pytest.mark.parametrize("dtype", DTYPES)
def test_valid_indices_pass(dtype, debug, counted):
    # padding table entries hold values no block has, and slot -1 skips a token: all legal
    torch.manual_seed(1)
    kc, vc, table, lens = _batch(dtype)
    q = torch.randn(len(LENS), H, D, dtype=dtype)
    tol = dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(paged.paged_attention(q, kc, vc, table, lens),
                               R.paged_attention(q, kc, vc, table, lens), **tol)

    kc2, k = _store(dtype, [3, -1, 95])
    torch.testing.assert_close(kc2.view(-1, HKV, D)[[3, 95]], k[[0, 2]], atol=0, rtol=0)

    qlens, klens = [3, 20], LENS
    qv = torch.randn(sum(qlens), H, D, dtype=dtype)
    args = (_cu(qlens), _cu(klens), max(qlens), max(klens))
    torch.testing.assert_close(attention.flash_attention_varlen(qv, kc, vc, *args, block_table=table),
                               R.flash_attention_varlen(qv, kc, vc, *args, block_table=table), **tol)
    assert counted == list(CHECKS)


def _check_raises(*args, **kwargs):
    raise AssertionError("the debug check ran")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [None, "0"])
def test_checks_off_unless_asked(dtype, value, monkeypatch):
    # off: no check runs (its sync would cost every decode step); on, the same calls reach it
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for name in CHECKS:
        monkeypatch.setattr(_checks, name, _check_raises)
    # nothing past the check matters here: stand-ins for the kernels keep the test fast
    def done(*args, **kwargs):
        return None

    def attention_fwd(q, *args, **kwargs):  # its (out, lse), for the custom op around it
        return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)

    _stub_kernels(monkeypatch, done, attention_fwd)
    calls = [lambda: _decode(dtype), lambda: _store(dtype, [3, -1]), lambda: _prefill(dtype)]
    if value is None:
        monkeypatch.delenv("GPT_ENGINE_DEBUG_CHECKS", raising=False)
    else:
        monkeypatch.setenv("GPT_ENGINE_DEBUG_CHECKS", value)
    for call in calls:
        call()
    monkeypatch.setenv("GPT_ENGINE_DEBUG_CHECKS", "1")  # read at call time, not at import
    for call in calls:
        with pytest.raises(AssertionError, match="the debug check ran"):
            call()


@pytest.mark.gpu
def test_gpu_bad_indices_raise(monkeypatch):
    monkeypatch.setenv("GPT_ENGINE_DEBUG_CHECKS", "1")
    kc, vc, table, lens = (t.cuda() for t in _batch(torch.float16))
    q = torch.randn(len(LENS), H, D, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(paged.paged_attention(q, kc, vc, table, lens).float(),
                               R.paged_attention(q.float(), kc.float(), vc.float(), table, lens), atol=1e-2, rtol=1e-2)
    bad = table.clone()
    bad[1, 1] = NUM_BLOCKS
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 6"):
        paged.paged_attention(q, kc, vc, bad, lens)
    with pytest.raises(ValueError, match=r"slot_mapping\[0\] = 96"):
        paged.store_kvcache(q[:, :1], q[:, :1], kc, vc, torch.tensor([NUM_BLOCKS * BS, 0], device="cuda"))
