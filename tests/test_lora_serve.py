"""Serving LoRA adapters: PEFT adapters on tiny random-init models (lora_B random, not PEFT's zeros, so a
dropped or misplaced update shows) held to transformers + peft, to the merged model, and to each request
run alone; the slots' LRU, the adapter-keyed prefix cache, bad adapter directories, and the server's
--lora-modules."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest
import torch

from gpt_engine import LLM, LoRARequest, SamplingParams
from gpt_engine.core.block_manager import BlockManager, lora_root
from gpt_engine.core.request import RequestError
from gpt_engine.core.sampling_params import SamplingParams as SP
from gpt_engine.core.scheduler import Scheduler, Sequence
from tests.helpers import FAMILY_CASES, ServerThread, make_chat_model, make_hf_model

TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],  # c_proj: the attention's and the MLP's
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           # per-head fused qkv rows (the plan's row order); GPT-J's interleaved rotary rows; Phi-3's fused GEMMs
           "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
           "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
           "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
V = 256
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def make_adapter(hf, path, targets, seed: int, r: int = 4, **cfg):
    """A PEFT LoRA adapter of hf (left untouched) saved to path, lora_B random -> the peft model."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    conv1d = hf.config.model_type == "gpt2"
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                      fan_in_fan_out=conv1d, **cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(path)
    return pm.eval()


