import asyncio

import pytest
import torch

from gpt_engine.async_llm import AsyncLLM
from gpt_engine.llm import LLM
from gpt_engine import SamplingParams
from gpt_engine.tokenizer import Tokenizer

from .helpers import hf_greedy, make_hf_model

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

CORPUS = ("the quick brown fox jumps over the lazy dog. " * 20 + "hello world, this is a small text for a tiny "
          "tokenizer: numbers 12345, symbols ()[]{}, and some words again and again. ") * 5
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for kind in ("gpt2", "llama"):
        d = tmp_path_factory.mktemp(kind)
        out[kind] = (d, make_hf_model(kind, d))
    return out


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    tok = Tokenizer.train([CORPUS], vocab_size=320, show_progress=False)
    tok.save(d)
    make_hf_model("gpt2", d, vocab_size=tok.vocab_size)  # every id decodes to text
    return d


def prompts_of(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def tokens(outs):
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_batch_matches_transformers(models, kind):
    d, hf = models[kind]
    llm = LLM(str(d), device="cpu")
    model = llm.runner.model
    assert model.head.packed is not None and all(layer.packed is not None for layer in model.layers)  # packed GEMMs
    prompts = prompts_of([1, 7, 16, 17, 45, 90])
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, GREEDY.max_tokens)
        assert o.finish_reason == "length" and o.prompt_token_ids == p and o.prompt is None
    s = llm.stats()
    assert s["num_free_blocks"] == s["num_total_blocks"] and s["num_running"] == s["num_waiting"] == 0


def test_chunked_prefill_and_preemption_equal_plain_runs(models):
    d, _ = models["llama"]
    prompts = prompts_of([5, 40, 70, 33, 12, 64], seed=1)
    ref = tokens(LLM(str(d), device="cpu", enable_prefix_caching=False).generate(prompts, GREEDY, use_tqdm=False))
    chunked = LLM(str(d), device="cpu", max_num_batched_tokens=16, enable_prefix_caching=False)
    assert tokens(chunked.generate(prompts, GREEDY, use_tqdm=False)) == ref
    tiny = LLM(str(d), device="cpu", num_kv_blocks=10, max_num_batched_tokens=32)  # 160 slots for ~330 tokens
    assert tokens(tiny.generate(prompts, GREEDY, use_tqdm=False)) == ref
    s = tiny.stats()
    assert s["num_preemptions"] > 0 and s["num_free_blocks"] == s["num_total_blocks"]


def test_prefix_cache_hits_give_identical_outputs(models):
    d, _ = models["gpt2"]
    shared = prompts_of([48], seed=2)[0]
    prompts = [shared + t for t in prompts_of([3, 9, 20], seed=3)]
    ref = tokens(LLM(str(d), device="cpu", enable_prefix_caching=False).generate(prompts, GREEDY, use_tqdm=False))
    llm = LLM(str(d), device="cpu")
    llm.generate(prompts[:1], GREEDY, use_tqdm=False)  # fills the cache with the shared prefix
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == ref
    s = llm.stats()
    assert s["prefix_cache_hit_tokens"] >= 3 * 48 and s["num_free_blocks"] == s["num_total_blocks"]


def test_greedy_is_batch_invariant(models):
    d, _ = models["gpt2"]
    llm = LLM(str(d), device="cpu")
    target = prompts_of([21], seed=4)[0]
    alone = llm.generate([target], GREEDY, use_tqdm=False)[0].token_ids
    others = prompts_of([3, 60, 11, 37], seed=5)
    sampled = SamplingParams(temperature=1.0, max_tokens=24, seed=3, ignore_eos=True)
    outs = llm.generate(others[:2] + [target] + others[2:], [sampled, GREEDY, GREEDY, sampled, GREEDY],
                        use_tqdm=False)
    assert outs[2].token_ids == alone


def test_seeded_sampling_is_reproducible(models):
    d, _ = models["llama"]
    llm = LLM(str(d), device="cpu")
    p = prompts_of([10], seed=6)[0]
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=123, ignore_eos=True)
    a = llm.generate([p], sp, use_tqdm=False)[0].token_ids
    b = llm.generate(prompts_of([30, 4], seed=7) + [p], [SamplingParams(max_tokens=16)] * 2 + [sp],
                     use_tqdm=False)[2].token_ids
    c = llm.generate([p], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=124, ignore_eos=True),
                     use_tqdm=False)[0].token_ids
    assert a == b and a != c


