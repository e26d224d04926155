"""Speculative decoding (core/spec_decode.py): greedy output is plain decoding's token for token, sampled
output follows the target's distribution, and the KV pool keeps only what was accepted."""
import math

import pytest
import torch

from gpt_engine import LLM, SamplingParams
from gpt_engine.core.spec_decode import SpeculativeConfig, ngram_propose
from gpt_engine.worker.sampler import Sampler

from .helpers import FAMILY_CASES, make_chat_model, make_family_model, make_hf_model

# engine tests run the CPU kernels users run, not the Triton interpreter (the kernel tests cover that)
pytestmark = pytest.mark.usefixtures("torch_cpu_path")

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def test_ngram_proposes_what_followed_the_longest_recurring_suffix():
    assert ngram_propose([1, 2, 3, 9, 1, 2, 3], 2, 3, 1) == [9, 1]
    # the longest suffix wins over a later, shorter match
    assert ngram_propose([5, 6, 7, 8, 0, 6, 4, 5, 6], 3, 3, 1) == [7, 8, 0]
    assert ngram_propose([1, 2, 3, 4], 3, 3, 1) == []            # nothing recurs
    assert ngram_propose([1, 2, 3, 1], 3, 3, 2) == []            # only a 1-gram recurs, 2 asked at least
    # a run repeating itself: the latest occurrence that still has k tokens after it
    assert ngram_propose([7, 1, 1, 1, 1, 1, 1], 3, 2, 1) == [1, 1, 1]
    assert ngram_propose([4, 5, 4], 5, 3, 1) == [5, 4]           # fewer than k follow: as many as there are


@pytest.mark.parametrize("bad, err", [
    ({"method": "medusa"}, ValueError), ({"num_speculative_tokens": 0}, ValueError),
    ({"num_speculative_tokens": 2.5}, ValueError), ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, ValueError),
    ({"method": "draft_model"}, ValueError), ({"method": "ngram", "model": "x"}, ValueError),
    ({"lookahead": 3}, ValueError), ("ngram", TypeError), ({"disable_by_batch_size": 0}, ValueError)])
def test_bad_configs_are_refused_by_name(bad, err):
    with pytest.raises(err, match="speculative_config"):
        SpeculativeConfig.of(bad)


def test_the_flag_takes_json():
    import argparse

    from gpt_engine.cli.serve import add_args
    p = argparse.ArgumentParser()
    add_args(p)
    assert p.parse_args(["m", "--speculative-config", '{"method": "ngram"}']).speculative_config == {"method": "ngram"}
    for bad in ("[1, 2]", "{method"):
        with pytest.raises(SystemExit):
            p.parse_args(["m", "--speculative-config", bad])


def _prompts(n_random=(5, 23), seed=0):
    """Prompts whose continuations recur (a repeated phrase) and random ones (no drafts at first)."""
    g = torch.Generator().manual_seed(seed)
    return [[3, 4, 5, 6, 7] * 4, [9, 8, 9, 8, 9, 8, 9], *[torch.randint(1, 256, (n,), generator=g).tolist()
                                                          for n in n_random]]


def _same(a, b, logprobs=True):
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
        if logprobs:
            for p, q in zip(x.logprobs, y.logprobs):
                assert p.keys() == q.keys() and all(p[t] == pytest.approx(q[t], abs=1e-4) for t in p)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec-gpt2")
    make_hf_model("gpt2", d)
    return d


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "gemma", "qwen3"])
def test_greedy_is_plain_decoding_token_for_token(tmp_path, family):
    if family in FAMILY_CASES:
        make_family_model(family, tmp_path)
    else:
        make_hf_model(family, tmp_path)
    sp = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=2) for m in (30, 17, 24, 9)]
    plain = LLM(str(tmp_path), device="cpu").generate(_prompts(), sp, use_tqdm=False)
    llm = LLM(str(tmp_path), device="cpu", speculative_config=NGRAM)
    _same(plain, llm.generate(_prompts(), sp, use_tqdm=False))
    st = llm.stats()
    assert st["spec_num_draft_tokens"] > 0 and st["spec_num_accepted_tokens"] > 0
    assert st["num_free_blocks"] == st["num_total_blocks"]  # every block back, the rejected drafts' too
    llm.block_manager.check()


