"""Trainer: loss falls, exact resume, DDP/FSDP == one process, HF parity, fine-tuning masks, errors."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gpt_engine.train.checkpoint import latest_checkpoint
from gpt_engine.train.config import TrainConfig, lr_at
from gpt_engine.train.losses import chunked_cross_entropy
from gpt_engine.train.model import pad_vocab
from gpt_engine.train.trainer import train

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # héllo wörld ✓\n\n" for i in range(400))


def tiny_config(path, model_type="gpt2", **kw):
    d = dict(model_type=model_type, n_layer=2, n_head=2, d_model=64, max_seq_len=64, vocab_size=300, **kw)
    if model_type == "llama":
        d.update(n_kv_head=1, bias=False, activation="silu", norm_eps=1e-5)
    path.write_text(json.dumps(d))
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


def cfg_for(tmp_path, corpus, name="run", **kw):
    base = dict(out=str(tmp_path / name), data=str(corpus), model=tiny_config(tmp_path / "cfg.json"), steps=6,
                batch_size=4, seq_len=32, lr=3e-3, warmup=2, eval_every=3, eval_iters=1, sample_tokens=4,
                progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def read_log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]


def train_losses(out):
    return [r["loss"] for r in read_log(out) if "loss" in r]


# --- chunked cross-entropy ------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_ce_matches_torch(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (2, 37), generator=g)
    t[:, ::5] = -100
    loss = chunked_cross_entropy(h, w, t, chunk_size=chunk)
    (loss * 0.5).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy((h2 @ w2.t()).flatten(0, 1), t.flatten(), reduction="sum")
    (ref * 0.5).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_chunked_ce_fp32_and_no_grad():
    h, w = torch.randn(20, 8), torch.randn(30, 8)
    t = torch.randint(0, 30, (20,))
    with torch.no_grad():
        got = chunked_cross_entropy(h, w, t, chunk_size=6)
    torch.testing.assert_close(got, F.cross_entropy(h @ w.t(), t, reduction="sum"))
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(h, w, t[:5])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_ce_low_precision(dtype, device):
    """bf16/fp16 (on CUDA the weight gradient is summed over chunks by the GEMM in fp32): loss and
    gradients as close to the fp32 reference as torch's own low-precision head + CE gets."""
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(3, 700, 64, device=device, generator=g)
    w = torch.randn(1000, 64, device=device, generator=g) * 0.1
    t = torch.randint(0, 1000, (3, 700), device=device, generator=g)
    t[:, ::7] = -100

    def run(fn, dt):
        hh, ww = h.to(dt).detach().requires_grad_(), w.to(dt).detach().requires_grad_()
        loss = fn(hh, ww)
        loss.backward()
        return loss.float(), hh.grad.float(), ww.grad.float()
    ours = run(lambda hh, ww: chunked_cross_entropy(hh, ww, t, chunk_size=256), dtype)
    ref = run(lambda hh, ww: F.cross_entropy((hh @ ww.t()).float().flatten(0, 1), t.flatten(), reduction="sum"),
              torch.float32)
    torch_lp = run(lambda hh, ww: F.cross_entropy((hh @ ww.t()).float().flatten(0, 1), t.flatten(),
                                                  reduction="sum"), dtype)
    for o, r, tl in zip(ours, ref, torch_lp):
        assert (o - r).abs().max() <= 2 * (tl - r).abs().max() + 1e-3 * r.abs().max()


@pytest.mark.parametrize("n,c,v,chunk,want,dtype", [(13, 5, 11, 4, (True, True), torch.float64),
                                                    (1, 3, 2, 7, (True, False), torch.float32),
                                                    (9, 7, 17, 9, (False, True), torch.float32),
                                                    (6, 4, 3, 5, (False, False), torch.float64)])
def test_linear_ce_op(n, c, v, chunk, want, dtype):
    from gpt_engine.train import losses
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, c, dtype=dtype, generator=g).requires_grad_(want[0])
    w = torch.randn(v, c, dtype=dtype, generator=g).requires_grad_(want[1])
    t = torch.randint(0, v, (n,), generator=g)
    t[1::3] = -100
    torch.library.opcheck(losses._linear_ce, (h, w, t, chunk, -100, *want))
    loss, gh, gw = losses._linear_ce(h.detach(), w.detach(), t, chunk, -100, *want)
    assert loss.shape == () and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert gh.shape == ((n, c) if want[0] else (0,)) and gh.dtype == dtype
    assert gw.shape == ((v, c) if want[1] else (0,)) and gw.dtype == (loss.dtype if want[1] else dtype)