def test_stop_strings_and_stop_tokens(text_model):
    llm = LLM(str(text_model), device="cpu")

    def sp(**kw):  # seeded sampling: varied text, the same tokens on every run
        return SamplingParams(temperature=1.0, seed=11, max_tokens=30, ignore_eos=True, **kw)

    full = llm.generate("the quick brown", sp(), use_tqdm=False)[0]
    assert full.text == llm.tokenizer.decode(full.token_ids) and len(full.text) > 20
    stop = full.text[10:14]
    cut = llm.generate("the quick brown", sp(stop=[stop, "zzzz-never"]), use_tqdm=False)[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]
    tok = full.token_ids[4]
    st = llm.generate("the quick brown", sp(stop_token_ids=[tok]), use_tqdm=False)[0]
    first = full.token_ids.index(tok)
    assert st.finish_reason == "stop" and st.token_ids == full.token_ids[:first + 1]
    assert st.text == llm.tokenizer.decode(full.token_ids[:first])
    s = llm.stats()
    assert s["num_free_blocks"] == s["num_total_blocks"]


def test_logprobs(models):
    d, hf = models["gpt2"]
    llm = LLM(str(d), device="cpu")
    p = prompts_of([12], seed=8)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.logprobs) == 5
    for t, lp in zip(out.token_ids, out.logprobs):
        assert len(lp) == 3 and t in lp and lp[t] == max(lp.values()) and lp[t] <= 0
    with torch.no_grad():
        ref = hf(torch.tensor([p])).logits[0, -1].log_softmax(-1)
    assert abs(out.logprobs[0][out.token_ids[0]] - ref.max().item()) < 1e-4
    assert llm.generate([p], SamplingParams(max_tokens=2), use_tqdm=False)[0].logprobs is None


def test_bad_inputs_raise_clear_errors(models, tmp_path):
    d, _ = models["gpt2"]
    llm = LLM(str(d), device="cpu")
    with pytest.raises(ValueError, match="128.*120 in the prompt, 16 for"):
        llm.generate([[1] * 120], SamplingParams(max_tokens=16), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[1, 256]], use_tqdm=False)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text without a tokenizer", use_tqdm=False)
    with pytest.raises(ValueError):
        llm.generate([[1], [2]], [SamplingParams()], use_tqdm=False)
    with pytest.raises(TypeError, match="unknown engine"):
        LLM(str(d), device="cpu", max_num_sequences=4)
    s = llm.stats()  # nothing was left behind by the failed calls
    assert s["num_free_blocks"] == s["num_total_blocks"] and s["num_waiting"] == 0