def test_greedy_with_penalties_bans_stops_and_a_small_pool(gpt2_dir):
    """Each verified position samples as if the drafts before it were output: penalties and min_tokens see
    them; stop tokens cut the accepted drafts; a pool this small preempts, and the prefix cache serves
    the second round."""
    prompts = _prompts((5, 23, 40))
    sps = [SamplingParams(temperature=0, max_tokens=28, repetition_penalty=1.3, ignore_eos=True),
           SamplingParams(temperature=0, max_tokens=28, frequency_penalty=0.8, presence_penalty=0.4, ignore_eos=True),
           SamplingParams(temperature=0, max_tokens=28, min_tokens=20, stop_token_ids=[170, 3]),
           SamplingParams(temperature=0, max_tokens=28, ignore_eos=True, logit_bias={5: 3.0}),
           SamplingParams(temperature=0, max_tokens=28, ignore_eos=True, stop_token_ids=[170])]
    kw = dict(device="cpu", num_kv_blocks=9, block_size=8, max_num_batched_tokens=64)
    plain = LLM(str(gpt2_dir), **kw).generate(prompts, sps, use_tqdm=False)
    llm = LLM(str(gpt2_dir), speculative_config=NGRAM, **kw)
    for _ in range(2):
        _same(plain, llm.generate(prompts, sps, use_tqdm=False), logprobs=False)
    st = llm.stats()
    assert st["num_preemptions"] > 0 and st["prefix_cache_hit_tokens"] > 0 and st["spec_num_accepted_tokens"] > 0
    assert st["num_free_blocks"] == st["num_total_blocks"]
    llm.block_manager.check()


def test_kv_blocks_hold_only_the_accepted_tokens(gpt2_dir):
    llm = LLM(str(gpt2_dir), device="cpu", block_size=4,
              speculative_config={"num_speculative_tokens": 7, "prompt_lookup_min": 1})
    for i, p in enumerate(_prompts()):
        # sampled: drafts get rejected
        llm.add_request(p, SamplingParams(temperature=1.0, seed=i, max_tokens=40, ignore_eos=True),
                        request_id=str(i))
    rejected = False
    while llm.has_unfinished():
        llm.step()
        for seq in llm.scheduler.running:
            # the computed tokens' blocks, at most the newest token's slot too, and nothing past it
            assert -(-seq.num_computed_tokens // 4) <= len(seq.block_table) <= -(-seq.num_tokens // 4)
            assert seq.num_computed_tokens == seq.num_tokens - 1
        rejected |= llm.spec_stats.num_accepted_tokens < llm.spec_stats.num_draft_tokens
        llm.block_manager.check()
    assert rejected and llm.block_manager.num_free_blocks == llm.block_manager.capacity


def test_streaming_deltas_add_up_and_seeds_repeat(tmp_path):
    make_chat_model(tmp_path)
    llm = LLM(str(tmp_path), device="cpu", speculative_config=NGRAM)
    sp = SamplingParams(temperature=0.8, max_tokens=40, seed=7, stop=["zz"], logprobs=1)
    prompt = "the cat sat on the mat. the cat sat on the mat. the cat"
    llm.add_request(prompt, sp, request_id="s", stream=True)
    ids, text, lps, final = [], "", [], None
    while llm.has_unfinished():
        for out in llm.step():
            ids += out.new_token_ids
            text += out.new_text
            lps += out.new_logprobs or []
            final = out if out.finished else final
    assert final is not None and ids == final.token_ids and text == final.text and lps == final.logprobs
    assert len(ids) == len(lps) > 0
    again = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert again.token_ids == final.token_ids  # a seed gives the same output with the same drafts


def test_disabled_by_batch_size(gpt2_dir):
    llm = LLM(str(gpt2_dir), device="cpu", speculative_config={**NGRAM, "disable_by_batch_size": 3})
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm.generate(_prompts(), sp, use_tqdm=False)  # 4 at once: none drafts
    assert llm.stats()["spec_num_drafts"] == 0
    llm.generate(_prompts()[:1], sp, use_tqdm=False)
    assert llm.stats()["spec_num_drafts"] > 0


def _chi2_ok(counts: dict, probs: dict, n: int) -> bool:
    """Pearson's test of counts against n draws from probs, outcomes under 5 expected pooled; passes
    unless p < 1e-4 (with fixed seeds the test is deterministic; a wrong sampler fails by far)."""
    exp, obs, rest_e, rest_o = [], [], 0.0, 0
    for k, p in probs.items():
        if n * p >= 5:
            exp.append(n * p)
            obs.append(counts.get(k, 0))
        else:
            rest_e, rest_o = rest_e + n * p, rest_o + counts.get(k, 0)
    if rest_e > 0:
        exp.append(rest_e)
        obs.append(rest_o)
    assert sum(obs) == n, "an outcome outside the distribution's support"
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    df = len(exp) - 1  # the chi-square survival function is the regularized upper incomplete gamma
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64))) > 1e-4


