"""Property-based fuzzing (hypothesis) of every public op of gpt_engine.kernels against kernels.reference.

Each example draws shapes (zero lengths where they mean something, 1, odd sizes, head dims up to
256), layouts (contiguous, strided, padded rows, transposed, expanded), dtypes and the op's own
arguments (windows, block tables with padding, cu_seqlens at the edges, int8 packs with odd K), and
sometimes makes one argument wrong. Every call either matches the reference within the kernel
tests' tolerances (no NaN where the reference has none) or, for the wrong argument, raises
ValueError/TypeError naming it.

Profiles (GPT_ENGINE_FUZZ): "bounded", the default that `make test` runs, few examples and
derandomized, so a failure replays as it is; "fuzz" (`make fuzz`), many examples from the seed that
make prints (pytest --hypothesis-seed replays it). No example database; a failure prints its
@reproduce_failure blob. The default CPU paths run here (the C++ kernels and torch); the Triton
kernels, slow under TRITON_INTERPRET=1, get a handful of examples.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt_engine import kernels
from gpt_engine.kernels import reference as R
from gpt_engine.kernels._ext import ext
from gpt_engine.kernels.decode import ACTIVATIONS as DECODE_ACTIVATIONS

from .helpers import layer_weights

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
PROFILES = {
    "bounded": dict(max_examples=40, derandomize=True, deadline=None, database=None, print_blob=True,
                    suppress_health_check=_SLOW_OK),
    "fuzz": dict(max_examples=2000, deadline=None, database=None, print_blob=True, suppress_health_check=_SLOW_OK),
}
_PROFILE = os.environ.get("GPT_ENGINE_FUZZ", "bounded")
if _PROFILE not in PROFILES:
    raise ValueError(f"GPT_ENGINE_FUZZ must be one of {list(PROFILES)}, got {_PROFILE!r}")
FUZZ = settings(**PROFILES[_PROFILE])
FEW = settings(FUZZ, max_examples=max(FUZZ.max_examples // 4, 3))  # the slower ops (a whole decode layer)
TRITON = settings(FUZZ, max_examples=max(FUZZ.max_examples // 5, 2))  # the Triton interpreter

pytestmark = pytest.mark.usefixtures("torch_path")  # the default CPU paths; Triton only where a test asks
# Triton on CPU tensors needs the interpreter, which conftest sets without a GPU
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

FLOATS = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
HEAD_DIMS = st.sampled_from([8, 16, 24, 40, 64, 80, 112, 256])
WINDOW_SIDE = st.sampled_from([-1, -1, 0, 1, 2, 5])
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # the kernel tests' small atol on top of 2x torch's error
LAYOUTS = ("contiguous", "strided", "padded", "transposed", "expanded")


def _gen(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))


def _tensor(draw, g, shape, dtype=torch.float32, layouts=LAYOUTS, scale=1.0):
    """randn(shape) * scale in dtype, laid out as one of layouts (expanded repeats one dim's values)."""
    how = draw(st.sampled_from(layouts)) if shape else "contiguous"
    *lead, last = shape if shape else (1,)

    def rand(*s):
        return (torch.randn(*s, generator=g) * scale).to(dtype)
    if how == "strided":  # every other element of the last dim
        return rand(*lead, 2 * last)[..., ::2]
    if how == "padded":  # rows of a wider buffer, each row dense
        return rand(*lead, last + 3)[..., :last]
    if how == "transposed":
        return rand(*reversed(shape)).permute(*reversed(range(len(shape))))
    if how == "expanded":
        d = draw(st.integers(0, len(shape) - 1))
        return rand(*shape[:d], 1, *shape[d + 1:]).expand(shape)
    return rand(*shape)


def _dense_rows(draw, g, shape, dtype=torch.float32):
    """(N, heads, D) whose rows are dense as the C++ kernels take them: contiguous, or heads split from a
    fused (N, heads', D) projection (rows strided)."""
    n, h, d = shape
    if not draw(st.booleans()):
        return torch.randn(*shape, generator=g).to(dtype)
    extra = draw(st.integers(1, 3))
    first = draw(st.integers(0, extra))
    return torch.randn(n, h + extra, d, generator=g).to(dtype)[:, first:first + h]


def assert_matches(got, want, atol, rtol=None):
    """got == want (same shape and dtype) within atol/rtol, and no NaN where want has none."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    assert not (got.isnan() & ~want.isnan()).any(), "NaN where the reference has none"
    torch.testing.assert_close(got, want, atol=atol, rtol=atol if rtol is None else rtol, equal_nan=True)


def assert_within(got, ref32, lowp, atol):
    """Low precision: |got - ref32| <= 2 |lowp - ref32| + atol (max over elements), lowp the same math
    in plain torch at got's precision (the kernel tests' rule)."""
    assert got.shape == ref32.shape and got.dtype == lowp.dtype, (got.shape, got.dtype, ref32.shape)
    assert not (got.isnan() & ~ref32.isnan()).any(), "NaN where the reference has none"
    if got.numel():
        err = (got.float() - ref32.float()).abs().max().item()
        base = (lowp.float() - ref32.float()).abs().max().item()
        assert err <= 2 * base + atol, f"kernel err {err:.3g} vs torch {base:.3g}"


def raises_naming(call, exc, name):
    """call() raises exc (ValueError or TypeError) whose message names the argument."""
    with pytest.raises(exc) as e:
        call()
    assert name in str(e.value), f"{exc.__name__} does not name {name!r}: {e.value}"


def _with_debug(call):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT_ENGINE_DEBUG_CHECKS", "1")
        return call()


# ---- attention

def _lowp_attend(q, k, v, causal, scale, window):
    """flash_attention's math in plain torch at q's own precision, per batch row (the low-precision yardstick)."""
    return torch.stack([R._attend(q[b], k[b], v[b], causal, scale, window) for b in range(q.shape[0])])


def _attention_case(draw, g, dtype):
    B, sq, sk = draw(st.integers(1, 2)), draw(st.integers(0, 12)), draw(st.integers(0, 12))
    hkv, rep, d = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3])), draw(HEAD_DIMS)
    q, k, v = (_tensor(draw, g, (B, s, h, d), dtype) for s, h in ((sq, hkv * rep), (sk, hkv), (sk, hkv)))
    scale = draw(st.none() | st.floats(0.05, 1.0))
    return q, k, v, draw(st.booleans()), scale, (draw(WINDOW_SIDE), draw(WINDOW_SIDE))


def _check_attention(q, k, v, causal, scale, window):
    got = kernels.flash_attention(q, k, v, causal, scale, window)
    ref = R.flash_attention(q.float(), k.float(), v.float(), causal, scale, window)
    if q.dtype == torch.float32:
        assert_matches(got, ref, 2e-4)
    else:
        s = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
        assert_within(got, ref, _lowp_attend(q, k, v, causal, s, window), ATOL[q.dtype])


@FUZZ
@given(st.data())
def test_flash_attention(data):
    draw = data.draw
    g = _gen(draw)
    q, k, v, causal, scale, window = _attention_case(draw, g, draw(FLOATS))
    bad = draw(st.sampled_from([None] * 6 + ["head_dim", "k_dtype", "heads", "window", "q_dims", "batch"]))
    if bad is None:
        return _check_attention(q, k, v, causal, scale, window)
    call = {
        "head_dim": lambda: kernels.flash_attention(q[..., :4], k[..., :4], v[..., :4], causal, scale, window),
        "k_dtype": lambda: kernels.flash_attention(q, k.double(), v, causal, scale, window),
        "heads": lambda: kernels.flash_attention(q, *(t[:, :, :1].expand(-1, -1, q.shape[2] + 1, -1) for t in (k, v)),
                                                 causal, scale, window),
        "window": lambda: kernels.flash_attention(q, k, v, causal, scale, (-2, window[1])),
        "q_dims": lambda: kernels.flash_attention(q[0], k, v, causal, scale, window),
        "batch": lambda: kernels.flash_attention(q, torch.cat([k, k]), torch.cat([v, v]), causal, scale, window),
    }[bad]
    exc, name = {"head_dim": (ValueError, "head dim"), "k_dtype": (TypeError, "k"), "heads": (ValueError, "heads"),
                 "window": (ValueError, "window_size"), "q_dims": (ValueError, "q"),
                 "batch": (ValueError, "batch")}[bad]
    raises_naming(call, exc, name)


@interpreted
@TRITON
@given(st.data())
def test_flash_attention_triton(data):
    """The Triton kernel under the interpreter: fp32 and fp16 (the interpreter's bf16 dot is broken)."""
    draw = data.draw
    g = _gen(draw)
    case = _attention_case(draw, g, draw(st.sampled_from([torch.float32, torch.float16])))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        _check_attention(*case)


def _cache_table(draw, g, lens, hkv, d, dtype):
    """Paged caches holding sequences of lens tokens in scattered blocks, and their table padded with
    arbitrary entries (never read) -> k_cache, v_cache, block_table."""
    bs = draw(st.sampled_from([1, 2, 5, 16]))
    nblk = [-(-n // bs) for n in lens]
    width = max(nblk + [0]) + draw(st.integers(0, 2))
    total = sum(nblk) + draw(st.integers(1, 3))
    caches = [_tensor(draw, g, (total, bs, hkv, d), dtype, ("contiguous", "contiguous", "strided")) for _ in "kv"]
    perm = torch.randperm(total, generator=g).to(torch.int32)
    table = torch.randint(-9, 10 * total, (len(lens), width), generator=g, dtype=torch.int32)  # padding
    i = 0
    for b, n in enumerate(nblk):
        table[b, :n] = perm[i:i + n]
        i += n
    return caches[0], caches[1], table


def _cu(lens, rows_before):
    """Offsets of sequences of lens rows starting rows_before rows in -> int32 (B + 1)."""
    return torch.tensor([rows_before + sum(lens[:i]) for i in range(len(lens) + 1)], dtype=torch.int32)


@FUZZ
@given(st.data())
def test_flash_attention_varlen(data):
    draw = data.draw
    g = _gen(draw)
    dtype = draw(FLOATS)
    B, hkv, rep, d = draw(st.integers(0, 3)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4])), draw(HEAD_DIMS)
    lq = draw(st.lists(st.integers(0, 9), min_size=B, max_size=B))
    lk = draw(st.lists(st.integers(0, 20), min_size=B, max_size=B))
    skip_q, skip_k, extra = draw(st.integers(0, 2)), draw(st.integers(0, 2)), draw(st.integers(0, 2))
    q = (_dense_rows if draw(st.booleans()) else _tensor)(draw, g, (skip_q + sum(lq) + extra, hkv * rep, d), dtype)
    paged = draw(st.booleans())
    if paged:
        k, v, table = _cache_table(draw, g, lk, hkv, d, dtype)
        skip_k = 0
    else:
        k, v = (_dense_rows if draw(st.booleans()) else _tensor)(draw, g, (skip_k + sum(lk) + extra, hkv, d), dtype), \
            _tensor(draw, g, (skip_k + sum(lk) + extra, hkv, d), dtype)
        table = None
    cu_q, cu_k = _cu(lq, skip_q), _cu(lk, skip_k)
    causal, scale = draw(st.booleans()), draw(st.none() | st.floats(0.05, 1.0))
    window = (draw(WINDOW_SIDE), draw(WINDOW_SIDE))
    mq, mk = max(lq + [0]), max(lk + [0])

    def run(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, table=table, window=window):
        return kernels.flash_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal, scale, table, window)
    bad = draw(st.sampled_from([None] * 6 + ["cu_dtype", "cu_len", "window"]
                               + (["cu_q_falls", "cu_k_past"] if B else [])
                               + (["table_entry", "table_rows"] if paged and B and sum(lk) else [])))
    if bad is None:
        got = run()
        ref = R.flash_attention_varlen(q.float(), k.float(), v.float(), cu_q, cu_k, mq, mk, causal, scale, table,
                                       window)
        rows = slice(skip_q, skip_q + sum(lq))  # rows outside every sequence are no output
        if dtype == torch.float32:
            return assert_matches(got[rows], ref[rows], 2e-4)
        s = scale if scale is not None else 1 / math.sqrt(d)
        low = torch.zeros_like(q)
        for b in range(B):
            kb, vb = (k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]]) if table is None else \
                (R.gather_paged(k, table[b], lk[b]), R.gather_paged(v, table[b], lk[b]))
            low[cu_q[b]:cu_q[b + 1]] = R._attend(q[cu_q[b]:cu_q[b + 1]], kb, vb, causal, s, window)
        return assert_within(got[rows], ref[rows], low[rows], ATOL[dtype])
    if bad == "cu_dtype":
        return raises_naming(lambda: run(cu_q=cu_q.long()), TypeError, "cu_seqlens_q")
    if bad == "cu_len":
        return raises_naming(lambda: run(cu_k=torch.cat([cu_k, cu_k[-1:]])), ValueError, "cu_seqlens")
    if bad == "window":
        return raises_naming(lambda: run(window=(window[0], -3)), ValueError, "window_size")
    if bad == "cu_q_falls":  # an offset below the one before it, or below 0
        cu = cu_q.clone()
        cu[-1] = cu[-2] - 1
        return raises_naming(lambda: _with_debug(lambda: run(cu_q=cu)), ValueError, "cu_seqlens_q")
    if bad == "cu_k_past":  # packed keys past k's rows; a paged sequence longer than its table row
        cu = cu_k.clone()
        cu[-1] = (k.shape[0] if table is None else cu[-2] + table.shape[1] * k.shape[1]) + 1
        return raises_naming(lambda: _with_debug(lambda: run(cu_k=cu)), ValueError, "cu_seqlens_k")
    if bad == "table_rows":
        return raises_naming(lambda: run(table=table[:-1]), ValueError, "block_table")
    b = next(i for i, n in enumerate(lk) if n)  # a used entry outside the cache
    bad_table = table.clone()
    bad_table[b, 0] = draw(st.sampled_from([-1, k.shape[0], 2 ** 31 - 1]))
    raises_naming(lambda: _with_debug(lambda: run(table=bad_table)), ValueError, "block_table")


