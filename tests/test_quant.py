"""Weight formats: int8 weight-only quantisation (kernels.quant), the packed CPU GEMM and decode layer
on bf16 / int8 weights (csrc/quant_cpu.cpp), the Triton w8a16 GEMM under the interpreter, and the
engine's LLM(dtype=..., quantization="int8") wiring; each against kernels.reference."""
from __future__ import annotations

import pytest
import torch

import gpt_engine.models.formats as F
import gpt_engine.models.gpt as M
from gpt_engine.models.layers import Linear
from gpt_engine import LLM, ModelConfig, SamplingParams
from gpt_engine.models.presets import resolve_config
from gpt_engine.engine_config import EngineConfig
from gpt_engine.kernels import (QuantizedWeight, decode_layer, dequantize, linear_int8, linear_w8a8, pack_layer,
                                pack_linear, packed_linear, packed_rows, quantize_int8, unpack_linear)
from gpt_engine.kernels import reference as R
from gpt_engine.kernels._ext import ext

from .helpers import FAMILY_CASES, layer_weights, paged_batch

ACTS = [None, "gelu", "gelu_tanh", "relu"]
PANELS = [24, 48]


def _panel(panel):
    if panel not in ext().linear_panels():
        pytest.skip(f"this CPU packs {ext().linear_panels()}")


# ---- quantisation

@pytest.mark.parametrize("group", [None, 32, 64, 128])
def test_quantize_roundtrip(group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 256, generator=g)
    w[3] = 0  # an all-zero row: scale 1, q 0
    qw = quantize_int8(w, group)
    gs = group or 256
    assert qw.q.dtype == torch.int8 and qw.scale.shape == (37, 256 // gs) and qw.group_size == gs
    assert qw.q.abs().max() <= 127 and (qw.q[3] == 0).all()
    d = dequantize(qw)
    err = (d - w).abs().reshape(37, -1, gs)
    assert (err <= qw.scale[..., None] / 2 + 1e-7).all()  # round to nearest
    # every group reaches +-127 unless it is all zero
    amax = qw.q.reshape(37, -1, gs).abs().amax(-1)
    assert ((amax == 127) | (w.reshape(37, -1, gs).abs().amax(-1) == 0)).all()
    torch.testing.assert_close(d, R.dequantize_int8(*R.quantize_int8(w, group)), atol=0, rtol=0)


def test_quantize_errors():
    w = torch.randn(8, 96)
    for bad in (0, 7, 64, True, 2.0):
        with pytest.raises(ValueError, match="group_size"):
            quantize_int8(w, bad)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(w[0])
    with pytest.raises(TypeError, match="QuantizedWeight"):
        linear_int8(torch.randn(2, 96), w)
    qw = quantize_int8(w, 32)
    with pytest.raises(ValueError, match="x must be"):
        linear_int8(torch.randn(2, 95), qw)
    with pytest.raises(ValueError, match="w.scale"):
        linear_int8(torch.randn(2, 96), QuantizedWeight(qw.q, qw.scale, 16))
    with pytest.raises(ValueError, match="bias"):
        linear_int8(torch.randn(2, 96), qw, torch.zeros(9))


# ---- the packed CPU GEMM on bf16 and int8 weights, every panel width this CPU runs

# (M, N, K, group): rows not a multiple of the 4- or 8-row tile, N not of the 24- or 48-row panel,
# K odd (per channel), more rows than one 128-row block, groups of 32..128
SHAPES = [(1, 1, 1, None), (5, 23, 7, None), (13, 47, 67, None), (3, 97, 96, 32), (17, 50, 192, 64),
          (131, 61, 256, 128), (8, 768, 256, None)]


@pytest.mark.parametrize("M,N,K,group", SHAPES)
@pytest.mark.parametrize("act", [0, 1, 3])
@pytest.mark.parametrize("panel", PANELS)
def test_packed_int8(M, N, K, group, act, panel):
    _panel(panel)
    g = torch.Generator().manual_seed(M * N + K)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g)
    qw = quantize_int8(w, group)
    p = pack_linear(qw, panel)
    assert p.weight.dtype == torch.int8 and p.weight.shape[-1] == panel
    y = packed_linear(x, p, b if act else None, ACTS[act])
    ref = R.linear_int8(x.double(), qw.q, qw.scale, b.double() if act else None, ACTS[act])
    torch.testing.assert_close(y, ref.float(), atol=1e-5, rtol=1e-5)