@pytest.mark.parametrize("greedy_mix", [False, True])
def test_verify_keeps_the_target_distribution(greedy_mix):
    """Sampler.verify over many copies of a two-position verification: the first token is distributed as
    row 0's distribution, and the second (after an accepted draft) as row 1's."""
    torch.manual_seed(0)
    V, N = 12, 20000
    logits0, logits1 = torch.randn(V) * 1.5, torch.randn(V) * 1.5
    d0, d1 = int(logits0.argmax()), 3  # a likely draft, then an arbitrary one
    sp = SamplingParams(temperature=0.9, top_k=8)
    rows = torch.stack([logits0, logits1, torch.zeros(V)] * N)
    params = [sp] * (3 * N)
    drafts = [d0, d1, -1] * N
    if greedy_mix:  # greedy rows in the batch change nothing for the sampled ones
        rows = torch.cat([rows, logits0[None]])
        params = params + [SamplingParams(temperature=0)]
        drafts = drafts + [d0]
    emit, ok, _ = Sampler(seed=1).verify(rows, params, drafts)
    first, second = {}, {}
    for i in range(N):
        a = emit[3 * i]
        first[a] = first.get(a, 0) + 1
        if ok[3 * i]:
            assert a == d0
            b = emit[3 * i + 1]
            second[b] = second.get(b, 0) + 1

    def dist(lg):
        x = lg / 0.9
        x[x < x.topk(8).values[-1]] = -math.inf
        return dict(enumerate(x.softmax(-1).tolist()))
    assert _chi2_ok(first, dist(logits0), N)
    assert _chi2_ok(second, dist(logits1), sum(second.values()))
    if greedy_mix:
        assert emit[-1] == d0 and ok[-1]


def test_engine_samples_follow_plain_sampling(gpt2_dir):
    """Many sampled 3-token continuations (the first token comes from the prefill, the other two from a
    verification), with and without speculation, against the model's exact distribution (top-k 3: 27
    outcomes). The draft model is the target itself: its greedy drafts are accepted often, not always."""
    import transformers
    prompt = [3, 4, 5, 6, 7] * 4
    hf = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()

    def topk_probs(ids):
        with torch.no_grad():
            lg = hf(torch.tensor([ids])).logits[0, -1]
        v, i = lg.topk(3)
        return dict(zip(i.tolist(), v.softmax(-1).tolist()))
    exact = {(a, b, c): pa * pb * pc for a, pa in topk_probs(prompt).items()
             for b, pb in topk_probs(prompt + [a]).items() for c, pc in topk_probs(prompt + [a, b]).items()}
    N = 1500
    sp = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)
    for spec in (None, {"model": str(gpt2_dir), "num_speculative_tokens": 2}):
        llm = LLM(str(gpt2_dir), device="cpu", seed=11, speculative_config=spec, enable_prefix_caching=False)
        outs = llm.generate([prompt] * N, sp, use_tqdm=False)
        counts = {}
        for o in outs:
            counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
        assert _chi2_ok(counts, exact, N), (spec, counts)
        if spec is not None:
            st = llm.stats()
            assert 0 < st["spec_num_accepted_tokens"] < st["spec_num_draft_tokens"]


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
    """A target and a 4x+ smaller draft with the same (trained) tokenizer."""
    target, draft = tmp_path_factory.mktemp("spec-target"), tmp_path_factory.mktemp("spec-draft")
    make_chat_model(target)
    make_chat_model(draft, n_layer=1, n_embd=32, n_head=2)
    return target, draft