def _paged_case(draw, g, dtype):
    B, hkv, rep, d = draw(st.integers(0, 4)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4])), draw(HEAD_DIMS)
    lens = draw(st.lists(st.integers(1, 40), min_size=B, max_size=B))
    kc, vc, table = _cache_table(draw, g, lens, hkv, d, dtype)
    q = _tensor(draw, g, (B, hkv * rep, d), dtype)
    return q, kc, vc, table, torch.tensor(lens, dtype=torch.int32).reshape(B)


def _check_paged(q, kc, vc, table, seq_lens, scale, window):
    got = kernels.paged_attention(q, kc, vc, table, seq_lens, scale, window)
    if q.shape[0] == 0:
        assert got.shape == q.shape and got.dtype == q.dtype
        return
    ref = R.paged_attention(q.float(), kc.float(), vc.float(), table, seq_lens, scale, window)
    if q.dtype in (torch.float32, torch.float64):
        return assert_matches(got.float(), ref, 2e-4)
    s = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    low = torch.stack([R._attend(q[b:b + 1], R.gather_paged(kc, table[b], n), R.gather_paged(vc, table[b], n), False,
                                 s, window)[0] for b, n in enumerate(seq_lens.tolist())])
    assert_within(got, ref, low, ATOL[q.dtype])