# w8a8: K and groups in multiples of 32 (the activation blocks)
SHAPES_A8 = [(1, 1, 32, None), (5, 23, 64, None), (3, 97, 96, 32), (17, 50, 192, 64), (131, 61, 256, 128),
             (8, 768, 256, None), (4, 49, 768, 32)]


@pytest.mark.parametrize("M,N,K,group", SHAPES_A8)
@pytest.mark.parametrize("act", [0, 1, 3])
@pytest.mark.parametrize("panel", PANELS)
def test_packed_w8a8(M, N, K, group, act, panel):
    """Panel 48 runs the AVX-512 VNNI kernel where the CPU has it, 24 the plain loop: both the reference's
    arithmetic, including all-zero activation blocks (scale 0) and outliers confined to their block."""
    _panel(panel)
    g = torch.Generator().manual_seed(M * N + K + 7)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g)
    x[0, :32] = 0
    x[-1, -1] = 40.0
    qw = quantize_int8(w, group)
    p = pack_linear(qw, panel, int8_activations=True)
    assert p.weight.dtype == torch.uint8 and p.weight.shape[-1] == panel
    y = packed_linear(x, p, b if act else None, ACTS[act])
    ref = R.linear_w8a8(x, qw.q, qw.scale, b if act else None, ACTS[act])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear_w8a8(x, qw, b if act else None, ACTS[act]), ref, atol=0, rtol=0)
    # the activation quantisation is what separates it from weight-only int8: close, not equal
    wo = R.linear_int8(x.double(), qw.q, qw.scale, b.double() if act else None, ACTS[act]).float()
    assert (y - wo).abs().max() < 0.05 * wo.abs().max() + 1e-3


def test_quantize_act32():
    x = torch.tensor([[0.0] * 32 + [1.0, -2.0, 0.5] + [0.0] * 29])
    qx, sx = R.quantize_act32(x)
    assert sx[0, 0] == 0 and not qx[0, :32].any()
    assert sx[0, 1] == pytest.approx(2 / 127) and qx[0, 32:35].tolist() == [64, -127, 32]  # 63.5 -> 64 (half even)


def test_w8a8_errors():
    qw = quantize_int8(torch.randn(8, 48))
    with pytest.raises(ValueError, match="multiples of 32"):
        pack_linear(qw, int8_activations=True)
    with pytest.raises(ValueError, match="multiples of 32"):
        pack_linear(quantize_int8(torch.randn(8, 64), 16), int8_activations=True)
    with pytest.raises(ValueError, match="multiples of 32"):
        pack_linear(torch.randn(8, 64), int8_activations=True)
    model = M.GPT(resolve_config("gpt2-tiny", d_model=48, n_head=6))
    with pytest.raises(ValueError, match="multiples of 32"):
        model.set_weight_format(None, "w8a8")


@pytest.mark.parametrize("M,N,K,group", SHAPES)
@pytest.mark.parametrize("act", [0, 2])
@pytest.mark.parametrize("panel", PANELS)
def test_packed_bf16(M, N, K, group, act, panel):
    _panel(panel)
    g = torch.Generator().manual_seed(M * N + K + 1)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g)
    wb = w.bfloat16()
    p = pack_linear(wb, panel)
    assert p.weight.dtype == torch.bfloat16
    y = packed_linear(x, p, b, ACTS[act])
    ref = R.linear(x.double(), wb.double(), b.double(), ACTS[act])  # the bf16 values, widened exactly
    torch.testing.assert_close(y, ref.float(), atol=1e-5, rtol=1e-5)