def prompts(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


class Family:
    """A base model, two adapters (rank 4 and 8) and their peft models, and one engine over the base."""

    def __init__(self, kind, root: Path):
        self.root = root
        family, shape = FAMILY_CASES.get(kind, (kind, None))
        self.hf = make_hf_model(family, root / "base", vocab_size=V, shape=shape)
        self.peft = [make_adapter(self.hf, root / f"a{i}", TARGETS[kind], seed=i, r=4 * (i + 1)) for i in range(2)]
        self.loras = [LoRARequest(f"a{i}", i + 1, str(root / f"a{i}")) for i in range(2)]
        self.llm = LLM(str(root / "base"), device="cpu", enable_lora=True, max_loras=2, max_lora_rank=8)


@pytest.fixture(scope="module")
def fam(torch_path, tmp_path_factory):
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = Family(kind, tmp_path_factory.mktemp(kind))
        return made[kind]
    return get


def _full(lp: dict) -> torch.Tensor:
    return torch.tensor([lp[t] for t in range(V)])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt_neox", "gptj", "phi3"])
def test_logprobs_match_peft(fam, kind):
    """Prefill (prompt logprobs) and decode steps (the fused decode layer's kernel) against transformers + peft."""
    f = fam(kind)
    p = prompts([21], seed=1)[0]
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=V, prompt_logprobs=V)
    for pm, lora in zip(f.peft, f.loras):
        out = f.llm.generate([p], sp, lora_request=lora, use_tqdm=False)[0]
        with torch.no_grad():
            ref = torch.log_softmax(pm(torch.tensor([p + out.token_ids])).logits[0].float(), -1)
        got = torch.stack([_full(d) for d in out.prompt_logprobs[1:]] + [_full(d) for d in out.logprobs])
        torch.testing.assert_close(got, ref[:len(got)], atol=1e-4, rtol=0)
    base = f.llm.generate([p], sp, use_tqdm=False)[0]  # the adapters did change something
    assert (torch.stack([_full(d) for d in base.prompt_logprobs[1:]]) - ref[:len(p) - 1]).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_matches_merged_model(fam, kind):
    f = fam(kind)
    merged = f.root / "merged"
    copy.deepcopy(f.peft[1]).merge_and_unload().save_pretrained(merged)
    ps = prompts([5, 17, 33], seed=2)
    want = LLM(str(merged), device="cpu").generate(ps, GREEDY, use_tqdm=False)
    got = f.llm.generate(ps, GREEDY, lora_request=f.loras[1], use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def _record(monkeypatch, llm) -> list[set]:
    """The adapter ids (0: the base model) of every step's batch."""
    seen, step = [], llm.runner.loras.step

    def spy(batch):
        seen.append({s.lora_id for s in batch.seqs})
        return step(batch)
    monkeypatch.setattr(llm.runner.loras, "step", spy)
    return seen


def test_mixed_batch_equals_each_alone(fam, monkeypatch):
    f = fam("llama")
    ps = prompts([9, 14, 20, 6], seed=3)
    loras = [None, f.loras[0], f.loras[1], f.loras[0]]
    alone = [f.llm.generate([p], GREEDY, lora_request=lora, use_tqdm=False)[0].token_ids
             for p, lora in zip(ps, loras)]
    seen = _record(monkeypatch, f.llm)
    mixed = f.llm.generate(ps, GREEDY, lora_request=loras, use_tqdm=False)
    assert [o.token_ids for o in mixed] == alone
    assert {0, 1, 2} in seen  # base and both adapters in one step
    assert len({tuple(o) for o in alone}) > 2  # the adapters do change the output


def test_more_adapters_than_slots_wait_and_evict(fam, monkeypatch):
    f = fam("gpt2")
    ps = prompts([8, 12, 5, 10], seed=4)
    loras = [f.loras[0], f.loras[1], None, f.loras[0]]
    want = [f.llm.generate([p], GREEDY, lora_request=lora, use_tqdm=False)[0].token_ids
            for p, lora in zip(ps, loras)]
    llm = LLM(str(f.root / "base"), device="cpu", enable_lora=True, max_loras=1, max_lora_rank=8)
    seen = _record(monkeypatch, llm)
    got = llm.generate(ps, GREEDY, lora_request=loras, use_tqdm=False)
    assert [o.token_ids for o in got] == want
    assert all(len(s - {0}) <= 1 for s in seen) and {0, 1} in seen   # one slot: one adapter at a time
    assert llm.runner.loras.num_loads >= 2


@pytest.mark.parametrize("slots, form", [([1] * 5, "only"), ([0, -1, 2, 0, 1, -1], "rows"),
                                         ([-1, 3, 3, -1], "rows"), ([2] * 12 + [0] + [-1] * 3, "mask")])
def test_update_forms_equal_each_tokens_own_adapter(slots, form):
    from gpt_engine.models.lora import LoRASlots, LoRAStep
    g = torch.Generator().manual_seed(0)
    w, k, n = 3, 8, 5
    gemm = LoRASlots(4, 1, w, k, n, torch.float64, "cpu")
    gemm.a.normal_(generator=g)
    gemm.b.normal_(generator=g)
    x, y = torch.randn(len(slots), k, generator=g, dtype=torch.float64), torch.randn(len(slots), n, dtype=torch.float64)
    step = LoRAStep.of(slots, torch.float64, "cpu")
    assert getattr(step, form) is not None
    want = torch.stack([y[i] + (x[i] @ gemm.a[j * w:(j + 1) * w].t() @ gemm.b[j * w:(j + 1) * w] if j >= 0 else 0)
                        for i, j in enumerate(slots)])
    torch.testing.assert_close(gemm.add_to(y.clone(), x, step), want)
    assert LoRAStep.of([-1, -1], torch.float64, "cpu") is None


def test_update_kernel_equals_the_torch_forms():
    """CPU float32 inference takes kernels.lora_add_ (one call, activation included) over the same slots."""
    from gpt_engine.models.lora import LoRASlots, LoRAStep
    g = torch.Generator().manual_seed(1)
    gemm = LoRASlots(3, 2, 4, 24, 40, torch.float32, "cpu")
    gemm.a.normal_(generator=g)
    gemm.b.normal_(generator=g)
    slots = [0, -1, 2, 2, 0, 1, 2, 2, 2]
    x, y = torch.randn(len(slots), 24, generator=g), torch.randn(len(slots), 40, generator=g)
    step = LoRAStep.of(slots, torch.float32, "cpu")
    with torch.no_grad():
        got = gemm.apply(y.clone(), x, step, "gelu")
    torch.testing.assert_close(got, torch.nn.functional.gelu(gemm.add_to(y.clone(), x, step)), atol=1e-4, rtol=1e-4)


def test_fused_decode_layer_takes_the_adapters(fam, monkeypatch):
    """CPU float32 decode runs each layer in one kernel call with the adapters' updates in it: the same
    tokens and logprobs as the layer run GEMM by GEMM."""
    import gpt_engine.models.layers as layers
    f = fam("llama")
    ps, loras = prompts([7, 12, 5], seed=5), [f.loras[1], None, f.loras[0]]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3)
    calls, real = [], layers.decode_layer

    def spy(*a, **kw):
        calls.append(kw.get("lora") is not None)
        return real(*a, **kw)
    monkeypatch.setattr(layers, "decode_layer", spy)
    fused = f.llm.generate(ps, sp, lora_request=loras, use_tqdm=False)
    assert calls and all(calls)
    monkeypatch.setattr(layers.Block, "decode_step", lambda self, x, residual, positions, cache, meta, rope:
                        self(x, residual, positions, cache, meta))
    plain = f.llm.generate(ps, sp, lora_request=loras, use_tqdm=False)
    for a, b in zip(fused, plain):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            torch.testing.assert_close(torch.tensor([la[t] for t in sorted(la)]),
                                       torch.tensor([lb[t] for t in sorted(la)]), atol=1e-4, rtol=1e-4)


