"""linear: the CPU fp32 GEMM (gpt_engine.kernels._C) for inference, torch BLAS otherwise, the tensor-core GEMM on
CUDA; all against kernels.reference."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from gpt_engine import kernels
from gpt_engine.kernels import reference

ACTS = [None, "gelu", "gelu_tanh", "relu"]


def _inputs(m, n, k, dtype, device="cpu", bias=True, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, m, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
    b = (torch.randn(n, generator=g) * 0.5).to(device, dtype) if bias else None
    return x, w, b


def _grads(fn, inputs, gout):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    (fn(*leaves).float() * gout.float()).sum().backward()
    return [t.grad for t in leaves if t is not None]


def _torch_op(x, w, b, act):
    return reference.ACTIVATIONS[act](F.linear(x, w, b))


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mnk", [(1, 1, 1), (37, 65, 24), (5, 48, 33)])
def test_cpu_forward_and_grads_vs_reference(act, bias, mnk):
    m, n, k = mnk
    x, w, b = _inputs(m, n, k, torch.float32, bias=bias, lead=(2,))
    torch.testing.assert_close(kernels.linear(x, w, b, act), reference.linear(x, w, b, act), rtol=1e-5, atol=1e-5)
    gout = torch.randn(2, m, n, generator=torch.Generator().manual_seed(1))
    got = _grads(lambda *a: kernels.linear(*a, activation=act), [x, w, b], gout)
    want = _grads(lambda *a: reference.linear(*a, activation=act), [t.double() if t is not None else None
                                                                     for t in (x, w, b)], gout)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision(dtype):
    x, w, b = _inputs(37, 65, 96, dtype)
    for act in ACTS:
        y = kernels.linear(x, w, b, act)
        assert y.dtype == dtype and y.shape == (37, 65)
        ref = reference.linear(x.float(), w.float(), b.float(), act)
        assert _err(y, ref) <= 2 * _err(_torch_op(x, w, b, act), ref) + 1e-2


def test_errors_name_the_argument():
    x, w, b = _inputs(4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        kernels.linear(x, w[:, :15])
    with pytest.raises(ValueError, match="weight"):
        kernels.linear(x, w[0])
    with pytest.raises(ValueError, match="bias"):
        kernels.linear(x, w, b[:7])
    with pytest.raises(TypeError, match="weight"):
        kernels.linear(x, w.long())
    with pytest.raises(TypeError, match="weight"):
        kernels.linear(x, w.half())
    with pytest.raises(ValueError, match="weight"):
        kernels.linear(x, w.to("meta"))
    with pytest.raises(ValueError, match="activation"):
        kernels.linear(x, w, b, "swish")
    with pytest.raises(TypeError, match="x"):
        kernels.linear([1.0], w)
    with pytest.raises(ValueError, match="backend"):
        kernels.linear(x, w, backend="cutlass")


# ---------------------------------------------------------------- CPU fp32 GEMM (inference)

# rows: 1, tails of the 4-row tile, past the 64-row block; cols: tails of the 3-row w tile;
# K: under one vector, a K % 8 tail, long
CPU_SHAPES = [(1, 1, 1), (3, 5, 7), (4, 6, 8), (37, 65, 24), (70, 97, 33), (130, 50, 1000), (2, 4096, 256)]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mnk", CPU_SHAPES)
def test_cpu_gemm_vs_reference(act, bias, mnk):
    from gpt_engine.kernels import _C
    m, n, k = mnk
    x, w, b = _inputs(m, n, k, torch.float32, bias=bias)
    want = reference.linear(x.double(), w.double(), None if b is None else b.double(), act)
    got = _C.gemm(x, w, b, [None, "gelu", "gelu_tanh", "relu"].index(act), False)[0]
    # fp32 sums of k terms; the erf/exp approximations add < 1e-6 relative
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * (k ** 0.5 + 1))
    assert _err(got, want) <= 2 * _err(_torch_op(x, w, b, act), want) + 1e-6


def test_cpu_gemm_taken_for_inference_only():
    from gpt_engine.kernels import _dispatch
    x, w, b = _inputs(32, 96, 64, torch.float32)
    with torch.no_grad():
        assert _dispatch.cpu_gemm(x, w, b, None, "auto")
        assert not _dispatch.cpu_gemm(x.repeat(5, 1), w, b, None, "auto")  # prefill-sized: BLAS
        assert _dispatch.cpu_gemm(x.repeat(5, 1), w, b, "gelu", "auto")  # unless it fuses an activation
        assert _dispatch.cpu_gemm(x.repeat(5, 1), w, b, None, "custom")
        assert not _dispatch.cpu_gemm(x, w.t().contiguous().t(), b, None, "auto")  # strided weight: BLAS
        assert not _dispatch.cpu_gemm(x.double(), w.double(), b.double(), None, "auto")
        y = kernels.linear(x[None, :, :], w, b, "gelu_tanh")
    assert y.shape == (1, 32, 96)
    torch.testing.assert_close(y[0], reference.linear(x, w, b, "gelu_tanh"), rtol=1e-5, atol=1e-5)
    wg = w.clone().requires_grad_(True)
    assert not _dispatch.cpu_gemm(x, wg, b, "relu", "auto")  # training keeps autograd's path
    y = kernels.linear(x, wg, b, "relu")
    y.sum().backward()
    assert wg.grad is not None
    xs = x.t().contiguous().t()  # a non-contiguous x is copied, not misread
    with torch.no_grad():
        torch.testing.assert_close(kernels.linear(xs, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_cpu_gemm_runs_without_the_gil():
    """The compiled kernels release the GIL, as torch's ops do: a server's event loop (or the grammar
    thread) runs Python while a step's kernels do. Python on the main thread must fill many of the
    milliseconds one long GEMM call takes on another thread (sharing the cores with the GEMM's threads);
    holding the GIL, it fills none but the edges (a switch interval or so)."""
    import threading
    import time

    from gpt_engine.kernels import _C
    x, w, _ = _inputs(1024, 2048, 2048, torch.float32, bias=False)
    span, started = [], threading.Event()

    def gemm():
        started.set()
        t0 = time.perf_counter()
        _C.gemm(x, w, None, 0, False)
        span.extend((t0, time.perf_counter()))

    th = threading.Thread(target=gemm)
    th.start()
    started.wait()
    ticks = set()
    while th.is_alive():
        ticks.add(int(time.perf_counter() * 1000))  # the milliseconds in which Python ran here
    th.join()
    t0, t1 = (t * 1000 for t in span)
    inside = sum(t0 < t < t1 - 1 for t in ticks)
    assert t1 - t0 > 40, "the GEMM was too short to tell"
    assert inside > 0.35 * (t1 - t0), (inside, t1 - t0)


def test_cpu_gemm_errors():
    from gpt_engine.kernels import _C
    x, w, b = _inputs(4, 8, 16, torch.float32)
    with pytest.raises(RuntimeError, match="forward-only"):
        _C.gemm(x, w, b, 1, True)
    with pytest.raises(RuntimeError, match="float32"):
        _C.gemm(x.half(), w.half(), None, 0, False)
    with pytest.raises(ValueError, match="act"):
        _C.gemm(x, w, b, 7, False)
    with pytest.raises(ValueError, match="weight has in_features 15"):
        _C.gemm(x, w[:, :15].contiguous(), None, 0, False)
    with pytest.raises(ValueError, match="bias"):
        _C.gemm(x, w, b[:7].contiguous(), 0, False)


def test_backward_gemm_bindings_check_their_input():
    from gpt_engine.kernels import _C
    dz, w = torch.randn(4, 8), torch.randn(8, 16)
    assert not _C.gemm_sm90(dz, w)  # a CPU tensor never takes the Hopper kernels
    for fn in (_C.gemm_dgrad, _C.gemm_wgrad):
        with pytest.raises(RuntimeError, match="CUDA"):
            fn(dz, w if fn is _C.gemm_dgrad else torch.randn(4, 16))
        with pytest.raises(RuntimeError, match="contiguous"):
            fn(dz.t(), w)
        with pytest.raises(RuntimeError, match="same dtype"):
            fn(dz, w.half())
    with pytest.raises(RuntimeError, match="do not match"):
        _C.gemm_dgrad(dz.half(), torch.randn(7, 16).half())
    with pytest.raises(RuntimeError, match="do not match"):
        _C.gemm_wgrad(dz.half(), torch.randn(5, 16).half())


# ---------------------------------------------------------------- the CUDA path's autograd ops, on CPU
# gpt_engine::linear_fwd / linear_bwd call _C's CUDA GEMM entry points; here those entry points are
# torch twins, so the ops' autograd and fake (torch.compile) registrations are checked without a GPU.

class _TorchGemm:
    @staticmethod
    def gemm(a, b, bias, act, save_preact):
        z = F.linear(a, b, bias)
        return [reference.ACTIVATIONS[ACTS[act]](z), z if save_preact and act else None]

    @staticmethod
    def act_bwd(dy, z, act):
        if act == 3:
            return dy * (z > 0)
        if act == 1:
            return dy * (0.5 * (1 + torch.erf(z / 2 ** 0.5)) + z * torch.exp(-z * z / 2) / (2 * torch.pi) ** 0.5)
        c = (2 / torch.pi) ** 0.5
        t = torch.tanh(c * (z + 0.044715 * z ** 3))
        return dy * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z))

    @staticmethod
    def gemm_dgrad(dz, w):
        return dz @ w

    @staticmethod
    def gemm_wgrad(dz, x):
        return dz.t() @ x


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_ops_autograd(act, bias, monkeypatch):
    from gpt_engine.kernels import gemm
    monkeypatch.setattr(gemm, "_ext", lambda: _TorchGemm)
    x, w, b = _inputs(7, 12, 16, torch.float64, bias=bias)
    a = ACTS.index(act)
    torch.library.opcheck(gemm._linear_fwd, (x.requires_grad_(True), w.requires_grad_(True),
                                             None if b is None else b.requires_grad_(True), a, True))
    gout = torch.randn(7, 12, dtype=torch.float64)
    got = _grads(lambda *t: gemm._linear_fwd(*t, a, True)[0], (x, w, b), gout)
    want = _grads(lambda *t: reference.linear(*t, act), (x, w, b), gout)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)  # dbias sums in fp32, as on CUDA
    # only the inputs that want a gradient get one
    xg, wd, bd = x.detach().requires_grad_(True), w.detach(), None if b is None else b.detach()
    (gemm._linear_fwd(xg, wd, bd, a, True)[0] * gout).sum().backward()
    torch.testing.assert_close(xg.grad, want[0], rtol=1e-6, atol=1e-6)
    assert wd.grad is None

# ---------------------------------------------------------------- CUDA

SHAPES = list(itertools.product([1, 37, 1000], [65, 768, 3073], [64, 768, 1000]))


def _check_close(got, tor, ref):
    assert _err(got, ref) <= 2 * _err(tor, ref) + 2e-3 * (1 + ref.abs().max().item()), (
        _err(got, ref), _err(tor, ref))


@pytest.mark.gpu
def test_cuda_gemm_is_used():
    from gpt_engine.kernels import _C, _dispatch
    assert _C.has_cuda()
    x, w, b = _inputs(37, 65, 64, torch.bfloat16, "cuda")
    assert _dispatch.cuda_gemm(x, w, "custom") and not _dispatch.cuda_gemm(x, w, "auto")
    y, z = _C.gemm(x, w, b, 1, True)
    torch.testing.assert_close(z, F.linear(x, w, b), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, kernels.linear(x, w, b, "gelu", backend="custom"), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        _C.gemm(x[:, :60].contiguous(), w[:, :60].contiguous(), None, 0, False)


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mnk", SHAPES)
def test_cuda_forward_bf16(act, mnk):
    m, n, k = mnk
    x, w, b = _inputs(m, n, k, torch.bfloat16, "cuda")
    ref = reference.linear(x.float(), w.float(), b.float(), act)
    _check_close(kernels.linear(x, w, b, act, backend="custom"), _torch_op(x, w, b, act), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mnk", [(37, 3073, 1000), (1000, 65, 768), (1, 768, 64), (257, 384, 136)])
def test_cuda_forward_backward(dtype, bias, act, mnk):
    m, n, k = mnk
    x, w, b = _inputs(m, n, k, dtype, "cuda", bias=bias, lead=(1,))
    f32 = [t.float() if t is not None else None for t in (x, w, b)]
    ref = reference.linear(*f32, act)
    _check_close(kernels.linear(x, w, b, act, backend="custom"), _torch_op(x, w, b, act), ref)
    gout = torch.randn(1, m, n, generator=torch.Generator().manual_seed(2)).to("cuda", dtype)
    got = _grads(lambda *a: kernels.linear(*a, activation=act, backend="custom"), [x, w, b], gout)
    tor = _grads(lambda *a: _torch_op(*a, act), [x, w, b], gout)
    want = _grads(lambda *a: reference.linear(*a, activation=act), f32, gout)
    for gg, tt, ww in zip(got, tor, want):
        assert gg.dtype == dtype
        _check_close(gg, tt, ww)


@pytest.mark.gpu
def test_cuda_sm90_gemm_taken_on_hopper():
    from gpt_engine.kernels import _C
    x, w, b = _inputs(37, 768, 64, torch.bfloat16, "cuda")
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert _C.gemm_sm90(x, w) == hopper  # M needs no alignment; K and N multiples of 8
    assert not _C.gemm_sm90(x, w[:765].contiguous())
    # training forward: z from the GEMM (kept for the backward), then y = act(z) from z rounded to
    # bf16 as torch's two ops do; the fused epilogue applies act before rounding: one bf16 ulp apart
    y, z = _C.gemm(x, w, b, 2, True)
    torch.testing.assert_close(z, F.linear(x, w, b), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, F.gelu(z.float(), approximate="tanh").to(z.dtype), rtol=8e-3, atol=1e-3)
    torch.testing.assert_close(y, _C.gemm(x, w, b, 2, False)[0], rtol=1.6e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mnk", [(37, 64, 768), (1000, 768, 64), (129, 3072, 768), (1, 8, 8), (256, 72, 1000),
                                 (33, 65, 24), (40, 96, 37)])
def test_cuda_backward_gemms(dtype, mnk):
    # dgrad dz @ w and wgrad dz^T @ x on the tensors autograd holds: sm90 shapes (N, K % 8 == 0,
    # any M) and the mma.sync fallback's (N or K odd: padded, transposed copies)
    from gpt_engine.kernels import _C
    m, n, k = mnk
    g = torch.Generator().manual_seed(3)
    dz, w, x = (torch.randn(*s, generator=g).to("cuda", dtype) for s in ((m, n), (n, k), (m, k)))
    for got, want in [(_C.gemm_dgrad(dz, w), dz.double() @ w.double()),
                      (_C.gemm_wgrad(dz, x), dz.double().t() @ x.double())]:
        tor = (want.to(dtype)).double()  # one rounding of the exact result: the best a GEMM can do
        assert got.dtype == dtype and got.shape == want.shape
        assert _err(got, want) <= 4 * _err(tor, want) + 1e-2 * (1 + want.abs().max().item()) ** 0.5


@pytest.mark.gpu
def test_cuda_fallbacks_and_odd_layouts():
    # K % 8 != 0 and fp32 take torch's path; a non-contiguous, offset x still runs the GEMM
    for dtype, k in [(torch.bfloat16, 60), (torch.float32, 64)]:
        x, w, b = _inputs(37, 65, k, dtype, "cuda")
        ref = reference.linear(x.float(), w.float(), b.float(), "relu")
        _check_close(kernels.linear(x, w, b, "relu", backend="custom"), _torch_op(x, w, b, "relu"), ref)
    x, w, b = _inputs(40, 96, 128, torch.bfloat16, "cuda")
    xs = x.t().contiguous().t()[1:]  # (39, 128) non-contiguous
    ref = reference.linear(xs.float(), w.float(), b.float(), "gelu_tanh")
    _check_close(kernels.linear(xs, w, b, "gelu_tanh", backend="custom"), _torch_op(xs, w, b, "gelu_tanh"), ref)