def test_packed_low_errors():
    qw = quantize_int8(torch.randn(30, 64), 32)
    p = pack_linear(qw)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 64\)"):
        ext().linear_packed(torch.randn(3, 32), p.weight, None, 30, 0)  # K differs
    with pytest.raises(ValueError, match="does not match"):
        ext().linear_packed(torch.randn(3, 64), p.weight, None, 100, 0)
    with pytest.raises(ValueError, match="pack_linear"):
        ext().linear_packed(torch.randn(3, 64), p.weight[..., :16].contiguous(), None, 30, 0)  # no such width
    with pytest.raises(ValueError, match="panel"):
        pack_linear(qw, 16)


@pytest.mark.parametrize("fmt", ["int8", "int8-g32", "bf16"])
@pytest.mark.parametrize("case", [(64, 2, 2, 32, 96, True, "gelu"), (128, 4, 1, 32, 160, False, "swiglu")])
def test_decode_layer_low(case, fmt, torch_cpu_path):
    """decode_layer on bf16 / int8 packed GEMM weights vs the reference on the weights they stand for."""
    C, H, Hkv, D, ff, bias, act = case
    g = torch.Generator().manual_seed(5)
    w = list(layer_weights(C, H, Hkv, D, ff, bias, act == "swiglu", g))
    given, ref_w = list(w), list(w)
    for i in (2, 4, 8, 10):
        if fmt == "bf16":
            given[i] = w[i].bfloat16()
            ref_w[i] = given[i].float()
        else:
            qw = quantize_int8(w[i], 32 if fmt == "int8-g32" else None)
            given[i], ref_w[i] = qw, dequantize(qw)
    layer = pack_layer([pack_linear(t) if i in (2, 4, 8, 10) else t for i, t in enumerate(given)])
    assert layer is not None
    lens = [1, 17, 40]
    kc, vc, table, seq_lens, slots = paged_batch(lens, Hkv, D, g)
    x, res = torch.randn(len(lens), C, generator=g), torch.randn(len(lens), C, generator=g)
    rope = None
    args = (H, 1e-5, act == "swiglu", act, D ** -0.5)
    kc2, vc2 = kc.clone(), vc.clone()
    with torch.no_grad():
        y, r = decode_layer(x, res, layer, kc, vc, slots, table, seq_lens, rope, *args)
        yr, rr = R.decode_layer(x, res, ref_w, kc2, vc2, slots, table, seq_lens, rope, *args)
    torch.testing.assert_close(y, yr, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r, rr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc, kc2, atol=1e-5, rtol=1e-5)


# ---- Triton w8a16 under the interpreter (conftest sets TRITON_INTERPRET=1)

