"""kernels.decode_layer (one CPU decode layer in one gpt_engine.kernels._C call) and its packed-weight
GEMM vs kernels.reference, and the engine's decode step with and without it."""
from __future__ import annotations

import math

import pytest
import torch

import gpt_engine.models.formats as F
import gpt_engine.models.gpt as M
import gpt_engine.models.layers as L
from gpt_engine.models.presets import resolve_config
from gpt_engine.kernels import (PackedLayer, decode_layer, decode_layer_applies, glu, pack_layer, pack_linear,
                                packed_linear, rope_)
from gpt_engine.kernels import reference as R
from gpt_engine.kernels._ext import ext

from .helpers import layer_weights, paged_batch

BS = 16
pytestmark = pytest.mark.usefixtures("torch_cpu_path")  # conftest's TRITON_INTERPRET=1 routes decode to Triton


# (C, H, Hkv, D, ff, bias, activation, rope): gpt2-like and llama-like (GQA, RoPE, SwiGLU), and
# head dims off the powers of two (any multiple of 8 up to 256)
CASES = [
    (64, 2, 2, 32, 256, True, "gelu_tanh", False),
    (64, 2, 2, 32, 96, True, "gelu", False),
    (160, 2, 2, 80, 200, False, "relu", False),
    (128, 4, 1, 32, 160, False, "swiglu", True),
    (256, 8, 2, 32, 100, False, "swiglu", True),
    (32, 4, 2, 8, 64, True, "gelu", True),
    (96, 4, 2, 24, 64, False, "swiglu", True),
    (112, 1, 1, 112, 64, True, "gelu_tanh", True),
    (320, 2, 1, 160, 64, False, "swiglu", True),
    (256, 1, 1, 256, 64, False, "swiglu", True),
]


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, first):
    C, H, Hkv, D, ff, bias, act, rope = case
    g = torch.Generator().manual_seed(C + H + D)
    lens = [1, 16, 17, 40, 5]
    weights = layer_weights(C, H, Hkv, D, ff, bias, act == "swiglu", g)
    kc, vc, table, seq_lens, slots = paged_batch(lens, Hkv, D, g, bs=BS, pad_last=True)
    x, res = torch.randn(len(lens), C, generator=g), None if first else torch.randn(len(lens), C, generator=g)
    pos = seq_lens.long() - 1
    cs = None
    if rope:
        ang = pos[:, None].double() * 1e4 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        cs = (ang.cos().float(), ang.sin().float())
    args = (table, seq_lens, cs, H, 1e-5, act == "swiglu", act, 1 / math.sqrt(D))
    kc2, vc2 = kc.clone(), vc.clone()
    with torch.no_grad():
        y, r = decode_layer(x, res, pack_layer(weights), kc, vc, slots, *args)
        y_ref, r_ref = R.decode_layer(x, res, weights, kc2, vc2, slots, *args)
    torch.testing.assert_close(kc, kc2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vc, vc2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r, r_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)


def rope_tables(pos, D, rot):
    """cos, sin (B, rot/2) at positions pos: a rotary over each head's first rot of D dims (GPT-NeoX's
    rotary_pct = rot / D), its frequencies by rot as HF's partial rotary makes them"""
    ang = pos[:, None].double() * 1e4 ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    return ang.cos().float(), ang.sin().float()


