"""Prompt logprobs (SamplingParams.prompt_logprobs): the engine's values against transformers'
log_softmax over both prefill paths, with the prefix cache warm in either order, across a preemption
and in bounded logits chunks; then the server's echo + logprobs (OpenAI's legacy shape, as
lm-evaluation-harness reads it) and vLLM's prompt_logprobs field."""
from __future__ import annotations

import httpx
import pytest
import torch

from gpt_engine import SamplingParams
from gpt_engine.core.request import RequestError
from gpt_engine.llm import LLM
from tests.helpers import make_chat_model, make_hf_model, serving

VOCAB = 256
LENGTHS = (1, 2, 17, 40, 97)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plp-model")
    return path, make_hf_model("llama", path, vocab_size=VOCAB)


def _prompts(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _reference(hf, prompt) -> torch.Tensor:
    return hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)   # (T, V)


def _check(hf, prompt, plp, k):
    """plp as vLLM shapes it: None first, then per token {its id and the top-k: logprob}."""
    assert len(plp) == len(prompt) and plp[0] is None
    ref = _reference(hf, prompt)
    for j in range(1, len(prompt)):
        d, r = plp[j], ref[j - 1]
        top = r.topk(k).indices.tolist() if k else []
        assert set(d) == {prompt[j], *top}, (j, d)
        for t, v in d.items():
            assert abs(v - r[t].item()) <= 1e-4, (j, t, v, r[t].item())


@pytest.mark.parametrize("chunk", [None, 16], ids=["plain", "chunked"])
@pytest.mark.parametrize("k", [0, 3])
def test_prompt_logprobs_match_transformers(hf_dir, chunk, k):
    path, hf = hf_dir
    llm = LLM(str(path), device="cpu", max_num_batched_tokens=chunk)
    prompts = _prompts()
    outs = llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=k), use_tqdm=False)
    for p, o in zip(prompts, outs):
        _check(hf, p, o.prompt_logprobs, k)
        assert len(o.token_ids) == 3
    # a request without it has none, in the same batch as one with it
    mixed = llm.generate(prompts[-2:], [SamplingParams(max_tokens=2, temperature=0),
                                        SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=k)],
                         use_tqdm=False)
    assert mixed[0].prompt_logprobs is None
    _check(hf, prompts[-1], mixed[1].prompt_logprobs, k)


@pytest.mark.parametrize("scored_first", [True, False])
def test_prefix_cache_either_order(hf_dir, scored_first):
    """A cached prefix is recomputed for a scoring request (it skips the cache read), and what a scoring
    request cached serves a plain one; the plain one's greedy tokens do not change."""
    path, hf = hf_dir
    llm = LLM(str(path), device="cpu", block_size=16, enable_prefix_caching=True)
    prefix = _prompts((64,), seed=1)[0]
    scored_p, plain_p = prefix + [5, 6, 7], prefix + [9, 8]
    scoring = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2)
    plain = SamplingParams(max_tokens=4, temperature=0)
    baseline = LLM(str(path), device="cpu", enable_prefix_caching=False).generate(plain_p, plain, use_tqdm=False)[0]
    order = [(scored_p, scoring), (plain_p, plain)]
    outs = {}
    for p, sp in (order if scored_first else order[::-1]):
        outs[id(sp)] = llm.generate(p, sp, use_tqdm=False)[0]
    s, n = outs[id(scoring)], outs[id(plain)]
    _check(hf, scored_p, s.prompt_logprobs, 2)
    assert s.num_cached_tokens == 0
    assert n.token_ids == baseline.token_ids
    if scored_first:
        assert n.num_cached_tokens == 64   # the scoring request's blocks were committed for others
    # the same scoring request again, its prefix now cached: still every position
    again = llm.generate(scored_p, scoring, use_tqdm=False)[0]
    assert again.prompt_logprobs == s.prompt_logprobs or all(
        abs(a[t] - b[t]) < 1e-5 for a, b in zip(again.prompt_logprobs[1:], s.prompt_logprobs[1:]) for t in a)


def test_preempted_scoring_resumes(hf_dir):
    """A KV pool too small for every request at once preempts; each prompt is still scored once, in order."""
    path, hf = hf_dir
    llm = LLM(str(path), device="cpu", block_size=16, num_kv_blocks=12, max_num_batched_tokens=32)
    prompts = _prompts((90, 80, 70), seed=2)
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0, prompt_logprobs=1, ignore_eos=True),
                        use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0
    for p, o in zip(prompts, outs):
        _check(hf, p, o.prompt_logprobs, 1)