def test_chunked_ce_autocast_compiled_matches_eager():
    # the compiled graph runs the op outside autocast: it must still compute in the autocast dtype
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 11, 16, generator=g, requires_grad=True)
    w = torch.randn(37, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 37, (2, 11), generator=g)

    def run(fn):
        with torch.autocast("cpu", torch.bfloat16):
            loss = fn(h, w, t)
        return (loss, *torch.autograd.grad(loss, (h, w)))
    f = lambda h, w, t: chunked_cross_entropy(h, w, t, chunk_size=7)  # noqa: E731
    want = run(f)
    torch._dynamo.reset()
    got = run(torch.compile(f, backend="aot_eager", fullgraph=True))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (want[0] - F.cross_entropy((h @ w.t()).flatten(0, 1), t.flatten(), reduction="sum")).abs() > 1e-4  # bf16


def test_lr_schedule_and_vocab_padding():
    c = TrainConfig(out="x", steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(99, c) == pytest.approx(0.1, abs=1e-3)
    assert pad_vocab(50257) == 50304 and pad_vocab(4096) == 4096


# --- settings and flags -------------------------------------------------------------------

def _train_parser():
    import argparse

    from gpt_engine.cli.train import add_args
    p = argparse.ArgumentParser()
    add_args(p)
    return p


def test_every_setting_has_a_flag_and_back():
    from dataclasses import asdict, fields
    p = _train_parser()
    names = {f.name for f in fields(TrainConfig)}
    assert {a.dest for a in p._actions} - {"help"} == names
    flags = {s for a in p._actions for s in a.option_strings}
    for f in fields(TrainConfig):
        kebab = f.name.replace("_", "-")
        assert f"--{kebab}" in flags or f"--no-{kebab}" in flags, f.name
        assert f.metadata["help"], f.name
    assert {"--out", "--data", "--model", "--init", "--steps", "--batch-size", "--seq-len", "--lr", "--seed",
            "--save-every", "--resume", "--device", "--no-progress", "--fsdp", "--warmup", "--eval-every",
            "--eval-iters", "--grad-accum", "--dtype", "--compile"} <= flags
    # parsed defaults are TrainConfig's defaults
    assert vars(p.parse_args(["--out", "x"])) == asdict(TrainConfig(out="x"))


def test_flags_parse_types_and_switches():
    p = _train_parser()
    a = p.parse_args(["--out", "o", "--steps", "5", "--lr", "1e-3", "--corpus-mb", "2", "--no-progress", "--fsdp",
                      "--resume", "--dtype", "bf16", "--min-lr-ratio", "0.5", "--keep", "3"])
    assert (a.steps, a.lr, a.corpus_mb, a.min_lr_ratio, a.keep) == (5, 1e-3, 2.0, 0.5, 3)
    assert a.progress is False and a.fsdp is True and a.resume is True and a.dtype == "bf16"
    for bad in ([], ["--out", "o", "--steps", "x"], ["--out", "o", "--dtype", "fp8"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_device_defaults_come_from_the_fields():
    from gpt_engine.train.config import resolve_defaults
    cpu, gpu = resolve_defaults(TrainConfig(out="x"), cuda=False), resolve_defaults(TrainConfig(out="x"), cuda=True)
    assert (cpu.steps, cpu.batch_size, cpu.seq_len, cpu.dtype, cpu.log_every) == (300, 16, 128, "fp32", 1)
    assert (gpu.steps, gpu.batch_size, gpu.seq_len, gpu.dtype, gpu.log_every) == (1500, 32, 256, "bf16", 10)
    assert (cpu.lr, cpu.warmup, cpu.eval_every, cpu.save_every) == (2e-3, 30, 60, 60)
    ft = resolve_defaults(TrainConfig(out="x", init="d", steps=10, save_every=3), cuda=False)
    assert (ft.lr, ft.warmup, ft.eval_every, ft.save_every) == (1e-4, 1, 2, 3)
    with pytest.raises(ValueError, match="dtype"):
        resolve_defaults(TrainConfig(out="x", dtype="fp8"), cuda=False)
    with pytest.raises(ValueError, match="grad_accum"):
        resolve_defaults(TrainConfig(out="x", grad_accum=0), cuda=False)


# --- training ---------------------------------------------------------------------------

def test_loss_falls_and_outputs(tmp_path, corpus):
    out = train(cfg_for(tmp_path, corpus, steps=40, eval_every=20))
    losses = train_losses(out)
    assert losses[0] > 5 and min(losses[-5:]) < losses[0] - 2, losses
    for f in ("config.json", "model.safetensors", "tokenizer.json", "loss.png", "data/train.bin"):
        assert (out / f).is_file(), f
    assert any("sample" in r for r in read_log(out))
    assert len(list((out / "checkpoint").glob("step_*.pt"))) == 2  # keeps the last K=2


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_resume_is_bit_exact(tmp_path, corpus, model_type):
    mcfg = tiny_config(tmp_path / f"{model_type}.json", model_type)
    full = train(cfg_for(tmp_path, corpus, "full", model=mcfg, grad_accum=2))
    part = cfg_for(tmp_path, corpus, "part", model=mcfg, grad_accum=2, stop_after=3)
    train(part)
    assert latest_checkpoint(tmp_path / "part").name == "step_00000003.pt"
    assert not (tmp_path / "part" / "model.safetensors").exists()  # preempted: no final export yet
    part.resume, part.stop_after = True, None
    train(part)
    a = torch.load(latest_checkpoint(full), weights_only=False)
    b = torch.load(latest_checkpoint(tmp_path / "part"), weights_only=False)
    assert a["step"] == b["step"] == 6
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"]), k
    assert train_losses(full) == train_losses(tmp_path / "part")


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_transformers_loads_result(tmp_path, corpus, model_type):
    transformers = pytest.importorskip("transformers")
    from gpt_engine.models.loader import load_model
    out = train(cfg_for(tmp_path, corpus, model=tiny_config(tmp_path / "m.json", model_type), steps=3))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_model(out)
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok.encode("def f(x):")) == "def f(x):"


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama-untied"])
def test_gradients_match_transformers(tmp_path, kind):
    """The trainer's loss (LMLoss: our kernels' backward, chunked CE) has transformers' gradients
    for every weight, named and laid out as HF has them (tied head, fused qkv / gate-up, Conv1D)."""
    import copy

    import transformers

    from gpt_engine.train.model import LMLoss
    from gpt_engine.models.loader import load_model, to_hf

    from .helpers import make_hf_model
    make_hf_model(kind, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # eval: no dropout
    ours = load_model(tmp_path).requires_grad_(True)  # loaded for inference: no grad by default
    x, y = torch.randint(0, 256, (2, 29)), torch.randint(0, 256, (2, 29))
    LMLoss(ours)(x, y).backward()
    F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten(), reduction="sum").backward()
    grads = copy.deepcopy(ours)  # same module with each parameter replaced by its gradient
    for (name, p), g in zip(ours.named_parameters(), grads.parameters()):
        assert p.grad is not None, name
        g.data = p.grad
    theirs = dict(hf.named_parameters())
    ours_hf = to_hf(grads)
    assert ours_hf.keys() <= theirs.keys()
    for name, g in ours_hf.items():
        torch.testing.assert_close(g, theirs[name].grad, atol=2e-5, rtol=1e-4, msg=name)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, args, cwd):
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "gpt_engine", "train", *args]
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, corpus, fsdp):
    # one process, batch 4  ==  two gloo processes, batch 2 each (same global windows)
    one = train(cfg_for(tmp_path, corpus, "one", steps=4, eval_every=4))
    two = tmp_path / "two"
    two.mkdir()
    shutil.copytree(one / "data", two / "data")  # the same tokenizer and shards
    _torchrun(2, ["--out", str(two), "--data", str(corpus), "--model", str(tmp_path / "cfg.json"), "--steps", "4",
                  "--batch-size", "2", "--seq-len", "32", "--lr", "3e-3", "--warmup", "2", "--eval-every", "4",
                  "--eval-iters", "1", "--device", "cpu", "--no-progress", *(["--fsdp"] if fsdp else [])], tmp_path)
    torch.testing.assert_close(torch.tensor(train_losses(two)), torch.tensor(train_losses(one)), rtol=1e-4, atol=1e-4)
    va = [r["val_loss"] for r in read_log(one) if "val_loss" in r]
    vb = [r["val_loss"] for r in read_log(two) if "val_loss" in r]
    assert vb == pytest.approx(va, rel=1e-4)
    a = torch.load(latest_checkpoint(one), weights_only=False)["model"]
    b = torch.load(latest_checkpoint(two), weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


# --- fine-tuning ----------------------------------------------------------------------

def _hf_with_tokenizer(tmp_path, kind):
    from gpt_engine.tokenizer import Tokenizer
    from tests.helpers import make_hf_model
    d = tmp_path / f"hf-{kind}"
    make_hf_model(kind, d, vocab_size=320)
    Tokenizer.train([TEXT], vocab_size=300, show_progress=False).save(d)
    return d


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_finetune_jsonl_from_hf_dir(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    init = _hf_with_tokenizer(tmp_path, kind)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: what is {i} + {i}?\nA:", "completion": f" {2 * i}"}) + "\n"
                            for i in range(60)))
    out = train(TrainConfig(out=str(tmp_path / "ft"), data=str(data), init=str(init), steps=12, batch_size=4,
                            seq_len=32, lr=3e-3, warmup=2, eval_every=6, eval_iters=1, sample_tokens=4,
                            progress=False, device="cpu"))
    losses = train_losses(out)
    assert losses[-1] < losses[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.model_type == kind
    from gpt_engine.models.loader import load_model
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_loss_counts_completion_tokens_only(tmp_path):
    from gpt_engine.train.data import build_dataset, windows
    from gpt_engine.models.gpt import GPT
    from gpt_engine.models.config import ModelConfig
    from gpt_engine.tokenizer import Tokenizer
    from gpt_engine.train.model import LMLoss
    tok = Tokenizer.train([TEXT], vocab_size=300, show_progress=False)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": "PROMPT " * 3, "completion": f" answer {i}"}) + "\n"
                            for i in range(5)))
    _, tr, _ = build_dataset(data, tmp_path / "d", tok, 320)
    x, y = windows(tr.tokens, [0, 7], 24, tr.mask)
    prompt_ids = set(tok.encode("PROMPT " * 3))
    # a label is kept iff that token is a completion (or eos) token
    assert (y == -100).any() and (y != -100).any()
    for row_x, row_y, s in zip(x, y, [0, 7]):
        for j, lab in enumerate(row_y):
            assert (lab == -100) == (tr.mask[s + j + 1] == 0)
            if lab != -100:
                assert lab == tr.tokens[s + j + 1]
    torch.manual_seed(0)
    lm = LMLoss(GPT(ModelConfig(n_layer=1, n_head=2, d_model=64, vocab_size=320, max_seq_len=64)))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        logits = lm.gpt(xt)
        ref = F.cross_entropy(logits.flatten(0, 1), yt.flatten(), ignore_index=-100, reduction="sum")
        torch.testing.assert_close(lm(xt, yt), ref, rtol=1e-5, atol=1e-4)
    assert prompt_ids  # the prompt did tokenize