def test_draft_model_greedy_is_plain_decoding(chat_pair):
    target, draft = chat_pair
    prompts = ["the cat sat on the mat. the cat", "hello there", "a b c d e f g a b c", "x"]
    sps = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=1) for m in (30, 21, 9, 26)]
    kw = dict(device="cpu", block_size=4, num_kv_blocks=20, max_num_batched_tokens=32)
    plain = LLM(str(target), **kw).generate(prompts, sps, use_tqdm=False)
    for d in (draft, target):
        llm = LLM(str(target), speculative_config={"model": str(d), "num_speculative_tokens": 3}, **kw)
        for _ in range(2):  # the second round from the prefix cache
            _same(plain, llm.generate(prompts, sps, use_tqdm=False))
        st = llm.stats()
        assert st["num_preemptions"] > 0 and st["prefix_cache_hit_tokens"] > 0
        llm.step()  # the next step hands the runners the ids of the requests that ended
        assert st["num_free_blocks"] == st["num_total_blocks"] and not llm.drafter.computed
        if d == target:  # the target's own greedy drafts: the draft KV is right all along
            assert st["spec_acceptance_rate"] == 1.0
        else:
            assert 0 < st["spec_num_accepted_tokens"] < st["spec_num_draft_tokens"]


def test_draft_model_needs_the_targets_tokenizer(chat_pair, tmp_path):
    target, _ = chat_pair
    make_hf_model("gpt2", tmp_path / "other", vocab_size=384)  # no tokenizer
    with pytest.raises(ValueError, match="tokenizer"):
        LLM(str(target), device="cpu", speculative_config={"model": str(tmp_path / "other")})
    with pytest.raises(ValueError, match="not a directory"):
        LLM(str(target), device="cpu", speculative_config={"model": str(tmp_path / "missing")})


def test_server_streams_speculative_steps(chat_pair):
    """Several tokens a step reach a stream as one delta; the text, logprobs and usage are the plain
    answer's, and /metrics counts the drafts."""
    import httpx
    import openai

    from .helpers import serving
    target, _ = chat_pair
    args = dict(prompt="the cat sat on the mat. the cat sat on the mat. the", max_tokens=24, temperature=0,
                logprobs=1, extra_body={"ignore_eos": True})
    with serving(target) as plain:
        want = openai.OpenAI(base_url=plain.url + "/v1", api_key="x").completions.create(
            model=plain.engine.model_name, **args).choices[0]
    with serving(target, speculative_config=NGRAM) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        chunks = list(client.completions.create(model=srv.engine.model_name, stream=True,
                                                stream_options={"include_usage": True}, **args))
        metrics = httpx.get(srv.url + "/metrics").text
    text = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in text) == want.text and chunks[-1].usage.completion_tokens == 24
    assert sum((c.logprobs.tokens for c in text if c.logprobs), []) == want.logprobs.tokens
    assert len(text) < 24  # some step brought more than one token
    accepted = next(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("gpt_engine_spec_decode_num_accepted_tokens_total"))
    assert accepted > 0


def test_constrained_requests_share_a_batch_with_speculating_ones(chat_pair):
    from gpt_engine import StructuredOutputsParams
    target, _ = chat_pair
    prompts = ["the cat sat on the mat. the cat sat on the mat. the", "answer: "]
    sps = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
           SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(
               regex="(cat|mat)( (cat|mat))*"))]
    plain = LLM(str(target), device="cpu").generate(prompts, sps, use_tqdm=False)
    llm = LLM(str(target), device="cpu", speculative_config=NGRAM)
    _same(plain, llm.generate(prompts, sps, use_tqdm=False), logprobs=False)
    assert llm.stats()["spec_num_drafts"] > 0