@FUZZ
@given(st.data())
def test_paged_attention(data):
    draw = data.draw
    g = _gen(draw)
    q, kc, vc, table, seq_lens = _paged_case(draw, g, draw(st.sampled_from([torch.float32, torch.float16,
                                                                             torch.bfloat16, torch.float64])))
    scale, window = draw(st.none() | st.floats(0.05, 1.0)), (draw(WINDOW_SIDE), draw(WINDOW_SIDE))
    B = q.shape[0]
    bad = draw(st.sampled_from([None] * 6 + ["lens_dtype", "lens_rows", "window"]
                               + (["lens_zero", "lens_past", "table_entry"] if B else [])))

    def run(table=table, seq_lens=seq_lens, window=window):
        return kernels.paged_attention(q, kc, vc, table, seq_lens, scale, window)
    if bad is None:
        return _check_paged(q, kc, vc, table, seq_lens, scale, window)
    if bad == "lens_dtype":
        return raises_naming(lambda: run(seq_lens=seq_lens.long()), TypeError, "seq_lens")
    if bad == "lens_rows":
        more = torch.cat([seq_lens, torch.ones(1, dtype=torch.int32)])
        return raises_naming(lambda: run(seq_lens=more), ValueError, "seq_lens")
    if bad == "window":
        return raises_naming(lambda: run(window=(-5, window[1])), ValueError, "window_size")
    b = draw(st.integers(0, B - 1))
    if bad in ("lens_zero", "lens_past"):
        lens = seq_lens.clone()
        lens[b] = 0 if bad == "lens_zero" else table.shape[1] * kc.shape[1] + 1
        return raises_naming(lambda: _with_debug(lambda: run(seq_lens=lens)), ValueError, "seq_lens")
    bad_table = table.clone()
    bad_table[b, draw(st.integers(0, (int(seq_lens[b]) - 1) // kc.shape[1]))] = draw(st.sampled_from([-1, kc.shape[0]]))
    raises_naming(lambda: _with_debug(lambda: run(table=bad_table)), ValueError, "block_table")


@interpreted
@TRITON
@given(st.data())
def test_paged_attention_triton(data):
    draw = data.draw
    g = _gen(draw)
    case = _paged_case(draw, g, draw(st.sampled_from([torch.float32, torch.float16])))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        _check_paged(*case, None, (draw(WINDOW_SIDE), -1))


@FUZZ
@given(st.data())
def test_store_kvcache(data):
    draw = data.draw
    g = _gen(draw)
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    n, hkv, d, nb, bs = (draw(st.integers(0, 6)), draw(st.integers(1, 3)), draw(HEAD_DIMS), draw(st.integers(1, 4)),
                         draw(st.sampled_from([1, 3, 16])))
    k, v = (_tensor(draw, g, (n, hkv, d), dtype) for _ in "kv")
    kc, vc = (torch.randn(nb, bs, hkv, d, generator=g).to(dtype) for _ in "kv")
    slots = torch.randperm(nb * bs, generator=g)[:n]
    slots = torch.where(torch.rand(slots.shape, generator=g) < 0.2, -1, slots)  # -1 skips a token
    slots = torch.cat([slots, -torch.ones(n - slots.shape[0], dtype=torch.long)])
    bad = draw(st.sampled_from([None] * 6 + ["slots_dtype", "slots_len", "cache_dtype"] + (["slot_past"] if n else [])))
    if bad is None:
        kc2, vc2 = kc.clone(), vc.clone()
        kernels.store_kvcache(k, v, kc, vc, slots)
        R.store_kvcache(k, v, kc2, vc2, slots)
        assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
        return
    if bad == "slots_dtype":
        return raises_naming(lambda: kernels.store_kvcache(k, v, kc, vc, slots.int()), TypeError, "slot_mapping")
    if bad == "slots_len":
        return raises_naming(lambda: kernels.store_kvcache(k, v, kc, vc, torch.cat([slots, torch.tensor([-1])])),
                             ValueError, "slot_mapping")
    if bad == "cache_dtype":
        other = torch.float32 if dtype != torch.float32 else torch.float16
        return raises_naming(lambda: kernels.store_kvcache(k, v, kc.to(other), vc, slots), TypeError, "k_cache")
    s = slots.clone()
    s[draw(st.integers(0, n - 1))] = draw(st.sampled_from([nb * bs, -2]))
    raises_naming(lambda: _with_debug(lambda: kernels.store_kvcache(k, v, kc, vc, s)), ValueError, "slot_mapping")


# ---- norms and GEMMs

def _lead(draw):
    """Leading dims of an activation: none, rows (0 included), or batch x time."""
    return tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=2)))