# (C, H, Hkv, D, ff, bias, activation, rotary dims (0: none), rms): the new families' traits; GQA and
# layer norm with biases among them; partial rotary R < D, D = 64 too
TRAIT_CASES = [
    (64, 2, 2, 32, 96, True, "gelu", 8, False),  # GPT-NeoX-like: layer norm, biases, rotary_pct 0.25
    (128, 4, 1, 32, 160, False, "swiglu", 16, True),
    (128, 4, 2, 32, 96, False, "geglu", 32, True),  # Gemma-like
    (128, 2, 1, 64, 100, True, "geglu", 16, False),
    (96, 3, 3, 32, 64, True, "gelu_tanh", 0, False),
    (96, 4, 2, 24, 64, False, "geglu", 8, True),  # head dims off the powers of two
    (32, 4, 2, 8, 64, False, "swiglu", 8, True),
]


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("parallel", [0, 1, 2])
@pytest.mark.parametrize("case", TRAIT_CASES)
def test_traits_match_reference(case, parallel, qk_norm, first):
    """Parallel residual (GPT-NeoX 1, GPT-J 2), Qwen3's q/k norms, GeGLU and partial rotary in the
    fused call, against the per-op reference."""
    C, H, Hkv, D, ff, bias, act, rot, rms = case
    g = torch.Generator().manual_seed(C + H + D + rot + parallel)
    lens = [1, 16, 17, 40, 5]
    w = list(layer_weights(C, H, Hkv, D, ff, bias, act in ("swiglu", "geglu"), g))
    if parallel == 2:  # GPT-J: one norm for both branches
        w[6] = w[7] = None
    if qk_norm:
        w += [1 + 0.3 * torch.randn(D, generator=g), 1 + 0.3 * torch.randn(D, generator=g)]
    kc, vc, table, seq_lens, slots = paged_batch(lens, Hkv, D, g, bs=BS, pad_last=True)
    x, res = torch.randn(len(lens), C, generator=g), None if first else torch.randn(len(lens), C, generator=g)
    cs = rope_tables(seq_lens.long() - 1, D, rot) if rot else None
    args = (table, seq_lens, cs, H, 1e-5, rms, act, 1 / math.sqrt(D))
    kc2, vc2 = kc.clone(), vc.clone()
    with torch.no_grad():
        y, r = decode_layer(x, res, pack_layer(w), kc, vc, slots, *args, parallel=parallel)
        y_ref, r_ref = R.decode_layer(x, res, w, kc2, vc2, slots, *args, parallel=parallel)
    torch.testing.assert_close(kc, kc2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vc, vc2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r, r_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    if parallel:  # the stream passes through untouched: the next layer's norm1 adds y to it
        assert torch.equal(r, x if first else x + res)


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("parallel", [0, 1, 2])
def test_halves_make_the_layer(parallel, first):
    """part 1 (attention) then part 2 (MLP), as tensor parallelism calls them around its all-reduces (one
    rank here: the sums are the halves themselves), equal the whole layer and the reference's halves."""
    C, H, Hkv, D, ff, bias, act, rot, rms = TRAIT_CASES[0]
    g = torch.Generator().manual_seed(11 + parallel)
    lens = [1, 16, 17, 40, 5]
    w = list(layer_weights(C, H, Hkv, D, ff, bias, act in ("swiglu", "geglu"), g))
    if parallel == 2:
        w[6] = w[7] = None
    kc, vc, table, seq_lens, slots = paged_batch(lens, Hkv, D, g, bs=BS, pad_last=True)
    x, res = torch.randn(len(lens), C, generator=g), None if first else torch.randn(len(lens), C, generator=g)
    cs = rope_tables(seq_lens.long() - 1, D, rot) if rot else None
    args = (table, seq_lens, cs, H, 1e-5, rms, act, 1 / math.sqrt(D))
    layer = pack_layer(w)
    outs = []
    with torch.no_grad():
        for f, ws in ((decode_layer, layer), (R.decode_layer, w)):
            k2, v2 = kc.clone(), vc.clone()
            a, stream = f(x, res, ws, k2, v2, slots, *args, parallel=parallel, part=1)
            m, stream2 = f(a, stream, ws, k2, v2, slots, *args, parallel=parallel, part=2)
            outs.append((m if not parallel else m + a, stream2))
        y, r = decode_layer(x, res, layer, kc.clone(), vc.clone(), slots, *args, parallel=parallel)
    for got in outs:
        torch.testing.assert_close(got[1], r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[0], y, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="part 2 .* needs the stream as residual"):
        with torch.no_grad():
            decode_layer(x, None, layer, kc, vc, slots, *args, parallel=parallel, part=2)
    with pytest.raises(ValueError, match="part must be 0"):
        with torch.no_grad():
            decode_layer(x, res, layer, kc, vc, slots, *args, parallel=parallel, part=3)


def test_trait_references():
    """The reference's traits are the models' own forms: a partial rotary leaves dims [R, D), the
    q/k norms are per head, GPT-NeoX's block is x + attn(ln1(x)) + mlp(ln2(x))."""
    g = torch.Generator().manual_seed(5)
    C, H, D, ff = 64, 2, 32, 96
    w = list(layer_weights(C, H, H, D, ff, True, False, g))
    lens = [3, 9]
    kc, vc, table, seq_lens, slots = paged_batch(lens, H, D, g, bs=BS)
    x = torch.randn(2, C, generator=g)
    cos, sin = rope_tables(seq_lens.long() - 1, D, 8)
    qk = [1 + 0.3 * torch.randn(D, generator=g) for _ in range(2)]
    args = (table, seq_lens, (cos, sin), H, 1e-5, False, "gelu", 1 / math.sqrt(D))
    y, s = R.decode_layer(x, None, w + qk, kc.clone(), vc.clone(), slots, *args, parallel=1)
    # by hand, GPT-NeoX style: rotate_half over the first R dims of each normalised head
    h = torch.nn.functional.layer_norm(x, (C,), w[0], w[1], 1e-5)
    q, k, v = (h @ w[2].T + w[3]).view(2, 3 * H, D).split(H, dim=1)
    q, k = (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * n for t, n in zip((q, k), qk))

    def rot(t):
        t1, t2, rest = t[..., :4], t[..., 4:8], t[..., 8:]
        c, s_ = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
        return torch.cat([t[..., :8] * c + torch.cat([-t2, t1], -1) * s_, rest], -1)
    q, k = rot(q), rot(k)
    kc2, vc2 = kc.clone(), vc.clone()
    R.store_kvcache(k, v, kc2, vc2, slots)
    o = R.paged_attention(q, kc2, vc2, table, seq_lens, 1 / math.sqrt(D)).flatten(1)
    m = torch.nn.functional.layer_norm(x, (C,), w[6], w[7], 1e-5)
    want = (o @ w[4].T + w[5]) + torch.nn.functional.gelu(m @ w[8].T + w[9]) @ w[10].T + w[11]
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(s, x)


def test_trait_errors():
    g = torch.Generator().manual_seed(1)
    C, H, D = 64, 2, 32
    w = list(layer_weights(C, H, H, D, 96, True, False, g))
    kc, vc, table, seq_lens, slots = paged_batch([3, 20], H, D, g, bs=BS, pad_last=True)
    x = torch.randn(2, C)

    def call(weights=w, parallel=0, rope=None):
        return decode_layer(x, None, pack_layer(weights), kc, vc, slots, table, seq_lens, rope, H, 1e-5, False,
                            "gelu", 0.1, parallel=parallel)
    with torch.no_grad():
        with pytest.raises(ValueError, match="parallel must be"):
            call(parallel=3)
        with pytest.raises(ValueError, match="norm2's weight and bias must be None"):
            call(parallel=2)
        with pytest.raises(ValueError, match="w\\[6\\]"):
            call(w[:6] + [None, None] + w[8:])  # sequential needs norm2
        with pytest.raises(ValueError, match="q_norm weight"):
            call(w + [torch.ones(D - 1), None])
        with pytest.raises(ValueError, match="k_norm weight"):
            call(w + [None, torch.ones(2, D)])
        with pytest.raises(ValueError, match="R/2 <= D/2"):
            call(rope=(torch.ones(2, D // 2 + 1), torch.ones(2, D // 2 + 1)))
        with pytest.raises(ValueError, match="12 tensors"):
            pack_layer(w + [None])
        assert len(pack_layer(w).tensors) == 14  # the 12-tensor form: no q/k norms
        call(w + [None, None])  # either may be None
        call(w + [None, torch.ones(D)])


@pytest.mark.parametrize("window", [(0, 0), (1, 0), (7, -1), (20, 0), (64, 0)])
def test_window_matches_reference(window):
    # a sliding-window layer (mistral, gpt_neo's local layers): the fused call attends to each
    # token's last left + 1 keys, as the per-op reference does
    C, H, Hkv, D, ff, bias, act, rope = CASES[3]
    g = torch.Generator().manual_seed(7)
    lens = [1, 16, 17, 40, 70]
    weights = layer_weights(C, H, Hkv, D, ff, bias, True, g)
    kc, vc, table, seq_lens, slots = paged_batch(lens, Hkv, D, g, bs=BS, pad_last=True)
    x, res = torch.randn(len(lens), C, generator=g), torch.randn(len(lens), C, generator=g)
    args = (table, seq_lens, None, H, 1e-5, True, act, 1 / math.sqrt(D))
    kc2, vc2 = kc.clone(), vc.clone()
    with torch.no_grad():
        y, r = decode_layer(x, res, pack_layer(weights), kc, vc, slots, *args, window_size=window)
        y_ref, r_ref = R.decode_layer(x, res, weights, kc2, vc2, slots, *args, window_size=window)
        y_full, _ = decode_layer(x, res, pack_layer(weights), kc.clone(), vc.clone(), slots, *args)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    if window[0] < 40:  # the window cuts the longer sequences' context: a different result
        assert not torch.allclose(y[3:], y_full[3:], atol=1e-4)
    with torch.no_grad(), pytest.raises(ValueError, match="window_size"):
        decode_layer(x, res, pack_layer(weights), kc, vc, slots, *args, window_size=(-3, 0))


def test_errors(monkeypatch):
    g = torch.Generator().manual_seed(0)
    weights = layer_weights(64, 2, 2, 32, 96, True, False, g)
    kc, vc, table, seq_lens, slots = paged_batch([3, 20], 2, 32, g, bs=BS, pad_last=True)
    x = torch.randn(2, 64)
    args = (kc, vc, slots, table, seq_lens, None)

    packed = pack_layer(weights)

    def call(x=x, layer=packed, n_head=2, act="gelu", rope=None):
        return decode_layer(x, None, layer, *args[:-1], rope, n_head, 1e-5, False, act, 0.1)
    with torch.no_grad():
        with pytest.raises(ValueError, match="activation"):
            call(act="silu")
        with pytest.raises(ValueError, match="12 tensors"):
            pack_layer(weights[:-1])
        with pytest.raises(TypeError, match="pack_layer"):
            call(layer=weights)  # unpacked
        with pytest.raises(ValueError, match="heads"):
            call(n_head=4)  # qkv yields (2 + 4) heads, not (4 + 4)
        with pytest.raises(ValueError, match="do not fit"):  # rows the panels' padding would hide
            call(layer=PackedLayer(packed.tensors, (packed.n[0] - 1, *packed.n[1:])))
        with pytest.raises(ValueError, match="linear_pack"):
            t = list(packed.tensors)
            t[4] = weights[4]
            call(layer=PackedLayer(tuple(t), packed.n))
        with pytest.raises(ValueError, match="cos and sin"):
            call(rope=(torch.ones(2, 16), torch.ones(2, 15)))
        with pytest.raises(TypeError, match="x must be a CPU float32 tensor"):
            call(x=x.double())
        w20 = layer_weights(40, 2, 2, 20, 64, True, False, g)
        kc20, vc20, table20, lens20, slots20 = paged_batch([3, 20], 2, 20, g, bs=BS, pad_last=True)
        with pytest.raises(ValueError, match="head dim 20 not supported: must be a multiple of 8 up to 256"):
            decode_layer(torch.randn(2, 40), None, pack_layer(w20), kc20, vc20, slots20, table20, lens20, None, 2,
                         1e-5, False, "gelu", 0.1)
        with pytest.raises(ValueError, match="block_table"):
            bad = table.clone()
            bad[1, 1] = 10_000
            decode_layer(x, None, packed, kc, vc, slots, bad, seq_lens, None, 2, 1e-5, False, "gelu", 0.1)
    assert not decode_layer_applies(x, weights)  # grad mode on: inference only
    with torch.no_grad():
        assert decode_layer_applies(x, weights)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert not decode_layer_applies(x, weights)  # the interpreter's runs exercise the Triton kernels
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not decode_layer_applies(x, weights[:2] + (weights[2].t(),) + weights[3:])  # a strided weight
    assert pack_layer(tuple(w if w is None else w.double() for w in weights)) is None  # not float32


# (M, N, K): rows not a multiple of the 4- or 8-row tile, N not of the 24- or 48-row panel, K odd;
# more rows than one 128-row block. Every panel width this CPU runs (48: AVX-512)
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (5, 23, 7), (13, 47, 9), (32, 768, 256), (7, 50, 33), (131, 97, 64)])
@pytest.mark.parametrize("act", [0, 1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("panel", [0, 24, 48])
def test_packed_gemm(M, N, K, act, bias, panel):
    if panel and panel not in ext().linear_panels():
        pytest.skip(f"this CPU packs {ext().linear_panels()}")
    g = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    pw = ext().linear_pack(w, panel)
    assert pw.shape[2] == (panel or ext().linear_panels()[0])
    y = ext().linear_packed(x, pw, b, N, act)
    ref = R.linear(x.double(), w.double(), None if b is None else b.double(),
                   [None, "gelu", "gelu_tanh", "relu"][act])
    torch.testing.assert_close(y, ref.float(), atol=1e-5, rtol=1e-5)


def test_packed_gemm_errors():
    w = torch.randn(30, 16)
    pw = ext().linear_pack(w)
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="does not match"):
        ext().linear_packed(x, pw, None, 3 * pw.shape[2], 0)  # 3 panels, not the 1 or 2 of 30 rows
    with pytest.raises(ValueError, match="panel must be"):
        ext().linear_pack(w, 16)
    with pytest.raises(ValueError, match="linear_pack"):
        ext().linear_packed(x, torch.zeros(2, 16, 16), None, 30, 0)  # a panel width the kernel does not have
    with pytest.raises(ValueError, match="x must be"):
        ext().linear_packed(torch.randn(3, 15), pw, None, 30, 0)  # K differs
    with pytest.raises(ValueError, match="linear_pack"):
        ext().linear_packed(x, w, None, 30, 0)  # not packed
    with pytest.raises(TypeError, match="float32"):
        ext().linear_pack(w.double())
    with pytest.raises(ValueError, match="act"):
        ext().linear_packed(x, pw, None, 30, 5)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_engine_decode_step_same_with_and_without(preset, monkeypatch):
    torch.manual_seed(0)
    cfg = resolve_config(preset)
    model = M.GPT(cfg).eval()
    lens = [1, 17, 33, 80]
    g = torch.Generator().manual_seed(1)
    kv = [paged_batch(lens, cfg.n_kv_head, cfg.head_dim, g, bs=BS, pad_last=True) for _ in range(cfg.n_layer)]
    _, _, table, seq_lens, slots = kv[0]
    meta = L.StepMeta(slot_mapping=slots, block_table=table, seq_lens=seq_lens,
                      cu_seqlens_q=torch.arange(len(lens) + 1, dtype=torch.int32),
                      cu_seqlens_k=torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).int(), max_seqlen_q=1,
                      max_seqlen_k=max(lens), decode=True)
    ids, pos = torch.randint(0, cfg.vocab_size, (len(lens),), generator=g), seq_lens.long() - 1
    caches = [(kc.clone(), vc.clone()) for kc, vc, *_ in kv]
    assert model.pack_for_cpu() and all(layer.packed is not None for layer in model.layers)
    calls = []
    monkeypatch.setattr(L, "decode_layer", lambda *a, **k: calls.append(1) or decode_layer(*a, **k))
    fused = model.step(ids, pos, caches, meta)
    assert len(calls) == cfg.n_layer  # every layer took the one-call path
    for mod in (L, F):  # no fused layer, packed GEMM, in-place rope or one-pass SwiGLU
        monkeypatch.setattr(mod, "decode_layer_applies", lambda *a: False)
    plain_caches = [(kc.clone(), vc.clone()) for kc, vc, *_ in kv]
    plain = model.step(ids, pos, plain_caches, meta)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for (a, b), (c, d) in zip(caches, plain_caches):  # llama's RoPE loop may round differently (FMA)
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(b, d, atol=1e-6, rtol=1e-5)


def test_packed_linear():
    g = torch.Generator().manual_seed(3)
    w, b, x = torch.randn(37, 20, generator=g), torch.randn(37, generator=g), torch.randn(6, 20, generator=g)
    p = pack_linear(w)
    torch.testing.assert_close(packed_linear(x, p, b, "gelu"), R.linear(x, w, b, "gelu"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_linear(x, p), R.linear(x, w), atol=1e-5, rtol=1e-5)
    assert pack_linear(w.double()) is None
    with pytest.raises(TypeError, match="pack_linear"):
        packed_linear(x, w)
    with pytest.raises(ValueError, match="activation"):
        packed_linear(x, p, activation="tanh")
    torch.testing.assert_close(packed_linear(x[None, :, None], p), R.linear(x, w)[None, :, None], atol=1e-5,
                               rtol=1e-5)  # leading dims kept
    with pytest.raises(TypeError, match="CPU float32"):
        packed_linear(x.double(), p)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_model_packed_matches_unpacked(preset, monkeypatch):
    """After pack_for_cpu, inference runs every GEMM packed (and llama's SwiGLU in one pass)."""
    torch.manual_seed(0)
    model = M.GPT(resolve_config(preset)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 21))
    h = torch.randn(5, model.config.d_model)
    with torch.no_grad():
        ref, ref_h = model(ids), model.logits(h)
        assert len(model.pack_for_cpu()) == 4 * model.config.n_layer + 1
        calls = []
        monkeypatch.setattr(F, "packed_linear", lambda *a, **k: calls.append(1) or packed_linear(*a, **k))
        torch.testing.assert_close(model(ids), ref, atol=1e-5, rtol=1e-5)
        assert len(calls) == 4 * model.config.n_layer + 1
        torch.testing.assert_close(model.logits(h), ref_h, atol=1e-5, rtol=1e-5)
    assert model.logits(h).requires_grad  # with grad on, the differentiable path
    assert model(ids).requires_grad


@pytest.mark.parametrize("ff", [9, 16, 3])  # the 8-wide body, with and without a tail
def test_glu(ff):
    g = torch.Generator().manual_seed(ff)
    f = torch.randn(3, 5, 2 * ff, generator=g) * 4
    f[0, 0, :ff] = torch.linspace(-30, 30, ff)  # the gates' far tails
    gate, up = f.chunk(2, dim=-1)
    fn = torch.nn.functional
    for act, want in (("silu", fn.silu(gate) * up), ("gelu_tanh", fn.gelu(gate, approximate="tanh") * up)):
        got = glu(f, act)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # torch's own fp32 form
        torch.testing.assert_close(got, R.glu(f.double(), act).float(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(R.glu(f, act), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(glu(f), glu(f, "silu"), atol=0, rtol=0)
    with pytest.raises(ValueError, match="even width"):
        glu(f[..., :-1])
    with pytest.raises(TypeError, match="float32"):
        glu(f.double())
    with pytest.raises(ValueError, match="activation"):
        glu(f, "gelu")


# half the rotated dims 16, 10 and 3: the AVX2 loop's 8-wide body, with and without a tail
@pytest.mark.parametrize("d,fraction", [(32, 1.0), (40, 0.5), (24, 0.25)])
def test_rope_matches_the_model_rotary(d, fraction):
    from gpt_engine.models.rope import Rotary
    cfg = resolve_config("llama-tiny", n_head=5, n_kv_head=1, d_model=5 * d, rotary_fraction=fraction)
    rot = Rotary(cfg)
    torch.manual_seed(0)
    t = torch.randn(2, 7, 7, d)  # (B, T, heads, D): rotate the first 6 (q and k), leave v
    pos = torch.randint(0, cfg.max_seq_len, (2, 7))
    want = torch.cat([rot(t[..., :6, :], pos), t[..., 6:, :]], dim=-2)
    got = rope_(t.clone(), rot.cos[pos], rot.sin[pos], 6)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="CPU float32"):
        rope_(t.double(), rot.cos[pos], rot.sin[pos], 6)
    with pytest.raises(ValueError, match="heads"):
        rope_(t.clone(), rot.cos[pos], rot.sin[pos], 8)
    with pytest.raises(ValueError, match="cos"):
        rope_(t.clone(), rot.cos[pos][..., :-1], rot.sin[pos], 6)
    torch.testing.assert_close(R.rope_(t.clone(), rot.cos[pos], rot.sin[pos], 6), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("d,r", [(32, 8), (32, 16), (64, 16), (20, 6), (32, 32), (32, 0)])
def test_partial_rope(d, r):
    """Partial rotary (GPT-NeoX's rotary_pct, Phi): rotate_half within each head's first r dims, the
    rest kept; HF's form (cos, sin of width r, cat(freqs, freqs)) by hand, and the reference."""
    g = torch.Generator().manual_seed(d + r)
    t = torch.randn(2, 7, 5, d, generator=g)  # (B, T, heads, D): rotate the first 4
    ang = torch.rand(2, 7, r // 2, generator=g) * 100
    cos, sin = ang.cos(), ang.sin()
    c, s = torch.cat([cos, cos], -1)[..., None, :], torch.cat([sin, sin], -1)[..., None, :]
    x = t[..., :4, :r]
    rotated = x * c + torch.cat([-x[..., r // 2:], x[..., :r // 2]], -1) * s
    want = t.clone()
    want[..., :4, :r] = rotated
    got = rope_(t.clone(), cos, sin, 4)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(R.rope_(t.clone(), cos, sin, 4), want, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[..., :4, r:], t[..., :4, r:]) and torch.equal(got[..., 4:, :], t[..., 4:, :])
    with pytest.raises(ValueError, match="R/2 <= D/2"):
        rope_(t.clone(), torch.ones(2, 7, d // 2 + 1), torch.ones(2, 7, d // 2 + 1), 4)
    with pytest.raises(ValueError, match="cos and sin"):
        rope_(t.clone(), cos, sin[..., :-1] if r else torch.ones(2, 7, 1), 4)


def lora_slots_for(C, H, D, ff, act, L, W, g, n_tokens, skip=()):
    """LoRA A (L, W, K) and B (L, W, N) for the layer's four GEMMs (None, None for those in skip)."""
    hkv = H  # the cases below use no GQA
    shapes = [(C, (H + 2 * hkv) * D), (H * D, C), (C, 2 * ff if act == "swiglu" else ff), (ff, C)]
    lora = []
    for i, (k, n) in enumerate(shapes):
        lora += [None, None] if i in skip else [torch.randn(L, W, k, generator=g) * 0.2,
                                                 torch.randn(L, W, n, generator=g) * 0.2]
    return lora


@pytest.mark.parametrize("act, parallel, skip", [("gelu", 0, ()), ("swiglu", 0, (1,)), ("gelu_tanh", 1, (0, 3)),
                                                 ("relu", 2, ())])
def test_lora_updates_match_the_reference(act, parallel, skip):
    """Each token's own adapter (or none: slot -1) in every adapted GEMM, before its activation, as
    kernels.reference.decode_layer composes it; a GEMM without adapters is left alone."""
    C, H, D, ff = 64, 2, 32, 96
    g = torch.Generator().manual_seed(7)
    weights = list(layer_weights(C, H, H, D, ff, True, act == "swiglu", g))
    if parallel == 2:
        weights[6] = weights[7] = None
    lens = [3, 17, 9, 30, 1, 12]
    kc, vc, table, seq_lens, slots = paged_batch(lens, H, D, g, bs=BS, pad_last=True)
    x, res = torch.randn(len(lens), C, generator=g), torch.randn(len(lens), C, generator=g)
    args = (table, seq_lens, None, H, 1e-5, False, act, 1 / math.sqrt(D))
    lora = lora_slots_for(C, H, D, ff, act, 3, 5, g, len(lens), skip)
    lora_slots = torch.tensor([2, -1, 0, 2, 1, 0])
    with torch.no_grad():
        got = decode_layer(x, res, pack_layer(weights), kc.clone(), vc.clone(), slots, *args, parallel=parallel,
                           lora=lora, lora_slots=lora_slots)
        want = R.decode_layer(x, res, weights, kc.clone(), vc.clone(), slots, *args, parallel=parallel,
                              lora=lora, lora_slots=lora_slots)
        base = decode_layer(x, res, pack_layer(weights), kc.clone(), vc.clone(), slots, *args, parallel=parallel)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    moved = (got[0] - base[0]).abs().amax(1) > 1e-3
    assert moved.tolist() == [s >= 0 for s in lora_slots.tolist()]  # the base model's token is untouched


@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh", "relu"])
def test_lora_add_matches_reference(act):
    """kernels.lora_add_ over odd widths (K, N off the vector width, W 3), slots in any order and -1,
    several tokens of one slot (a task's four and more)."""
    from gpt_engine.kernels import lora_add_
    g = torch.Generator().manual_seed(3)
    M, K, N, L, W = 11, 21, 37, 4, 3
    x, y = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    a, b = torch.randn(L, W, K, generator=g), torch.randn(L, W, N, generator=g)
    slots = torch.tensor([3, 3, -1, 0, 3, 3, 3, 1, -1, 3, 0])
    got = lora_add_(y.clone(), x, a, b, slots, act)
    torch.testing.assert_close(got, R.lora_add_(y.double(), x.double(), a.double(), b.double(), slots, act).float(),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"lora_slots\[1\] = 4 is outside \[-1, 4\)"):
        lora_add_(y.clone(), x, a, b, torch.tensor([0, 4] + [0] * 9), act)
    with pytest.raises(ValueError, match="LoRA A and B"):
        lora_add_(y.clone(), x, a[:, :, 1:], b, slots, act)
    with pytest.raises(TypeError, match="int64"):
        lora_add_(y.clone(), x, a, b, slots.int(), act)
    with pytest.raises(ValueError, match="activation"):
        lora_add_(y.clone(), x, a, b, slots, "silu")


def test_lora_argument_errors():
    C, H, D, ff = 64, 2, 32, 96
    g = torch.Generator().manual_seed(1)
    weights = layer_weights(C, H, H, D, ff, True, False, g)
    kc, vc, table, seq_lens, slots = paged_batch([3, 5], H, D, g, bs=BS, pad_last=True)
    x = torch.randn(2, C)
    lora = lora_slots_for(C, H, D, ff, "gelu", 2, 4, g, 2)

    def call(lora=lora, lora_slots=torch.tensor([0, 1])):
        return decode_layer(x, None, pack_layer(weights), kc, vc, slots, table, seq_lens, None, H, 1e-5, False,
                            "gelu", 0.1, lora=lora, lora_slots=lora_slots)
    with torch.no_grad():
        with pytest.raises(ValueError, match="8 tensors"):
            call(lora=lora[:6])
        with pytest.raises(ValueError, match="lora_slots with lora"):
            call(lora_slots=None)
        with pytest.raises(ValueError, match="give both or neither"):
            call(lora=[None] + lora[1:])
        with pytest.raises(ValueError, match=r"outside \[-1, 2\)"):
            call(lora_slots=torch.tensor([0, 2]))
        with pytest.raises(ValueError, match=r"\(L, W, 96\)"):  # fc2's A must take the MLP's width
            call(lora=lora[:6] + [lora[6][:, :, :90], lora[7]])