def test_slots_never_evict_a_running_adapter(fam):
    f = fam("gpt2")
    loras = f.llm.runner.loras
    third = LoRARequest("a0-again", 3, f.loras[0].lora_path)
    _, b = (loras._slot(lora, frozenset()) for lora in f.loras)   # both loaded, a0 least recently used
    with pytest.raises(RuntimeError, match="no free LoRA slot"):
        loras._slot(third, frozenset({1, 2}))
    assert loras._slot(third, frozenset({1})) == b and list(loras.loaded) == [1, 3]   # a1 left, not a0


def test_scheduler_holds_a_request_whose_adapter_has_no_slot():
    bm = BlockManager(64, 16)
    sched = Scheduler(bm, max_num_batched_tokens=256, max_loras=1)
    a, b, base = (Sequence(f"r{i}", [1, 2, 3], SP(max_tokens=4), lora)
                  for i, lora in enumerate([LoRARequest("a", 1, "/a"), LoRARequest("b", 2, "/b"), None]))
    for s in (a, b, base):
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == [a, base] and list(sched.waiting) == [b] and batch.running_loras == {1}
    sched.finish(a, "stop")
    assert sched.schedule().seqs[-1] is b and sched.lora_counts == {2: 1}


def test_prefix_cache_is_per_adapter(fam):
    # blocks: the same tokens under another adapter (or the base) hash apart
    bm, toks = BlockManager(16, 4), list(range(1, 14))
    table, cached, parent = bm.admit(toks, root=lora_root(1))
    bm.commit(table, toks, len(toks), 0, parent)
    bm.free(table)
    for root, hit in ((lora_root(2), 0), (None, 0), (lora_root(1), 12)):
        table, cached, _ = bm.admit(toks, root=root)
        assert cached == hit
        bm.free(table)
    # the engine: a prompt cached under a0 is computed again under a1, and hit again under a0
    f = fam("gpt2")
    p = prompts([40], seed=5)[0]
    hits = []
    outs = []
    for lora in (f.loras[0], f.loras[1], f.loras[0]):
        before = f.llm.stats()["prefix_cache_hit_tokens"]
        outs.append(f.llm.generate([p], GREEDY, lora_request=lora, use_tqdm=False)[0].token_ids)
        hits.append(f.llm.stats()["prefix_cache_hit_tokens"] - before)
    assert hits == [0, 0, 32] and outs[0] == outs[2]


