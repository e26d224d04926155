"""LoRA training (--lora-rank): adapters only train, PEFT loads the saved adapter with the same logits,
--merge equals base + adapter under transformers, resume is bit-exact, chat data, DDP, bad flags."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from gpt_engine import load_model
from gpt_engine.tokenizer import Tokenizer
from gpt_engine.train.checkpoint import latest_checkpoint
from gpt_engine.train.config import TrainConfig
from gpt_engine.train.trainer import train

from .helpers import make_family_model, make_hf_model
from .test_train import _torchrun, train_losses

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

TEXT = "".join(f"The {i}th line says {i * 7 % 13} apples and {i % 5} pears.\n" for i in range(300))
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """kind -> an HF model directory with a tokenizer: GPT-2 (fused Conv1D c_attn) and llama (GQA, untied)."""
    root = tmp_path_factory.mktemp("bases")
    tok = Tokenizer.train([TEXT], vocab_size=300, show_progress=False)
    out = {}
    for kind in ("gpt2", "llama-untied"):
        make_hf_model(kind, root / kind, vocab_size=320)
        tok.save(root / kind)
        out[kind] = root / kind
    (root / "corpus.txt").write_text(TEXT)
    return out


def lora_cfg(tmp_path, base, name="lora", **kw):
    # a high lr so that a few steps move B far from its zero init: a wrong layout shows in the logits
    d = dict(out=str(tmp_path / name), init=str(base), data=str(base.parent / "corpus.txt"), steps=4, batch_size=2,
             seq_len=16, lr=3e-2, warmup=1, eval_every=4, eval_iters=1, sample_tokens=2, progress=False,
             device="cpu", lora_rank=4, lora_alpha=8)
    return TrainConfig(**{**d, **kw})


def hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind,targets", [("gpt2", "q,v,o,up,down"), ("llama-untied", "q,k,v,o,gate,up,down"),
                                          ("llama-untied", "q,v")])
def test_peft_loads_adapter_with_same_logits(tmp_path, bases, kind, targets):
    out = assert_peft_matches(tmp_path, bases[kind], targets)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"]) == ("LORA", 4, 8, "none")
    assert cfg["fan_in_fan_out"] == (kind == "gpt2")
    assert not (out / "model.safetensors").exists()


# fused HF modules (NeoX's query_key_value in its own row order, Phi-3's qkv_proj / gate_up_proj) and GPT-J's
# permuted q/k rows
@pytest.mark.parametrize("name,targets", [("gpt_neox", "q,o,up"), ("phi3", "v,gate,down"), ("gptj", "q,k,o")])
def test_peft_matches_other_families(tmp_path, name, targets):
    base = tmp_path / name
    make_family_model(name, base, vocab_size=320)
    Tokenizer.train([TEXT], vocab_size=300, show_progress=False).save(base)
    (tmp_path / "corpus.txt").write_text(TEXT)
    assert_peft_matches(tmp_path, base, targets)


def assert_peft_matches(tmp_path, base_dir, targets):
    """Train an adapter, load it with PEFT, and compare with our model under the same adapters."""
    peft, transformers = pytest.importorskip("peft"), pytest.importorskip("transformers")
    out = train(lora_cfg(tmp_path, base_dir, lora_targets=targets))
    saved = load_file(out / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in saved)
    assert max(v.abs().max().item() for k, v in saved.items() if "lora_B" in k) > 1e-2  # B trained away from 0
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    before = hf_logits(base)
    tuned = peft.PeftModel.from_pretrained(base, out).eval()
    n_adapted = sum(1 for n, _ in tuned.named_modules() if n.endswith("lora_A"))
    assert n_adapted * 2 == len(saved)  # PEFT put an adapter on every saved module, no more
    after = hf_logits(tuned)
    assert (after - before).abs().max() > 1e-2
    # ours: the base under the trained adapters, taken from the last checkpoint
    from gpt_engine.train import lora
    ours = load_model(base_dir, dtype=torch.float32)
    lora.apply(ours, lora.parse_targets(targets), 4, 8, 0.0)
    ck = torch.load(latest_checkpoint(out), weights_only=True)["model"]
    ours.load_state_dict({k.removeprefix("gpt."): v for k, v in ck.items()}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS), after, atol=1e-4, rtol=1e-4)
    return out


def test_only_adapters_train(tmp_path, bases):
    from gpt_engine.train import lora
    out = train(lora_cfg(tmp_path, bases["llama-untied"], lora_targets="q,k,v,o,gate,up,down", steps=3))
    ck = torch.load(latest_checkpoint(out), weights_only=True)
    assert ck["model"] and all(lora.is_adapter(k) for k in ck["model"])  # no frozen base in the checkpoint
    assert len(ck["optimizer"]["state"]) == len(ck["model"])
    # the base the run trained on is still bit-exactly --init's: rebuild it from the run's modules
    from gpt_engine.train.distributed import Dist
    from gpt_engine.train.model import build
    cfg = lora_cfg(tmp_path, bases["llama-untied"], "again", steps=1, lora_targets="q,up")
    from gpt_engine.train.trainer import load_data, setup, train_step
    dd = Dist("cpu")
    cfg, mcfg, tok, _ = setup(cfg, dd)
    data = load_data(cfg, dd, mcfg, tok)
    m = build(cfg, dd, mcfg, fine_tune=True)
    frozen = {n: p.detach().clone() for n, p in m.lm.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in m.lm.named_parameters() if p.requires_grad}
    assert set(adapters) == {f"gpt.layers.{i}.{mod}.lora_{ab}.0" for i in range(2) for mod in ("attn.qkv", "mlp.fc")
                             for ab in "AB"}
    train_step(0, m, data.train, cfg, dd)
    for n, p in m.lm.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, adapters[n]), n


def test_merge_equals_base_plus_adapter(tmp_path, bases):
    peft, transformers = pytest.importorskip("peft"), pytest.importorskip("transformers")
    cfg = lora_cfg(tmp_path, bases["gpt2"], lora_targets="q,k,v,o,up,down")
    adapter = train(cfg)
    merged = train(lora_cfg(tmp_path, bases["gpt2"], "merged", lora_targets="q,k,v,o,up,down", merge=True))
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    base = transformers.AutoModelForCausalLM.from_pretrained(bases["gpt2"]).eval()
    want = hf_logits(peft.PeftModel.from_pretrained(base, adapter).eval())
    torch.testing.assert_close(hf_logits(transformers.AutoModelForCausalLM.from_pretrained(merged).eval()), want,
                               atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged)(IDS), want, atol=1e-4, rtol=1e-4)


def test_resume_is_bit_exact(tmp_path, bases):
    base = shutil.copytree(bases["llama-untied"], tmp_path / "base")  # its files change below
    (tmp_path / "corpus.txt").write_text(TEXT)
    kw = dict(lora_targets="q,v,down", lora_dropout=0.1, steps=6, eval_every=3, grad_accum=2)
    full = train(lora_cfg(tmp_path, base, "full", **kw))
    part = lora_cfg(tmp_path, base, "part", stop_after=3, **kw)
    train(part)
    part.resume, part.stop_after = True, None
    train(part)
    a = torch.load(latest_checkpoint(full), weights_only=True)
    b = torch.load(latest_checkpoint(tmp_path / "part"), weights_only=True)
    assert a["step"] == b["step"] == 6 and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg"], b["optimizer"]["state"][k]["exp_avg"]), k
    assert train_losses(full) == train_losses(tmp_path / "part")
    assert load_file(full / "adapter_model.safetensors").keys() == load_file(
        tmp_path / "part" / "adapter_model.safetensors").keys()
    # another adapter shape is another run; so is another base under the same name
    other = lora_cfg(tmp_path, base, "part", resume=True, **{**kw, "lora_targets": "q"})
    with pytest.raises(ValueError, match="--lora-targets"):
        train(other)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes())
    with pytest.raises(ValueError, match="base model .* changed"):
        train(lora_cfg(tmp_path, base, "part", resume=True, **kw))


def test_chat_finetune_with_lora(tmp_path, bases):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} + {i}?"},
                                                     {"role": "assistant", "content": f"{2 * i}"}]}) + "\n"
                            for i in range(40)))
    out = train(lora_cfg(tmp_path, bases["llama-untied"], data=str(data), lora_targets="q,v,o", steps=3))
    losses = train_losses(out)
    assert len(losses) == 3 and all(x == x for x in losses)
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, bases, fsdp):
    base = bases["gpt2"]
    one = train(lora_cfg(tmp_path, base, "one", lora_targets="q,o,up", batch_size=4))
    two = tmp_path / "two"
    two.mkdir()
    shutil.copytree(one / "data", two / "data")
    _torchrun(2, ["--out", str(two), "--init", str(base), "--data", str(base.parent / "corpus.txt"), "--steps", "4",
                  "--batch-size", "2", "--seq-len", "16", "--lr", "3e-2", "--warmup", "1", "--eval-every", "4",
                  "--eval-iters", "1", "--sample-tokens", "2", "--device", "cpu", "--no-progress",
                  "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "q,o,up", *(["--fsdp"] if fsdp else [])],
              tmp_path)
    torch.testing.assert_close(torch.tensor(train_losses(two)), torch.tensor(train_losses(one)), rtol=1e-4, atol=1e-4)
    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # Adam's steps of lr size amplify summation-order noise; a missing gradient sync is far larger
        torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=1e-3)


def test_flops_skip_the_frozen_weight_gradients(bases):
    from gpt_engine import ModelConfig
    from gpt_engine.train.metrics import flops_per_token
    mcfg = ModelConfig.load(bases["gpt2"])
    # frozen: forward 2N and input gradients 2N, no weight gradients; the adapters train fully (6 each)
    assert flops_per_token(mcfg, 1000, 16) - flops_per_token(mcfg, 1000, 16, n_adapter=10) == 2 * 1000 - 6 * 10


@pytest.mark.parametrize("base_dtype", ["bfloat16", "int8"])
def test_base_held_in_low_precision(tmp_path, bases, base_dtype):
    """QLoRA-style: the frozen layers' GEMM weights only in bf16 / int8 (no float32 parameter), the adapters
    float32 and trained through them."""
    from gpt_engine.train import lora
    full = load_model(bases["llama-untied"], dtype=torch.float32)
    low = load_model(bases["llama-untied"], dtype=torch.float32)
    lora.apply(low, ["q", "v", "up"], 4, 8, 0.0, base_dtype)
    assert all(lin.weight is None for lin in low.linears())
    assert low.memory_bytes()["params"] < full.memory_bytes()["params"]
    low.train()
    ids = IDS[:, :16]
    with torch.no_grad():
        want, got = full(ids), low(ids)
    assert 0 < (got - want).abs().max() < 0.05  # the base's rounding, and B = 0: no adapter effect yet
    got = low(ids)
    got.square().mean().backward()
    trained = [p for p in low.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    lora.move_formats(low, torch.device("meta"))  # the trainer's move to the device: the held weights go too
    assert all(t.is_meta for lin in low.linears() for t in lin.format.held())
    out = train(lora_cfg(tmp_path, bases["llama-untied"], lora_targets="q,v,up", lora_base_dtype=base_dtype, steps=2))
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("kw,match", [
    (dict(lora_rank=0), "--lora-rank must be positive"),
    (dict(lora_rank=-2), "--lora-rank must be positive"),
    (dict(lora_targets="q,x"), "--lora-targets: unknown target"),
    (dict(lora_targets=""), "--lora-targets: unknown target"),
    (dict(lora_targets="gate"), "--lora-targets: a gpt2 model has no gate"),
    (dict(lora_dropout=1.0), "--lora-dropout"),
    (dict(lora_alpha=0), "--lora-alpha must be positive"),
    (dict(lora_rank=None, lora_alpha=None, merge=True), "--merge needs --lora-rank"),
    (dict(lora_rank=None), "--lora-alpha needs --lora-rank"),
    (dict(init=None), "--lora-rank needs --init"),
])
def test_bad_flags(tmp_path, bases, kw, match):
    with pytest.raises(ValueError, match=match):
        train(lora_cfg(tmp_path, bases["gpt2"], **kw))