@FUZZ
@given(st.data())
def test_norms(data):
    draw = data.draw
    g = _gen(draw)
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    rms, n = draw(st.booleans()), draw(st.sampled_from([1, 2, 7, 8, 33, 64, 100, 257, 1024]))
    shape = _lead(draw) + (n,)
    x = _tensor(draw, g, shape, dtype, scale=draw(st.sampled_from([1.0, 30.0])))
    w_dtype = draw(st.sampled_from([dtype, torch.float32]))
    w = 1 + 0.3 * _tensor(draw, g, (n,), w_dtype)
    b = None if rms or draw(st.booleans()) else _tensor(draw, g, (n,), w_dtype)
    r = _tensor(draw, g, shape, dtype) if draw(st.booleans()) else None
    eps = draw(st.sampled_from([1e-6, 1e-5, 1e-2]))

    def run(x=x, w=w, b=b, r=r, eps=eps):
        return kernels.rms_norm(x, w, eps, r) if rms else kernels.layer_norm(x, w, b, eps, r)
    bad = draw(st.sampled_from([None] * 6 + ["weight_len", "residual_shape", "x_dtype", "eps"]
                               + ([] if rms else ["bias_len"])))
    if bad is not None:
        call = {"weight_len": lambda: run(w=torch.cat([w, w[:1]])), "x_dtype": lambda: run(x=x.to(torch.int32)),
                "residual_shape": lambda: run(r=torch.zeros(*shape[:-1], n + 1, dtype=dtype)),
                "eps": lambda: run(eps=-1e-5), "bias_len": lambda: run(b=torch.zeros(n + 1, dtype=dtype))}[bad]
        exc, name = {"weight_len": (ValueError, "weight"), "x_dtype": (TypeError, "x"),
                     "residual_shape": (ValueError, "residual"), "eps": (ValueError, "eps"),
                     "bias_len": (ValueError, "bias")}[bad]
        return raises_naming(call, exc, name)
    with torch.no_grad():
        got = run()
    up = (lambda t: None if t is None else t.double()) if dtype == torch.float64 else \
        (lambda t: None if t is None else t.float())
    ref = R.rms_norm(up(x), up(w), eps, up(r)) if rms else R.layer_norm(up(x), up(w), up(b), eps, up(r))
    got, ref = (got, ref) if r is not None else ((got,), (ref,))
    for gt, rf in zip(got, ref):
        if dtype in (torch.float32, torch.float64):
            assert_matches(gt, rf.to(dtype), 2e-5, 1e-5)
        else:
            fn = torch.nn.functional
            h = x if r is None else x + r
            low = fn.rms_norm(h, (n,), w.to(dtype), eps) if rms else \
                fn.layer_norm(h, (n,), w.to(dtype), None if b is None else b.to(dtype), eps)
            assert_within(gt, rf, low if gt is got[0] else h, ATOL[dtype])