@pytest.mark.parametrize("fmt", [dict(quantization="int8"), dict(dtype="bfloat16")], ids=["int8", "bf16"])
def test_adapter_over_low_precision_base(fam, tmp_path, fmt):
    """The update in float32 over the base's own format: peft over the base rounded as the engine stores it."""
    from peft import PeftModel

    from gpt_engine.kernels import dequantize, quantize_int8
    f = fam("llama")
    hf = copy.deepcopy(f.hf)
    with torch.no_grad():
        for name, w in hf.named_parameters():
            if "quantization" in fmt and w.dim() == 2:  # every GEMM weight (and the tied head), per output row
                w.copy_(dequantize(quantize_int8(w)))
            elif "dtype" in fmt:
                w.copy_(w.bfloat16().float())
    pm = PeftModel.from_pretrained(hf, f.root / "a0").eval()
    llm = LLM(str(f.root / "base"), device="cpu", enable_lora=True, max_lora_rank=8, **fmt)
    p = prompts([19], seed=6)[0]
    out = llm.generate([p], SamplingParams(max_tokens=1, prompt_logprobs=V), lora_request=f.loras[0],
                       use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(pm(torch.tensor([p])).logits[0].float(), -1)
    got = torch.stack([_full(d) for d in out.prompt_logprobs[1:]])
    torch.testing.assert_close(got, ref[:-1], atol=1e-3, rtol=0)


@pytest.mark.gpu
def test_gpu_mixed_batch_matches_peft(fam):
    """CUDA: prefill and eager decode steps (not the decode graphs) with two adapters and the base in one batch."""
    f = fam("llama")
    llm = LLM(str(f.root / "base"), device="cuda", dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)
    ps = prompts([7, 15, 11], seed=8)
    loras = [f.loras[0], None, f.loras[1]]
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=V)
    outs = llm.generate(ps, sp, lora_request=loras, use_tqdm=False)
    for p, lora, out in zip(ps, loras, outs):
        model = f.hf if lora is None else f.peft[lora.lora_int_id - 1]
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([p + out.token_ids])).logits[0].float(), -1)
        got = torch.stack([_full(d) for d in out.logprobs])
        torch.testing.assert_close(got, ref[len(p) - 1:len(p) - 1 + len(got)], atol=1e-3, rtol=0)


# ---------------------------------------------------------------- bad adapters

def _edit_config(d: Path, **fields):
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, **fields}))


def _rename(old: str, new: str):
    def edit(d: Path):
        from safetensors.torch import load_file, save_file
        f = d / "adapter_model.safetensors"
        save_file({k.replace(old, new): v for k, v in load_file(f).items()}, f)
    return edit