def test_text_prompts_and_gpt_module(text_model):
    from gpt_engine.models.loader import load_model
    llm = LLM(str(text_model), device="cpu")
    a = llm.generate(["hello world", "the"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert [o.prompt for o in a] == ["hello world", "the"]
    b = LLM(load_model(text_model), tokenizer=llm.tokenizer).generate(
        ["hello world", "the"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert [o.text for o in a] == [o.text for o in b] and tokens(a) == tokens(b)


# ------------------------------------------------------------------ AsyncLLM

async def _collect(engine, prompt, params, rid):
    deltas = []
    async for out in engine.generate(prompt, params, rid):
        deltas.append(out)
    return deltas


def test_async_streaming_matches_generate(text_model):
    llm = LLM(str(text_model), device="cpu")
    sps = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
           SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2),
           SamplingParams(temperature=0.8, max_tokens=20, seed=5, ignore_eos=True)]
    prompts = ["the quick brown", "hello world", "and some"]
    ref = llm.generate(prompts, sps, use_tqdm=False)
    stop = ref[2].text[8:12]
    sps.append(SamplingParams(temperature=0.8, max_tokens=20, seed=5, ignore_eos=True, stop=[stop]))
    prompts.append("and some")
    engine = AsyncLLM(llm)

    async def main():
        await engine.start()
        assert engine.is_running and engine.max_model_len == 128 and engine.model_name == text_model.name
        res = await asyncio.gather(*(_collect(engine, p, sp, f"r{i}") for i, (p, sp) in
                                     enumerate(zip(prompts, sps))))
        await engine.stop()
        return res

    res = asyncio.run(main())
    assert not engine.is_running
    for i, deltas in enumerate(res[:3]):
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert "".join(d.new_text for d in deltas) == ref[i].text == deltas[-1].text
        assert [t for d in deltas for t in d.new_token_ids] == ref[i].token_ids == deltas[-1].token_ids
        # a stream carries deltas only: the whole output once, on the finished one
        assert all(d.text == "" and d.token_ids == [] for d in deltas[:-1])
    assert [len(d.new_logprobs) for d in res[1]] == [1] * 20 and res[0][0].new_logprobs is None
    stopped = res[3]
    assert stopped[-1].finish_reason == "stop"
    assert "".join(d.new_text for d in stopped) == ref[2].text[:ref[2].text.index(stop)]
    assert all(stop not in d.new_text for d in stopped)
    s = engine.stats()
    assert s["num_free_blocks"] == s["num_total_blocks"] and s["kv_usage"] == 0.0


def test_async_abort_and_errors(text_model):
    llm = LLM(str(text_model), device="cpu")
    engine = AsyncLLM(llm)

    async def main():
        await engine.start()
        with pytest.raises(ValueError, match="context length"):
            await _collect(engine, [1] * 120, SamplingParams(max_tokens=20), "bad")
        with pytest.raises(ValueError, match="empty"):
            await _collect(engine, [], SamplingParams(), "bad2")
        # the consumer leaves after 3 deltas: the request is aborted and its blocks freed
        n = 0
        gen = engine.generate("the quick brown", SamplingParams(max_tokens=100, ignore_eos=True), "leave")
        async for _ in gen:
            n += 1
            if n == 3:
                break
        await gen.aclose()
        # engine.abort on a running request ends its stream unfinished
        task = asyncio.ensure_future(_collect(engine, "hello", SamplingParams(max_tokens=100, ignore_eos=True),
                                              "ab"))
        while engine.stats()["num_running"] == 0:
            await asyncio.sleep(0.01)
        engine.abort("ab")
        deltas = await asyncio.wait_for(task, 30)
        assert not deltas or not deltas[-1].finished
        for _ in range(500):
            s = engine.stats()
            if s["num_free_blocks"] == s["num_total_blocks"] and s["num_running"] == 0:
                break
            await asyncio.sleep(0.01)
        assert s["num_free_blocks"] == s["num_total_blocks"]
        await engine.stop()

    asyncio.run(main())


def test_async_loop_death_is_reported(models):
    d, _ = models["gpt2"]
    llm = LLM(str(d), device="cpu")
    engine = AsyncLLM(llm)

    def boom(*a, **k):
        raise RuntimeError("kaput")

    async def main():
        await engine.start()
        llm.runner.run = boom
        with pytest.raises(RuntimeError, match="engine loop died"):
            await _collect(engine, [1, 2, 3], SamplingParams(max_tokens=4), "x")
        assert not engine.is_running
        with pytest.raises(RuntimeError, match="engine loop died"):
            await _collect(engine, [1, 2, 3], SamplingParams(max_tokens=4), "y")

    asyncio.run(main())


# ------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gpu_greedy_matches_transformers_with_and_without_cuda_graphs(models, kind):
    d, hf = models[kind]
    hf = hf.to("cuda")
    prompts = prompts_of([1, 7, 16, 17, 45, 90, 3, 33, 64])
    graphs = LLM(str(d), device="cuda", dtype=torch.float32, max_num_seqs=16)
    assert graphs.runner.graphs, "CUDA graph capture failed (see the log warning)"
    eager = LLM(str(d), device="cuda", dtype=torch.float32, max_num_seqs=16, enforce_eager=True)
    a = tokens(graphs.generate(prompts, GREEDY, use_tqdm=False))
    b = tokens(eager.generate(prompts, GREEDY, use_tqdm=False))
    hf.generation_config.eos_token_id = None
    for p, x, y in zip(prompts, a, b):
        ids = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                          pad_token_id=0)
        assert x == y == ids[0, len(p):].tolist()
    hf.to("cpu")
    s = graphs.stats()
    assert s["num_free_blocks"] == s["num_total_blocks"]


@pytest.mark.gpu
def test_gpu_bf16_batch_runs_and_frees(models):
    d, _ = models["llama"]
    llm = LLM(str(d), device="cuda", max_num_seqs=8)
    outs = llm.generate(prompts_of([5, 50, 100, 7] * 5), SamplingParams(max_tokens=20, ignore_eos=True, seed=1),
                        use_tqdm=False)
    assert all(len(o.token_ids) == 20 for o in outs)
    s = llm.stats()
    assert s["num_free_blocks"] == s["num_total_blocks"]


def test_runner_host_tensors():
    # the step inputs built through array.array equal torch.tensor on the lists they replace
    from gpt_engine.worker.model_runner import host_tensor, padded_tables
    for dtype in (torch.long, torch.int32):
        for data in ([], [0], [3, -1, 2 ** 30]):
            got = host_tensor(data, dtype)
            assert got.dtype == dtype and torch.equal(got, torch.tensor(data, dtype=dtype))
    tables = [[5, 1], [], [7, 8, 9]]
    want = torch.tensor([t + [0] * (4 - len(t)) for t in tables], dtype=torch.int32)
    assert torch.equal(host_tensor(padded_tables(tables, 4), torch.int32).view(3, 4), want)
    assert len(padded_tables([], 4)) == 0


def test_runner_table_rows_follow_the_tables():
    # kept rows are rebuilt when a table grows, is replaced (re-admission) or the width changes
    from types import SimpleNamespace

    from gpt_engine.worker.model_runner import padded_tables, table_rows
    a, b = SimpleNamespace(request_id="a", block_table=[5, 1]), SimpleNamespace(request_id="b", block_table=[])
    kept = {}

    def check(width):
        got = table_rows([a, b], width, kept)
        assert got == padded_tables([a.block_table, b.block_table], width)
    check(4)
    a.block_table.append(9)
    check(4)
    a.block_table = [2, 3, 4]  # a new list of the same length
    check(4)
    b.block_table.extend([7, 8])
    check(5)
    assert len(table_rows([], 4, kept)) == 0


def test_runner_decode_inputs_equal_the_general_path(models):
    # prepare()'s one-token fast path builds what the general per-range loop builds, sampled rows or not
    from gpt_engine.core.scheduler import ScheduledBatch

    class General(ScheduledBatch):
        is_decode = False

    d, _ = models["gpt2"]
    llm = LLM(str(d), device="cpu", max_num_seqs=8, enable_prefix_caching=False)
    seqs = [llm.add_request([1 + i] * (3 + 9 * i), SamplingParams(max_tokens=4, ignore_eos=True)) for i in range(4)]
    while any(s.num_output_tokens == 0 for s in seqs):
        llm.step()
    batch = llm.scheduler.schedule()
    assert batch.is_decode and len(batch) == 4
    for sample in (batch.sample, [True, False, True, True]):
        b = ScheduledBatch(batch.seqs, batch.num_new_tokens, sample)
        assert llm.runner.prepare(b) == llm.runner.prepare(General(b.seqs, b.num_new_tokens, b.sample))


def test_generation_config_eos_list_and_defaults(models, tmp_path):
    # generation_config.json's EOS list ends a request on any of its ids (Llama 3 Instruct's second
    # EOS), and its sampling settings are LLM.generate's defaults
    import json
    import shutil
    src, _ = models["gpt2"]
    d = tmp_path / "m"
    shutil.copytree(src, d)
    prompt = [5, 6, 7, 8]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    toks = LLM(str(d), device="cpu").generate([prompt], greedy, use_tqdm=False)[0].token_ids
    e = toks[-1]
    other = next(t for t in (255, 254, 253) if t not in toks)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [other, e], "do_sample": False,
                                                          "max_new_tokens": 8}))
    llm = LLM(str(d), device="cpu")
    assert {0, other, e} <= llm.eos_token_ids  # config.json's and generation_config.json's
    out = llm.generate([prompt], use_tqdm=False)[0]  # greedy, 8 tokens at most: the directory's defaults
    j = next(i for i, t in enumerate(toks) if t in (0, e))
    assert out.token_ids == toks[:j + 1] and out.finish_reason == "stop"