ACTS = st.sampled_from([None, "gelu", "gelu_tanh", "relu"])


@FUZZ
@given(st.data())
def test_linear(data):
    draw = data.draw
    g = _gen(draw)
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    k, n = draw(st.sampled_from([0, 1, 3, 8, 17, 64, 95, 200])), draw(st.sampled_from([0, 1, 5, 24, 49, 130]))
    lead = _lead(draw)
    x = _tensor(draw, g, lead + (k,), dtype)
    w = _tensor(draw, g, (n, k), dtype, scale=0.3)
    b = _tensor(draw, g, (n,), dtype) if draw(st.booleans()) else None
    act, backend = draw(ACTS), draw(st.sampled_from(["auto", "custom"]))

    def run(x=x, w=w, b=b, act=act):
        return kernels.linear(x, w, b, act, backend=backend)
    bad = draw(st.sampled_from([None] * 6 + ["in_features", "bias_len", "activation", "x_dtype", "w_dtype"]))
    if bad is not None:
        call = {"in_features": lambda: run(w=torch.zeros(n, k + 1, dtype=dtype)),
                "bias_len": lambda: run(b=torch.zeros(n + 1, dtype=dtype)), "activation": lambda: run(act="tanh"),
                "x_dtype": lambda: run(x=x.to(torch.int64)),
                "w_dtype": lambda: run(w=w.to(torch.float32 if dtype != torch.float32 else torch.float64))}[bad]
        exc, name = {"in_features": (ValueError, "weight"), "bias_len": (ValueError, "bias"),
                     "activation": (ValueError, "activation"), "x_dtype": (TypeError, "x"),
                     "w_dtype": (TypeError, "weight")}[bad]
        return raises_naming(call, exc, name)
    with torch.no_grad():
        got = run()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ref = R.linear(x.to(acc), w.to(acc), None if b is None else b.to(acc), act)
    tol = 1e-5 * (1 + math.sqrt(k))
    if dtype in (torch.float32, torch.float64):
        return assert_matches(got, ref.to(dtype), tol)
    low = R.ACTIVATIONS[act](torch.nn.functional.linear(x, w, b))
    assert_within(got, ref, low, ATOL[dtype])