# --- clear errors -----------------------------------------------------------------------

def test_errors(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train(cfg_for(tmp_path, tmp_path / "nope.txt", "e1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        train(cfg_for(tmp_path, empty, "e2"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        train(cfg_for(tmp_path, bad, "e3"))
    with pytest.raises(ValueError, match="unknown model"):
        train(cfg_for(tmp_path, corpus, "e4", model="gpt9-huge"))
    with pytest.raises(ValueError, match="max_seq_len"):
        train(cfg_for(tmp_path, corpus, "e5", seq_len=128))
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        train(cfg_for(tmp_path, corpus, "e6", resume=True))
    short = tmp_path / "short.txt"
    short.write_text("hello world")
    with pytest.raises(ValueError, match="seq-len"):  # fewer tokens than one window
        train(cfg_for(tmp_path, corpus, "e7", data=str(short)))
    with pytest.raises(FileNotFoundError, match="init"):
        train(cfg_for(tmp_path, corpus, "e8", init=str(tmp_path / "no-model")))


def test_cli_parses(tmp_path, corpus):
    from gpt_engine.cli import main
    assert main(["train", "--out", str(tmp_path / "cli"), "--data", str(corpus), "--model",
                 tiny_config(tmp_path / "c.json"), "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--eval-every", "2", "--eval-iters", "1", "--device", "cpu", "--no-progress"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").is_file()