def test_intake_fills_unset_fields_from_generation_config():
    # a request's unset sampling fields take the model directory's defaults; set ones win; an unset
    # max_tokens is the model's (else the caller's) default cut to the context left, else all of it
    from gpt_engine.api.protocol import CompletionRequest
    from gpt_engine.core.block_manager import BlockManager
    from gpt_engine.core.intake import Intake
    intake = Intake(None, 50, 100, BlockManager(100, 4), {"temperature": 0.0, "top_k": 5, "max_tokens": 7})

    def params(req, n=10, default_max=16):
        return intake.prepare([1] * n, req.sampling_fields(), default_max_tokens=default_max).params
    p = params(CompletionRequest(prompt="x"))
    assert (p.temperature, p.top_k, p.max_tokens, p.top_p) == (0.0, 5, 7, 1.0)
    p = params(CompletionRequest(prompt="x", temperature=0.5, top_k=3, max_tokens=2))
    assert (p.temperature, p.top_k, p.max_tokens) == (0.5, 3, 2)
    assert params(CompletionRequest(prompt="x", top_k=0)).top_k == -1   # OpenAI-style "no top-k"
    assert params(CompletionRequest(prompt="x"), n=97).max_tokens == 3   # the model's 7 cut to the room left
    intake.defaults = {}
    p = params(CompletionRequest(prompt="x"))
    assert (p.temperature, p.top_k, p.max_tokens) == (1.0, -1, 16)
    assert params(CompletionRequest(prompt="x"), default_max=None).max_tokens == 90   # all the room
    with pytest.raises(ValueError, match="maximum context length"):   # a given max_tokens is never cut
        params(CompletionRequest(prompt="x", max_tokens=95))
    with pytest.raises(ValueError, match="top_p") as e:
        params(CompletionRequest(prompt="x", top_p=1.5))
    assert e.value.param == "top_p"