BAD = {
    "no directory": (lambda d: shutil.rmtree(d), "no such directory"),
    "no config": (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
    "no weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    "not json": (lambda d: (d / "adapter_config.json").write_text("{"), "not valid JSON"),
    "not lora": (lambda d: _edit_config(d, peft_type="IA3"), "peft_type 'IA3'"),
    "dora": (lambda d: _edit_config(d, use_dora=True), "use_dora"),
    "layer out of range": (_rename("layers.1.", "layers.7."),
                           r"'model\.layers\.7\.[a-z_.]+' is not a linear layer .* llama model with 2 layers"),
    "head": (_rename("model.layers.0.mlp.down_proj", "lm_head"), "'lm_head' is not a linear layer"),
    "embedding": (_rename("lora_A.weight", "lora_embedding_A"), "unexpected tensor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_is_a_clear_error(fam, tmp_path, case):
    f = fam("llama")
    d = tmp_path / "adapter"
    shutil.copytree(f.root / "a0", d)
    edit, words = BAD[case]
    edit(d)
    good = prompts([6])[0]
    with pytest.raises(RequestError, match=words) as e:  # checked before anything runs
        f.llm.generate([good, good], GREEDY, lora_request=[f.loras[0], LoRARequest("bad", 90, str(d))],
                       use_tqdm=False)
    assert e.value.param == "lora_request" and not f.llm.has_unfinished()


def test_bad_adapter_shapes_rank_and_ids(fam, tmp_path):
    f = fam("llama")
    other = make_hf_model("llama", None, vocab_size=V, save=False, shape=dict(d_model=64, n_head=2))
    make_adapter(other, tmp_path / "other", TARGETS["llama"], seed=0)
    make_adapter(f.hf, tmp_path / "r16", ["q_proj"], seed=0, r=16)
    cases = [(LoRARequest("other", 91, str(tmp_path / "other")), "another base model"),
             (LoRARequest("big", 92, str(tmp_path / "r16")), "rank 16 .* above max_lora_rank 8"),
             (LoRARequest("a1-again", 1, str(f.root / "a1")), "one id per adapter directory")]
    for lora, words in cases:
        with pytest.raises(ValueError, match=words):
            f.llm.generate([[1, 2, 3]], GREEDY, lora_request=lora, use_tqdm=False)
    with pytest.raises(TypeError, match="LoRARequest"):
        f.llm.generate([[1, 2, 3]], GREEDY, lora_request=[str(f.root / "a0")], use_tqdm=False)
    with pytest.raises(ValueError, match="2 lora requests for 1 prompts"):
        f.llm.generate([[1, 2, 3]], GREEDY, lora_request=f.loras, use_tqdm=False)
    with pytest.raises(ValueError, match="lora_int_id must be an integer >= 1"):
        LoRARequest("x", 0, "/x")
    with pytest.raises(RequestError, match="enable_lora=True"):
        LLM(str(f.root / "base"), device="cpu").generate([[1, 2]], GREEDY, lora_request=f.loras[0], use_tqdm=False)


# ---------------------------------------------------------------- server

@pytest.fixture(scope="module")
def lora_server(torch_path, tmp_path_factory):
    import transformers

    from gpt_engine.api.app import build_app
    from gpt_engine.async_llm import AsyncLLM
    root = tmp_path_factory.mktemp("lora-serve")
    model = make_chat_model(root / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model)
    make_adapter(hf, root / "sql", TARGETS["gpt2"], seed=7)
    loras = [LoRARequest("sql", 1, str(root / "sql"))]
    offline = LLM(str(model), device="cpu", enable_lora=True)
    engine = AsyncLLM(LLM(str(model), device="cpu", enable_lora=True))
    with ServerThread(build_app(engine, chat_template=engine.llm.chat_template, lora_modules=loras)) as srv:
        srv.engine, srv.offline, srv.loras = engine, offline, loras
        yield srv


def test_server_serves_lora_modules(lora_server):
    srv = lora_server
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    base = srv.engine.model_name
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == [base, "sql"] and cards["sql"].parent == base and cards["sql"].root == srv.loras[0].path
    prompt = "the quick brown fox"
    for model, lora in ((base, None), ("sql", srv.loras[0])):
        want = srv.offline.generate(prompt, GREEDY, lora_request=lora, use_tqdm=False)[0].text
        r = client.completions.create(model=model, prompt=prompt, max_tokens=GREEDY.max_tokens, temperature=0)
        assert (r.model, r.choices[0].text) == (model, want)
        msgs = [{"role": "user", "content": "hello"}]
        want = srv.offline.chat(msgs, GREEDY, lora_request=lora, use_tqdm=False)[0].text
        stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=GREEDY.max_tokens,
                                                temperature=0, stream=True)
        chunks = list(stream)
        assert {c.model for c in chunks} == {model}
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    r = httpx.post(srv.url + "/v1/completions", json={"model": "nosuch", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_serve_flags(tmp_path):
    import argparse

    from gpt_engine.cli.serve import add_args, lora_modules, run
    got = lora_modules(["a=/x", '{"name": "b", "path": "/y", "base_model_name": "m"}'])
    assert got == [LoRARequest("a", 1, "/x"), LoRARequest("b", 2, "/y")]
    for bad, words in ((["a"], "NAME=DIR"), (["a=/x", "a=/y"], "given twice"), (['{"name": "a"}'], "name")):
        with pytest.raises(SystemExit, match=words):
            lora_modules(bad)
    p = argparse.ArgumentParser()
    add_args(p)
    model = tmp_path / "m"
    make_hf_model("gpt2", model, vocab_size=V)
    args = p.parse_args([str(model), "--lora-modules", f"x={tmp_path}"])
    with pytest.raises(SystemExit, match="needs --enable-lora"):
        run(args)
    args = p.parse_args([str(model), "--device", "cpu", "--enable-lora", "--max-loras", "2", "--lora-modules",
                         f"x={tmp_path}"])
    assert (args.enable_lora, args.max_loras, args.max_lora_rank) == (True, 2, 16)
    with pytest.raises(SystemExit, match="--lora-modules x: .*no adapter_config.json"):
        run(args)