def test_logits_in_bounded_chunks(hf_dir, monkeypatch):
    """The head runs over at most CHUNK_ELEMENTS // vocab rows at a time, however long the step."""
    from gpt_engine.worker import scoring
    path, hf = hf_dir
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", 8 * VOCAB)
    llm = LLM(str(path), device="cpu")
    rows = []
    logits = llm.runner.model.logits

    def spy(h):
        rows.append(h.shape[0])
        return logits(h)
    monkeypatch.setattr(llm.runner.model, "logits", spy)
    p = _prompts((100,), seed=3)[0]
    out = llm.generate(p, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)[0]
    assert max(rows) <= 8 and sum(r for r in rows if r == 8) >= 96
    _check(hf, p, out.prompt_logprobs, 0)


@pytest.mark.parametrize("value,word", [(-1, ">= 0"), (VOCAB + 1, "vocabulary"), (1.5, "integer")])
def test_bad_prompt_logprobs_names_the_param(hf_dir, value, word):
    path, _ = hf_dir
    llm = LLM(str(path), device="cpu")
    with pytest.raises(RequestError, match=word) as e:
        llm.prepare([1, 2, 3], {"prompt_logprobs": value})
    assert e.value.param == "prompt_logprobs"


# ---------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A model with a tokenizer and a chat template (test_server's), and transformers' copy of it."""
    import transformers
    path = make_chat_model(tmp_path_factory.mktemp("plp-chat"))
    return path, transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def srv(torch_path, chat_dir):
    with serving(chat_dir[0]) as server:
        yield server


def _post(srv, path, body):
    r = httpx.post(srv.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("max_tokens", [0, 1, 3])
def test_echo_logprobs_legacy_shape(srv, chat_dir, max_tokens):
    """lm-eval's loglikelihood request (echo, logprobs=1, max_tokens 1 or 0): the prompt's logprobs lead,
    the first null; max_tokens 0 returns the prompt alone."""
    _, hf = chat_dir
    p = _prompts((12,), seed=4)[0]
    body = _post(srv, "/v1/completions", {"prompt": p, "echo": True, "logprobs": 1, "max_tokens": max_tokens,
                                          "temperature": 0, "ignore_eos": True})
    c = body["choices"][0]
    lp, ref = c["logprobs"], _reference(hf, p)
    n = len(p) + max_tokens
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for j in range(1, len(p)):
        assert abs(lp["token_logprobs"][j] - ref[j - 1, p[j]].item()) <= 1e-4
        (v,) = lp["top_logprobs"][j].values()
        assert abs(v - ref[j - 1].max().item()) <= 1e-4
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    assert body["usage"]["completion_tokens"] == max_tokens
    if max_tokens == 0:
        assert c["finish_reason"] == "length" and c["text"] == srv.engine.llm.tokenizer.decode(p)
    else:  # the generated token's logprob is the last entry (lm-eval drops it)
        assert abs(lp["token_logprobs"][len(p)] - ref[-1].max().item()) <= 1e-4


def test_echo_logprobs_stream(srv):
    p = _prompts((9,), seed=5)[0]
    body = {"prompt": p, "echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    whole = _post(srv, "/v1/completions", body)["choices"][0]["logprobs"]
    tokens, lps = [], []
    with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        import json
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ch = json.loads(line[6:])["choices"][0]
                if ch["logprobs"]:
                    tokens += ch["logprobs"]["tokens"]
                    lps += ch["logprobs"]["token_logprobs"]
    assert tokens == whole["tokens"] and lps[0] is None
    assert all(abs(a - b) < 1e-5 for a, b in zip(lps[1:], whole["token_logprobs"][1:]))


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_vllm_prompt_logprobs_field(srv, chat_dir, path):
    """vLLM's prompt_logprobs request field: per choice on completions, on the response for chat (as vLLM)."""
    _, hf = chat_dir
    if path == "/v1/completions":
        p = _prompts((10,), seed=6)[0]
        body = _post(srv, path, {"prompt": p, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2})
        plp = body["choices"][0]["prompt_logprobs"]
        assert body["choices"][0]["logprobs"] is None
    else:
        body = _post(srv, path, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                 "prompt_logprobs": 2})
        plp = body["prompt_logprobs"]
        text = srv.engine.llm.chat_template.render([{"role": "user", "content": "hi"}], True)
        p = srv.engine.llm.tokenizer.encode(text, add_special_tokens=False)
    ref = _reference(hf, p)
    assert plp[0] is None and len(plp) == len(p)
    for j in range(1, len(p)):
        d = {int(t): e["logprob"] for t, e in plp[j].items()}
        assert set(d) == {p[j], *ref[j - 1].topk(2).indices.tolist()}
        assert all(abs(v - ref[j - 1, t].item()) <= 1e-4 for t, v in d.items())
        assert all(isinstance(e["decoded_token"], str) for e in plp[j].values())