@pytest.mark.parametrize("M,N,K,group", [(1, 50, 96, 32), (5, 130, 80, None), (17, 64, 256, 128), (33, 7, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", [None, "gelu"])
def test_triton_w8a16(M, N, K, group, dtype, act, monkeypatch):
    import gpt_engine.kernels.triton_w8a16 as T
    calls = []
    real = T.w8a16
    monkeypatch.setattr(T, "w8a16", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(M + N + K)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g)
    qw = quantize_int8(w, group)
    y = linear_int8(x.to(dtype), qw, b.to(dtype), act)
    assert calls and y.dtype == dtype and y.shape == (M, N)
    ref = R.linear_int8(x.double(), qw.q, qw.scale, b.double(), act)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    else:  # within 2x the error of torch's own fp16 GEMM on the dequantised weight, plus a small atol
        torch_err = (R.ACTIVATIONS[act](torch.nn.functional.linear(x.half(), dequantize(qw, torch.float16),
                                                                   b.half()).double()) - ref).abs().max()
        assert (y.double() - ref).abs().max() <= 2 * torch_err + 2e-3


# ---- the engine

def test_engine_config():
    assert EngineConfig(quantization="int8", quantization_group_size=64).quantization == "int8"
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int4")
    with pytest.raises(ValueError, match="needs quantization"):
        EngineConfig(quantization_group_size=64)
    with pytest.raises(ValueError, match="quantization_group_size"):
        EngineConfig(quantization="int8", quantization_group_size=0)


def test_cli_flags():
    import argparse

    from gpt_engine.cli.flags import add_dataclass_args, from_args
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, EngineConfig)
    cfg = from_args(EngineConfig, parser.parse_args(["--quantization", "int8", "--quantization-group-size", "64",
                                                     "--dtype", "bfloat16"]))
    assert (cfg.quantization, cfg.quantization_group_size, cfg.dtype) == ("int8", 64, "bfloat16")


FORMATS = [dict(quantization="int8"), dict(quantization="int8", quantization_group_size=32),
           dict(quantization="w8a8"), dict(quantization="w8a8", quantization_group_size=64),
           dict(dtype="bfloat16"), dict(dtype=torch.float16)]


@pytest.mark.parametrize("preset,fmt", [*((p, f) for p in ("gpt2-tiny", "llama-tiny") for f in FORMATS),
                                        *((name, f) for name in FAMILY_CASES for f in FORMATS[::2])])
def test_llm_weight_formats(preset, fmt, torch_cpu_path, monkeypatch):
    """LLM quantises / rounds at load, keeps float32 compute and KV cache on CPU, runs the packed
    int8 / bf16 GEMMs, and its greedy tokens are the dense model's on the weights they stand for."""
    torch.manual_seed(0)
    if preset in FAMILY_CASES:
        kind, shape = FAMILY_CASES[preset]
        cfg = ModelConfig(model_type=kind.split("-")[0], n_layer=2, vocab_size=256, max_seq_len=64,
                          tie_embeddings=False, **shape)
    else:
        cfg = resolve_config(preset)
    model = M.GPT(cfg).eval()
    ref = M.GPT(cfg).eval()
    ref.load_state_dict(model.state_dict())
    llm = LLM(model, device="cpu", max_num_seqs=4, **fmt)
    assert next(llm.model.parameters()).dtype == torch.float32 and llm.runner.kv.dtype == torch.float32
    want = torch.uint8 if fmt.get("quantization") == "w8a8" else torch.int8 if "quantization" in fmt else \
        torch.bfloat16 if fmt.get("dtype") == "bfloat16" else torch.float32  # fp16: no packed format, values rounded
    assert llm.model.layers[0].attn.qkv.format.packed.weight.dtype == want
    # the reference: the same formats applied to a plain copy, run densely with no packing
    wd = {"bfloat16": torch.bfloat16}.get(fmt.get("dtype"), fmt.get("dtype"))
    ref.set_weight_format(wd, fmt.get("quantization"), fmt.get("quantization_group_size"))
    assert [n for n, _ in llm.model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for a, b in zip(llm.model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    linears = [(a, b) for a, b in zip(llm.model.modules(), ref.modules()) if isinstance(a, Linear)]
    for a, b in linears:  # the GEMM weights, from the packed copy and from the reference's own format
        torch.testing.assert_close(a.format.dense_weight(torch.float32), b.format.dense_weight(torch.float32), atol=0,
                                   rtol=0)
    prompts = [[1, 2, 3, 4, 5], [7] * 11, [9, 3]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            ids = list(p)
            for _ in range(6):
                ids.append(int(ref(torch.tensor([ids]))[0, -1].argmax()))
            assert o.token_ids == ids[len(p):]


def test_formats_per_layer(torch_cpu_path):
    """Each GEMM holds one format object: the float parameter by default, the engine's packed copy
    of its int8 weight once LLM quantised it (released: the pack is the only copy)."""
    torch.manual_seed(0)
    model = M.GPT(resolve_config("gpt2-tiny")).eval()
    assert all(type(m.format) is F.Dense for m in model.linears()) and type(model.head) is F.Dense
    llm = LLM(model, device="cpu", max_num_seqs=2, quantization="int8", quantization_group_size=32)
    for f in (*(m.format for m in llm.model.linears()), llm.model.head):
        assert type(f) is F.Packed and f.released and type(f.base()) is F.Int8
        assert f.base().q.group_size == 32 and f.held() == ()
    assert all(m.weight is None for m in llm.model.linears())


@pytest.mark.parametrize("rows,streams", [(5, True), (100, False)])
def test_int8_with_its_parameter(rows, streams, monkeypatch):
    """Where the parameter stays (GPU models), it holds the dequantised values: decode-sized batches
    stream the int8 weight (Triton w8a16, here under the interpreter), larger ones run its dense GEMM."""
    import gpt_engine.kernels.triton_w8a16 as T
    calls = []
    real = T.w8a16
    monkeypatch.setattr(T, "w8a16", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    m = Linear(64, 48, bias=True, activation="gelu")
    with torch.no_grad():
        m.format = F.weight_format(m, quantization="int8", group_size=32)
        assert type(m.format) is F.Int8 and not m.format.released
        assert torch.equal(m.weight, dequantize(m.format.q))
        x = torch.randn(rows, 64)
        y = m(x)
    assert bool(calls) == streams
    torch.testing.assert_close(y, R.linear(x, dequantize(m.format.q), m.bias, "gelu"), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="w8a8"):  # only ever released, on CPU float32 models
        F.weight_format(Linear(64, 48, bias=False), quantization="w8a8")


# ---- memory: an int8 / bf16 model holds its GEMM weights in that format only


def _formats(w):
    return {"fp32": (w, False), "bf16": (w.bfloat16(), False), "int8": (quantize_int8(w), False),
            "int8-g32": (quantize_int8(w, 32), False), "w8a8": (quantize_int8(w), True),
            "w8a8-g32": (quantize_int8(w, 32), True)}


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int8-g32", "w8a8", "w8a8-g32"])
@pytest.mark.parametrize("panel", PANELS)
def test_unpack_linear_roundtrip(fmt, panel):
    _panel(panel)
    w = torch.randn(100, 64)  # 100 rows: the last panel is part padding
    given, a8 = _formats(w)[fmt]
    back = unpack_linear(pack_linear(given, panel, int8_activations=a8))
    if isinstance(given, QuantizedWeight):
        assert torch.equal(back.q, given.q) and torch.equal(back.scale, given.scale)
        assert back.group_size == given.group_size
    else:
        assert back.dtype == given.dtype and torch.equal(back, given)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int8-g32", "w8a8", "w8a8-g32"])
@pytest.mark.parametrize("panel", PANELS)
def test_packed_rows(fmt, panel):
    """A tied embedding's lookup from the packed head: the rows it stands for, dequantised."""
    _panel(panel)
    w = torch.randn(100, 64)
    given, a8 = _formats(w)[fmt]
    dense = dequantize(given) if isinstance(given, QuantizedWeight) else given.float()
    ids = torch.tensor([[0, 99, 47], [48, 23, 0]])  # both ends, both sides of a panel edge, repeats
    packed = pack_linear(given, panel, int8_activations=a8)
    got = packed_rows(packed, ids)
    assert got.shape == (2, 3, 64) and got.dtype == torch.float32
    assert torch.equal(got, dense[ids])
    assert packed_rows(packed, torch.zeros(0, dtype=torch.long)).shape == (0, 64)
    for bad in (100, -1):
        with pytest.raises(ValueError, match="row ids"):
            packed_rows(packed, torch.tensor([3, bad]))


def _gemm_param_bytes(model):
    return sum(m.weight.numel() * 4 for m in model.layers.modules() if isinstance(m, Linear))


@pytest.mark.parametrize("fmt,most", [(dict(quantization="int8"), 0.35), (dict(quantization="w8a8"), 0.35),
                                      (dict(dtype="bfloat16"), 0.55)])
def test_low_formats_release_float32_gemm_weights(fmt, most, torch_cpu_path):
    """On CPU an int8 (bf16) model's GEMM weights take about a quarter (half) of their float32
    bytes: the packed copy is their only copy. Paths without the packed kernel still compute on the
    same values; training and a state dict are refused, not silently wrong."""
    torch.manual_seed(0)
    cfg = resolve_config("gpt2-tiny")
    fp32_gemm = _gemm_param_bytes(M.GPT(cfg))
    model = M.GPT(cfg).eval()
    llm = LLM(model, device="cpu", max_num_seqs=2, **fmt)
    mem = llm.model.memory_bytes()
    assert mem["gemm"] < most * fp32_gemm, (mem, fp32_gemm)
    assert mem["stored"] == 0  # after packing nothing but the pack
    # the (tied) head too: the whole model, not just its layers, shrinks
    fp32_all = sum(t.numel() * 4 for t in (*M.GPT(cfg).parameters(), *M.GPT(cfg).buffers()))
    assert llm.model.head_weight is None and llm.model.tok_emb.weight is None
    assert mem["params"] + mem["packed"] < most * fp32_all, (mem, fp32_all)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        packed = llm.model(ids)
    with torch.enable_grad():  # not the packed kernel's case: the weights are rebuilt from the packs
        dense = llm.model(ids)
    torch.testing.assert_close(dense, packed, atol=1e-4, rtol=1e-4)
    llm.model.train()
    with pytest.raises(RuntimeError, match="cannot be trained"):
        llm.model(ids).sum().backward()
    with pytest.raises(RuntimeError, match="state dict"):
        llm.model.state_dict()
    llm.model.eval()
    again = LLM(model, device="cpu", max_num_seqs=2, **fmt)  # a second engine over the same module
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert again.generate([[1, 2, 3]], sp)[0].token_ids == llm.generate([[1, 2, 3]], sp)[0].token_ids
    with pytest.raises(ValueError, match="load the model again"):
        model.set_weight_format(None, "int8", 32)


def test_loaded_fp32_model_holds_gemm_weights_once(tmp_path, torch_cpu_path):
    """A model the engine loads itself keeps its float32 GEMM weights (the head's too) only in the
    packs; outputs as the module it was saved from."""
    from gpt_engine.models.save import save_model
    torch.manual_seed(0)
    cfg = resolve_config("gpt2-tiny")
    model = M.GPT(cfg).eval()
    save_model(model, tmp_path)
    fp32_gemm = _gemm_param_bytes(model)
    llm = LLM(str(tmp_path), device="cpu", max_num_seqs=2)
    mem = llm.model.memory_bytes()
    assert mem["gemm"] <= 1.15 * fp32_gemm and mem["stored"] == 0, (mem, fp32_gemm)  # panel padding only
    assert llm.model.head_weight is None
    ref = LLM(model, device="cpu", max_num_seqs=2)  # a given module keeps its parameters
    assert model.head_weight is not None and model.layers[0].attn.qkv.weight is not None
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5], [7] * 11]
    assert [o.token_ids for o in llm.generate(prompts, sp)] == [o.token_ids for o in ref.generate(prompts, sp)]
    with torch.no_grad():
        torch.testing.assert_close(llm.model(torch.tensor([[1, 2, 3]])), model(torch.tensor([[1, 2, 3]])),
                                   atol=1e-5, rtol=1e-5)


def test_cli_reports_bad_format_flags(tmp_path, capsys):
    from gpt_engine.cli import main
    from gpt_engine.models.save import save_model
    save_model(M.GPT(resolve_config("gpt2-tiny")), tmp_path)
    for flags, msg in ((["--quantization", "w8a8", "--quantization-group-size", "48"], "multiples of 32"),
                       (["--quantization", "int8", "--quantization-group-size", "48"], "divisor")):
        assert main(["generate", str(tmp_path), "--prompt", "x", "--max-tokens", "2", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gpt-engine generate: error:") and msg in err and "Traceback" not in err