# ---- int8 weights and the packed CPU GEMM

def _quant_case(draw, g, k_step=1):
    n, k = draw(st.sampled_from([1, 3, 24, 49])), k_step * draw(st.sampled_from([1, 2, 3, 5, 7]))
    if k_step == 1:
        k = draw(st.sampled_from([1, 5, 7, 33, 96, 130]))
    groups = [d for d in range(k_step, k + 1, k_step) if k % d == 0]
    group = draw(st.sampled_from(groups))
    w = _tensor(draw, g, (n, k), draw(FLOATS), scale=0.3)
    if draw(st.booleans()) and n * k:  # a zero group: scale 1
        w = w.clone()
        w[0, :group] = 0
    return w, (None if group == k and draw(st.booleans()) else group)


@FUZZ
@given(st.data())
def test_quantize_int8(data):
    draw = data.draw
    g = _gen(draw)
    w, group = _quant_case(draw, g)
    bad = draw(st.sampled_from([None] * 4 + ["group", "group_zero", "no_k", "w_dtype"]))
    if bad is not None:
        call = {"group": lambda: kernels.quantize_int8(w, w.shape[1] + 1),
                "group_zero": lambda: kernels.quantize_int8(w, 0),
                "no_k": lambda: kernels.quantize_int8(w[:, :0]), "w_dtype": lambda: kernels.quantize_int8(w.int())}[bad]
        name = "group_size" if bad.startswith("group") else "weight"
        return raises_naming(call, TypeError if bad == "w_dtype" else ValueError, name)
    qw = kernels.quantize_int8(w, group)
    q, scale = R.quantize_int8(w, group)
    assert torch.equal(qw.q, q) and torch.equal(qw.scale, scale)
    assert torch.equal(kernels.dequantize(qw), R.dequantize_int8(q, scale))
    x = _tensor(draw, g, _lead(draw) + (w.shape[1],), draw(FLOATS))
    b = _tensor(draw, g, (w.shape[0],), x.dtype) if draw(st.booleans()) else None
    act = draw(ACTS)
    with torch.no_grad():
        got = kernels.linear_int8(x, qw, b, act)
    ref = R.linear_int8(x.float(), q, scale, None if b is None else b.float(), act)
    if x.dtype == torch.float32:
        return assert_matches(got, ref, 1e-5 * (1 + math.sqrt(w.shape[1])))
    low = R.ACTIVATIONS[act](torch.nn.functional.linear(x, R.dequantize_int8(q, scale).to(x.dtype), b))
    assert_within(got, ref, low, ATOL[x.dtype])


@FUZZ
@given(st.data())
def test_linear_w8a8(data):
    draw = data.draw
    g = _gen(draw)
    w, group = _quant_case(draw, g, k_step=32)
    qw = kernels.quantize_int8(w, group)
    x = _tensor(draw, g, _lead(draw) + (w.shape[1],), torch.float32, scale=draw(st.sampled_from([1.0, 1e-3])))
    b = _tensor(draw, g, (w.shape[0],)) if draw(st.booleans()) else None
    act = draw(ACTS)
    bad = draw(st.sampled_from([None] * 4 + ["x_dtype", "x_k", "bias_len", "w"]))
    if bad is not None:
        call = {"x_dtype": lambda: kernels.linear_w8a8(x.half(), qw, b, act),
                "x_k": lambda: kernels.linear_w8a8(x[..., :-1], qw, b, act),
                "bias_len": lambda: kernels.linear_w8a8(x, qw, torch.zeros(w.shape[0] + 1), act),
                "w": lambda: kernels.linear_w8a8(x, w, b, act)}[bad]
        exc, name = {"x_dtype": (TypeError, "x"), "x_k": (ValueError, "x"), "bias_len": (ValueError, "bias"),
                     "w": (TypeError, "w")}[bad]
        return raises_naming(call, exc, name)
    got = kernels.linear_w8a8(x, qw, b, act)
    assert_matches(got, R.linear_w8a8(x, qw.q, qw.scale, b, act), 1e-5)


