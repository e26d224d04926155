"""linear: torch BLAS path on CPU, the tensor-core GEMM (kernels._C) on CUDA, against kernels.reference."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference

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


# ---------------------------------------------------------------- CUDA

SHAPES = list(itertools.product([1, 37, 1000], [65, 768, 3073], [64, 768, 1000]))


def _check_close(got, tor, ref):
    assert _err(got, ref) <= 2 * _err(tor, ref) + 2e-3 * (1 + ref.abs().max().item()), (
        _err(got, ref), _err(tor, ref))


@pytest.mark.gpu
def test_cuda_gemm_is_used():
    from kernels import _C, gemm
    assert _C.has_cuda()
    x, w, b = _inputs(37, 65, 64, torch.bfloat16, "cuda")
    assert gemm._use_gemm(x, w, "custom") and not gemm._use_gemm(x, w, "auto")
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
