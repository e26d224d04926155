"""layer_norm / rms_norm (gpt_engine.kernels._C on CPU and CUDA) against kernels.reference and torch."""
import pytest
import torch
import torch.nn.functional as F

from gpt_engine import kernels
from gpt_engine.kernels import reference

HIDDEN = [1, 96, 768, 4097]
ROWS = [1, 3, 37]


def every_case(test):
    """op x residual x rows x hidden size."""
    for mark in (pytest.mark.parametrize("n", HIDDEN), pytest.mark.parametrize("rows", ROWS),
                 pytest.mark.parametrize("residual", [False, True]), pytest.mark.parametrize("op", ["layer", "rms"])):
        test = mark(test)
    return test
LOW = [torch.bfloat16, torch.float16]


def _inputs(rows, n, dtype, device="cpu", residual=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g) * 2 + 0.5).to(device, dtype)
    w = (torch.rand(n, generator=g) + 0.5).to(device, dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(device, dtype)
    r = torch.randn(rows, n, generator=g).to(device, dtype) if residual else None
    return x, w, b, r


def _run(op, x, w, b, r, eps=1e-5):
    if op == "layer":
        return kernels.layer_norm(x, w, b, eps, residual=r)
    return kernels.rms_norm(x, w, eps, residual=r)


def _ref(op, x, w, b, r, eps=1e-5):
    if op == "layer":
        return reference.layer_norm(x, w, b, eps, residual=r)
    return reference.rms_norm(x, w, eps, residual=r)


def _torch_op(op, x, w, b, r, eps=1e-5):
    """torch's own op in x's dtype (the unfused residual add included): the low-precision yardstick."""
    h = x if r is None else x + r
    y = F.layer_norm(h, h.shape[-1:], w, b, eps) if op == "layer" else F.rms_norm(h, h.shape[-1:], w, eps)
    return y if r is None else (y, h)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _grads(fn, inputs, gouts):
    """Gradients of sum(out_i * gout_i) with respect to the tensors in inputs (None skipped)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    outs = _as_tuple(fn(*leaves))
    loss = sum((o.float() * g.float()).sum() for o, g in zip(outs, gouts))
    loss.backward()
    return [t.grad for t in leaves if t is not None]


def test_extension_is_built_and_used(monkeypatch):
    import gpt_engine.kernels._C as ext
    assert hasattr(ext, "norm_fwd") and hasattr(ext, "norm_bwd")
    from gpt_engine.kernels import norm
    assert norm._ext() is ext

    def boom(*a, **k):
        raise AssertionError("reference path taken")

    monkeypatch.setattr(norm.reference, "layer_norm", boom)
    monkeypatch.setattr(norm.reference, "rms_norm", boom)
    x, w, b, r = _inputs(5, 64, torch.float32, residual=True)
    y, h = kernels.layer_norm(x, w, b, residual=r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (64,), w, b, 1e-5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.rms_norm(x, w), F.rms_norm(x, (64,), w, 1e-6), rtol=1e-5, atol=1e-5)


@every_case
def test_forward_fp32(op, residual, rows, n):
    x, w, b, r = _inputs(rows, n, torch.float32, residual=residual)
    for got, want in zip(_as_tuple(_run(op, x, w, b, r)), _as_tuple(_ref(op, x, w, b, r))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("shape", [(2, 7, 96), (37, 768), (1, 1, 4097)])
def test_layer_norm_matches_torch(shape):
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(shape, generator=g), torch.randn(shape[-1], generator=g), torch.randn(shape[-1], generator=g)
    torch.testing.assert_close(kernels.layer_norm(x, w, b, 1e-5), F.layer_norm(x, shape[-1:], w, b, 1e-5),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), F.rms_norm(x, shape[-1:], w, 1e-6),
                               rtol=1e-5, atol=1e-5)


@every_case
def test_backward_fp32_vs_float64_reference(op, residual, rows, n):
    x, w, b, r = _inputs(rows, n, torch.float32, residual=residual)
    g = torch.Generator().manual_seed(7)
    gouts = [torch.randn(rows, n, generator=g) for _ in range(2 if residual else 1)]
    b = b if op == "layer" else None
    fn = lambda f: (lambda x_, w_, b_, r_: f(op, x_, w_, b_, r_))  # noqa: E731
    got = _grads(fn(_run), [x, w, b, r], gouts)
    want = _grads(fn(_ref), [t.double() if t is not None else None for t in (x, w, b, r)], gouts)
    assert len(got) == len(want)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww.float(), rtol=1e-4, atol=1e-4 * max(1.0, rows / 8))


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("op", ["layer", "rms"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("n", HIDDEN)
def test_low_precision_within_2x_torch(dtype, op, residual, n):
    rows = 37
    x, w, b, r = _inputs(rows, n, dtype, residual=residual)
    b = b if op == "layer" else None
    atol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    ref = _as_tuple(_ref(op, *[t.float() if t is not None else None for t in (x, w, b, r)]))
    got, tor = _as_tuple(_run(op, x, w, b, r)), _as_tuple(_torch_op(op, x, w, b, r))
    for o_got, o_tor, o_ref in zip(got, tor, ref):
        assert o_got.dtype == dtype
        assert _err(o_got, o_ref) <= 2 * _err(o_tor, o_ref) + atol
    # gradients: ours in low precision vs the fp32 reference, against torch's low-precision autograd
    g = torch.Generator().manual_seed(3)
    gouts = [torch.randn(rows, n, generator=g).to(dtype) for _ in range(2 if residual else 1)]
    ins = [x, w, b, r]
    g_got = _grads(lambda *a: _run(op, *a), ins, gouts)
    g_tor = _grads(lambda *a: _torch_op(op, *a), ins, gouts)
    g_ref = _grads(lambda *a: _ref(op, *a), [t.float() if t is not None else None for t in ins], gouts)
    for a, t_, ref_ in zip(g_got, g_tor, g_ref):
        assert a.dtype == dtype
        scale = 1 + ref_.abs().max().item()  # dweight sums over rows: scale the atol with it
        assert _err(a, ref_) <= 2 * _err(t_, ref_) + atol * scale


def test_non_contiguous_and_3d():
    x = torch.randn(96, 5, 2).permute(1, 2, 0)  # (5, 2, 96), not contiguous
    w, b = torch.rand(96) + 0.5, torch.randn(96)
    torch.testing.assert_close(kernels.layer_norm(x, w, b), reference.layer_norm(x, w, b), rtol=1e-5, atol=1e-5)
    y, h = kernels.rms_norm(x, w, residual=x)
    torch.testing.assert_close(h, 2 * x)
    torch.testing.assert_close(y, reference.rms_norm(2 * x, w), rtol=1e-5, atol=1e-5)


def test_float64_and_fp32_params_with_bf16_input():
    x, w, b, r = _inputs(3, 96, torch.float64, residual=True)
    for got, want in zip(kernels.layer_norm(x, w, b, residual=r), reference.layer_norm(x, w, b, residual=r)):
        torch.testing.assert_close(got, want)
    # fp32 master weights with bf16 activations: cast in, grads flow back in fp32
    xb = x.to(torch.bfloat16)
    wf = w.float().requires_grad_(True)
    y = kernels.rms_norm(xb, wf)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert wf.grad is not None and wf.grad.dtype == torch.float32


def test_errors_name_the_argument():
    x, w, b, r = _inputs(4, 32, torch.float32, residual=True)
    with pytest.raises(ValueError, match="weight"):
        kernels.layer_norm(x, torch.ones(31), b)
    with pytest.raises(ValueError, match="weight"):
        kernels.rms_norm(x, torch.ones(2, 32))
    with pytest.raises(ValueError, match="bias"):
        kernels.layer_norm(x, w, torch.ones(33))
    with pytest.raises(TypeError, match="weight"):
        kernels.layer_norm(x, torch.ones(32, dtype=torch.int64), b)
    with pytest.raises(TypeError, match="x"):
        kernels.rms_norm(x.long(), w)
    with pytest.raises(ValueError, match="weight"):
        kernels.layer_norm(x, w.to("meta"), b)
    with pytest.raises(ValueError, match="bias"):
        kernels.layer_norm(x, w, b.to("meta"))
    with pytest.raises(ValueError, match="residual"):
        kernels.rms_norm(x, w, residual=r[:2])
    with pytest.raises(TypeError, match="residual"):
        kernels.rms_norm(x, w, residual=r.half())
    with pytest.raises(ValueError, match="residual"):
        kernels.layer_norm(x, w, b, residual=r.to("meta"))
    with pytest.raises(TypeError, match="weight"):
        kernels.layer_norm(x, "w", b)


def test_bindings_validate_inputs():
    # the entry point runs the public rules (csrc/checks.cpp), then its kernel's own
    from gpt_engine.kernels import _C
    x, w, b, r = _inputs(4, 32, torch.float32, residual=True)
    with pytest.raises(ValueError, match="weight has 31 elements"):
        _C.norm_fwd(x, None, w[:31], b, 1e-5, False)
    with pytest.raises(TypeError, match="residual"):
        _C.norm_fwd(x, r.half(), w, b, 1e-5, False)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        _C.norm_fwd(x.double(), None, w, b, 1e-5, False)
    with pytest.raises(ValueError, match="x must be a CPU or CUDA tensor"):
        _C.norm_fwd(x.to("meta"), None, w.to("meta"), None, 1e-5, True)
    with pytest.raises(ValueError, match="eps"):
        _C.norm_fwd(x, None, w, b, -1.0, False)
    # any layout, and weights in another float dtype: a transposed x is the (32, 4) rows it shows
    xt = x.t()
    torch.testing.assert_close(_C.norm_fwd(xt, None, w[:4].double(), None, 1e-5, True)[0],
                               reference.rms_norm(xt, w[:4], 1e-5))


# ---------------------------------------------------------------- CUDA

GPU_HIDDEN = [1, 7, 96, 256, 768, 1000, 1024, 2048, 4096, 4097, 5120, 8192, 12288, 16384]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["layer", "rms"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("n", GPU_HIDDEN)
def test_cuda_forward_backward(dtype, op, residual, n):
    from gpt_engine.kernels import _C
    assert _C.has_cuda()
    rows = 37 if n > 4097 else 1000
    x, w, b, r = _inputs(rows, n, dtype, "cuda", residual=residual)
    b = b if op == "layer" else None
    f32 = lambda ts: [t.float() if t is not None else None for t in ts]  # noqa: E731
    atol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    ref = _as_tuple(_ref(op, *f32((x, w, b, r))))
    got, tor = _as_tuple(_run(op, x, w, b, r)), _as_tuple(_torch_op(op, x, w, b, r))
    for o_got, o_tor, o_ref in zip(got, tor, ref):
        assert o_got.dtype == dtype
        assert _err(o_got, o_ref) <= 2 * _err(o_tor, o_ref) + atol
    g = torch.Generator().manual_seed(3)
    gouts = [torch.randn(rows, n, generator=g).to("cuda", dtype) for _ in range(2 if residual else 1)]
    ins = [x, w, b, r]
    g_got = _grads(lambda *a: _run(op, *a), ins, gouts)
    g_tor = _grads(lambda *a: _torch_op(op, *a), ins, gouts)
    g_ref = _grads(lambda *a: _ref(op, *a), f32(ins), gouts)
    for a, t_, ref_ in zip(g_got, g_tor, g_ref):
        scale = 1 + ref_.abs().max().item()
        assert _err(a, ref_) <= 2 * _err(t_, ref_) + atol * scale


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 37, 4099])
def test_cuda_rows_and_misaligned(rows):
    x, w, b, r = _inputs(rows + 1, 768, torch.bfloat16, "cuda", residual=True)
    xs, rs = x[1:].view(-1)[3:].view(-1)[: rows * 765].view(rows, 765), r[1:, :765]  # odd offsets: scalar path
    for xx, rr, ww, bb in [(x[1:], r[1:], w, b), (xs, rs.contiguous(), w[:765], b[:765])]:
        want = reference.layer_norm(xx.float(), ww.float(), bb.float(), residual=rr.float())
        got = kernels.layer_norm(xx, ww, bb, residual=rr)
        for gg, wt in zip(got, want):
            assert _err(gg, wt) < 0.06


# ---------------------------------------------------------------- torch.library ops / torch.compile

OP_CASES = [(False, True), (False, False), (True, False)]  # (rms, bias): LayerNorm with/without bias, RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("rms,bias", OP_CASES)
def test_opcheck_norm_ops(rms, bias, residual, dtype):
    from gpt_engine.kernels import norm
    x, w, b, r = _inputs(5, 48, dtype, residual=residual)
    b = b if bias else None
    grad = [t.requires_grad_(True) for t in (x, w, b, r) if t is not None]
    torch.library.opcheck(norm._norm_fwd, (x, w, b, r, 1e-5, rms))
    for t in grad:
        t.requires_grad_(False)
    y, h, mean, rstd = norm._norm_fwd(x, w, b, r, 1e-5, rms)
    assert y.shape == x.shape and y.dtype == dtype
    assert mean.shape == rstd.shape == (5,) and mean.dtype == rstd.dtype == torch.float32
    assert h.shape == ((5, 48) if residual else (0,))
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(5, 48, generator=g).to(dtype)
    dh = torch.randn(5, 48, generator=g).to(dtype) if residual else None
    saved = h if residual else x
    torch.library.opcheck(norm._norm_bwd, (dy, saved, dh, w, mean, rstd, bias, rms))
    dx, dw, db = norm._norm_bwd(dy, saved, dh, w, mean, rstd, bias, rms)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == ((48,) if bias else (0,))


def _two_norms(x, w1, b1, r, w2):
    # the model's pattern: LayerNorm with the residual add fused, then RMSNorm on the new stream
    y, h = kernels.layer_norm(x, w1, b1, residual=r)
    z, h2 = kernels.rms_norm(y, w2, residual=h)
    return z * 2 + h2


def test_compile_fullgraph_matches_eager():
    g = torch.Generator().manual_seed(4)
    shape, n = (2, 7, 64), 64
    x, r = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    w1, b1, w2 = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g), torch.rand(n, generator=g) + 0.5
    gout = torch.randn(shape, generator=g)
    inputs = (x, w1, b1, r, w2)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_two_norms)(*inputs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(_two_norms, backend="aot_eager", fullgraph=True)
    outs = {}
    for name, fn in (("eager", _two_norms), ("compiled", compiled)):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        (out * gout).sum().backward()
        outs[name] = [out.detach()] + [t.grad for t in leaves]
    for got, want in zip(outs["compiled"], outs["eager"]):  # output, then d x, w1, b1, residual, w2
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want = reference.layer_norm(x, w1, b1, residual=r)
    want = reference.rms_norm(want[0], w2, residual=want[1])
    torch.testing.assert_close(outs["compiled"][0], want[0] * 2 + want[1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # compiled inference takes the custom op too (the extension would break the graph)
        torch.testing.assert_close(compiled(*inputs), outs["eager"][0], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_eager_inference_calls_the_extension_directly(monkeypatch):
    from gpt_engine.kernels import norm

    def boom(*a, **k):
        raise AssertionError("custom op dispatched under no_grad")

    x, w, b, r = _inputs(3, 32, torch.float32, residual=True)
    with torch.no_grad():
        want = kernels.layer_norm(x, w, b, residual=r)
        monkeypatch.setattr(norm, "_norm_fwd", boom)
        got = kernels.layer_norm(x, w, b, residual=r)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=0, atol=0)