@FUZZ
@given(st.data())
def test_packed(data):
    """pack_linear in every format (fp32, bf16, int8 with odd K, w8a8), packed_linear against the
    reference GEMM, unpack_linear and packed_rows against the weight."""
    draw = data.draw
    g = _gen(draw)
    fmt = draw(st.sampled_from(["float32", "bfloat16", "int8", "w8a8"]))
    w, group = _quant_case(draw, g, k_step=32 if fmt == "w8a8" else 1)
    n, k = w.shape
    weight = w.float() if fmt == "float32" else w.bfloat16() if fmt == "bfloat16" else kernels.quantize_int8(w, group)
    panel = draw(st.sampled_from([0, *ext().linear_panels()]))
    pw = kernels.pack_linear(weight, panel, int8_activations=fmt == "w8a8")
    x = _tensor(draw, g, _lead(draw) + (k,), scale=draw(st.sampled_from([1.0, 1e-3])))
    b = _tensor(draw, g, (n,)) if draw(st.booleans()) else None
    act = draw(ACTS)
    bad = draw(st.sampled_from([None] * 4 + ["x_k", "x_dtype", "bias_len", "ids", "ids_dtype", "panel", "w"]))
    if bad is not None:
        call = {"x_k": lambda: kernels.packed_linear(torch.zeros(2, k + 1), pw, b, act),
                "x_dtype": lambda: kernels.packed_linear(x.double(), pw, b, act),
                "bias_len": lambda: kernels.packed_linear(x, pw, torch.zeros(n + 1), act),
                "ids": lambda: kernels.packed_rows(pw, torch.tensor([0, n])),
                "ids_dtype": lambda: kernels.packed_rows(pw, torch.tensor([0.0])),
                "panel": lambda: kernels.pack_linear(weight, 7),
                "w": lambda: kernels.packed_linear(x, pw.weight, b, act)}[bad]
        exc, name = {"x_k": (ValueError, "x"), "x_dtype": (TypeError, "x"), "bias_len": (ValueError, "bias"),
                     "ids": (ValueError, "ids"), "ids_dtype": (TypeError, "ids"), "panel": (ValueError, "panel"),
                     "w": (TypeError, "w")}[bad]
        return raises_naming(call, exc, name)
    dense = weight.float() if fmt in ("float32", "bfloat16") else kernels.dequantize(weight)
    got = kernels.packed_linear(x, pw, b, act)
    if fmt == "w8a8":
        ref = R.linear_w8a8(x, weight.q, weight.scale, b, act)
    else:
        ref = R.linear(x, dense, b, act)
    assert_matches(got, ref, 1e-5 * (1 + math.sqrt(k)))
    back = kernels.unpack_linear(pw)
    if fmt in ("int8", "w8a8"):
        assert torch.equal(back.q, weight.q) and torch.equal(back.scale, weight.scale)
    else:
        assert torch.equal(back, weight)
    ids = torch.randint(0, n, draw(st.sampled_from([(0,), (3,), (2, 3)])), generator=g)
    ids = ids.to(draw(st.sampled_from([torch.int64, torch.int32])))
    assert torch.equal(kernels.packed_rows(pw, ids), dense[ids.long()])


# ---- the CPU decode ops

@FUZZ
@given(st.data())
def test_rope(data):
    draw = data.draw
    g = _gen(draw)
    h, d = draw(st.integers(1, 5)), draw(st.sampled_from([2, 6, 8, 16, 40, 64, 256]))
    half = draw(st.integers(0, d // 2))
    lead = draw(st.sampled_from([(0,), (1,), (5,), (2, 3)]))
    if len(lead) == 1:  # (N, heads, D), rows dense (split from a fused projection)
        t = _dense_rows(draw, g, (*lead, h, d))
    else:
        t = torch.randn(*lead, h, d, generator=g)
    heads = draw(st.integers(0, h))
    ang = torch.rand(*lead, half, generator=g) * 100
    cos, sin = ang.cos(), ang.sin()
    bad = draw(st.sampled_from([None] * 4 + ["heads", "cos_width", "sin_rows", "t_dtype", "t_layout"]))
    if bad is not None:
        call = {"heads": lambda: kernels.rope_(t, cos, sin, h + 1),
                "cos_width": lambda: kernels.rope_(t, torch.ones(*lead, d // 2 + 1), torch.ones(*lead, d // 2 + 1),
                                                   heads),
                "sin_rows": lambda: kernels.rope_(t, cos, torch.ones(lead[0] + 1, *lead[1:], half), heads),
                "t_dtype": lambda: kernels.rope_(t.double(), cos, sin, heads),
                "t_layout": lambda: kernels.rope_(torch.randn(*lead, h, 2 * d)[..., ::2], cos, sin, heads)}[bad]
        exc, name = {"heads": (ValueError, "heads"), "cos_width": (ValueError, "cos"), "sin_rows": (ValueError, "sin"),
                     "t_dtype": (TypeError, "t"), "t_layout": (ValueError, "t")}[bad]
        return raises_naming(call, exc, name)
    want = R.rope_(t.clone(), cos, sin, heads)
    got = kernels.rope_(t, cos, sin, heads)
    assert got is t
    assert_matches(got, want, 1e-5)


@FUZZ
@given(st.data())
def test_glu(data):
    draw = data.draw
    g = _gen(draw)
    ff = draw(st.sampled_from([0, 1, 3, 8, 9, 100]))
    f = _tensor(draw, g, _lead(draw) + (2 * ff,), scale=draw(st.sampled_from([1.0, 20.0])))
    act = draw(st.sampled_from(["silu", "gelu_tanh"]))
    bad = draw(st.sampled_from([None] * 4 + ["odd", "dtype", "activation"]))
    if bad is not None:
        call = {"odd": lambda: kernels.glu(torch.zeros(2, 2 * ff + 1), act),
                "dtype": lambda: kernels.glu(f.half(), act),
                "activation": lambda: kernels.glu(f, "relu")}[bad]
        exc, name = {"odd": (ValueError, "f"), "dtype": (TypeError, "f"), "activation": (ValueError, "activation")}[bad]
        return raises_naming(call, exc, name)
    assert_matches(kernels.glu(f, act), R.glu(f, act), 1e-5)


@FEW
@given(st.data())
def test_decode_layer(data):
    """One fused CPU decode layer against the per-op reference: every trait (activations, norms, GPT-NeoX
    and GPT-J blocks, q/k norms, partial rotary), GQA, windows, block sizes, a padded row."""
    draw = data.draw
    g = _gen(draw)
    hkv, rep, d = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([8, 24, 64, 256]))
    H = hkv * rep
    C, ff = draw(st.sampled_from([8, 40, 96])), draw(st.sampled_from([1, 7, 64]))
    act = draw(st.sampled_from(DECODE_ACTIVATIONS))
    parallel, rms, bias = draw(st.integers(0, 2)), draw(st.booleans()), draw(st.booleans())
    w = list(layer_weights(C, H, hkv, d, ff, bias, act in ("swiglu", "geglu"), g))
    if parallel == 2:
        w[6] = w[7] = None
    if draw(st.booleans()):
        w += [1 + 0.3 * torch.randn(d, generator=g), 1 + 0.3 * torch.randn(d, generator=g)]
    B = draw(st.integers(1, 3))
    lens = draw(st.lists(st.integers(1, 40), min_size=B, max_size=B))
    kc, vc, table = _cache_table(draw, g, lens, hkv, d, torch.float32)
    kc, vc = kc.contiguous(), vc.contiguous()
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    bs = kc.shape[1]
    slots = torch.tensor([int(table[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(lens)])
    if draw(st.booleans()):
        slots[-1] = -1  # a padded row stores nothing
    x = torch.randn(B, C, generator=g)
    res = torch.randn(B, C, generator=g) if draw(st.booleans()) else None
    rot = draw(st.sampled_from([0, 2, d]))
    cs = None
    if rot:
        ang = (seq_lens.double() - 1)[:, None] * 1e4 ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
        cs = (ang.cos().float(), ang.sin().float())
    window = (draw(WINDOW_SIDE), -1)
    args = (table, seq_lens, cs, H, 1e-5, rms, act, 1 / math.sqrt(d))
    layer = kernels.pack_layer(w)
    if rms and bias:  # the reference's RMSNorm has no bias: a layer holding one is refused
        with torch.no_grad():
            return raises_naming(lambda: kernels.decode_layer(x, res, layer, kc, vc, slots, *args, window, parallel),
                                 ValueError, "bias")
    bad = draw(st.sampled_from([None] * 4 + ["n_head", "x_width", "cache_dtype", "activation", "window", "parallel"]))
    if bad is not None:
        def run(x=x, kc=kc, args=args, window=window, parallel=parallel):
            with torch.no_grad():
                return kernels.decode_layer(x, res, layer, kc, vc, slots, *args, window, parallel)
        call = {"n_head": lambda: run(args=args[:3] + (H + 1,) + args[4:]),
                "x_width": lambda: run(x=torch.randn(B, C + 1)), "cache_dtype": lambda: run(kc=kc.double()),
                "activation": lambda: run(args=args[:6] + ("tanh",) + args[7:]),
                "window": lambda: run(window=(-2, -1)), "parallel": lambda: run(parallel=3)}[bad]
        exc, name = {"n_head": (ValueError, "n_head"), "x_width": (ValueError, "x"),
                     "cache_dtype": (TypeError, "k_cache"),
                     "activation": (ValueError, "activation"), "window": (ValueError, "window_size"),
                     "parallel": (ValueError, "parallel")}[bad]
        return raises_naming(call, exc, name)
    kc2, vc2 = kc.clone(), vc.clone()
    with torch.no_grad():
        y, r = kernels.decode_layer(x, res, layer, kc, vc, slots, *args, window, parallel)
        y_ref, r_ref = R.decode_layer(x, res, w, kc2, vc2, slots, *args, window, parallel)
    assert_matches(kc, kc2, 1e-5)
    assert_matches(vc, vc2, 1e-5)
    assert_matches(r, r_ref, 1e-5)
    assert_matches(y, y_ref, 1e-4)
