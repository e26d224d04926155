"""Tensor parallelism (models/parallel.py, worker/tensor_parallel.py) on CPU with gloo, 2 ranks: the tokens,
logprobs and prompt logprobs equal one process's (fp32, 1e-5) for gpt2 with an odd vocabulary, llama with
GQA and with one KV head, through prefill, chunked prefill, decode, prefix caching and preemption; the
server with --tensor-parallel-size 2 (one node, and two "nodes" on this host) streams; a killed worker fails
the server fast, leaving no process behind; two engines run on one host at once."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from gpt_engine import LLM, SamplingParams
from tests.helpers import make_chat_model, make_hf_model, wait_healthy

CASES = {  # name -> (make_hf_model kind, shape): odd vocab everywhere (333 splits 167 + 166, padded)
    "gpt2": ("gpt2", {}),
    "llama-gqa": ("llama", dict(n_head=4, n_kv_head=2)),
    "llama-one-kv-head": ("llama-untied", dict(n_head=4, n_kv_head=1)),
}
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7] * 11, [5] * 3, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
SP = SamplingParams(max_tokens=10, temperature=0, logprobs=3, prompt_logprobs=2, ignore_eos=True)


@pytest.fixture(scope="module", params=list(CASES))
def model_dir(request, tmp_path_factory):
    kind, shape = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    make_hf_model(kind, path, vocab_size=333, shape=shape)
    return path


def _assert_same(ref, outs):
    for a, b in zip(ref, outs, strict=True):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert la.keys() == lb.keys() and all(abs(la[k] - lb[k]) < 1e-5 for k in la)
        for pa, pb in zip((a.prompt_logprobs or [None])[1:], (b.prompt_logprobs or [None])[1:], strict=True):
            assert pa.keys() == pb.keys() and all(abs(pa[k] - pb[k]) < 1e-5 for k in pa)


def test_two_ranks_equal_one_process(model_dir):
    """Chunked prefill (16-token steps), decode and a pool so small that the batch preempts; then the same
    prompts again, their blocks from the prefix cache."""
    ref = LLM(str(model_dir), device="cpu").generate(PROMPTS, SP, use_tqdm=False)
    llm = LLM(str(model_dir), device="cpu", tensor_parallel_size=2, max_num_batched_tokens=16, num_kv_blocks=8,
              block_size=8)
    try:
        _assert_same(ref, llm.generate(PROMPTS, SP, use_tqdm=False))
        assert llm.scheduler.num_preemptions > 0
        # without prompt logprobs (which read no cache): the prefix cache serves what it kept
        again = llm.generate(PROMPTS, dataclasses.replace(SP, prompt_logprobs=None), use_tqdm=False)
        _assert_same([dataclasses.replace(o, prompt_logprobs=None) for o in ref], again)
        assert llm.block_manager.num_hit_tokens > 0
    finally:
        llm.close()


def test_ngram_speculation_on_two_ranks(tmp_path):
    """A verification step is a chunked-prefill step: the workers run it as rank 0 hands it over."""
    make_hf_model("llama", tmp_path, vocab_size=333, shape=dict(d_model=64, n_head=4, n_kv_head=2, d_ff=128))
    model_dir = tmp_path
    sp = dataclasses.replace(SP, prompt_logprobs=None, max_tokens=24)
    prompts = [[5, 6, 7, 8] * 5] + PROMPTS
    ref = LLM(str(model_dir), device="cpu").generate(prompts, sp, use_tqdm=False)
    llm = LLM(str(model_dir), device="cpu", tensor_parallel_size=2, speculative_config={"method": "ngram"})
    try:
        _assert_same(ref, llm.generate(prompts, sp, use_tqdm=False))
        assert llm.stats()["spec_num_accepted_tokens"] > 0
    finally:
        llm.close()


@pytest.mark.parametrize("fmt", [dict(quantization="int8"), dict(quantization="w8a8"), dict(dtype="bfloat16")])
def test_weight_formats_shard(tmp_path, fmt):
    """Each rank quantises (or rounds) its own slice; the model is the same up to the format's rounding."""
    make_hf_model("llama", tmp_path, vocab_size=333, shape=dict(d_model=64, n_head=4, n_kv_head=2, d_ff=128))
    sp = SamplingParams(max_tokens=6, temperature=0, logprobs=2, ignore_eos=True)
    ref = LLM(str(tmp_path), device="cpu", **fmt).generate(PROMPTS, sp, use_tqdm=False)
    llm = LLM(str(tmp_path), device="cpu", tensor_parallel_size=2, **fmt)
    try:
        outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    finally:
        llm.close()
    for a, b in zip(ref, outs):
        first = a.token_ids[0]
        assert b.logprobs[0][first] == pytest.approx(a.logprobs[0][first], abs=0.05)


def test_two_engines_on_one_host(tmp_path):
    make_hf_model("gpt2", tmp_path, vocab_size=333)
    ref = LLM(str(tmp_path), device="cpu").generate(PROMPTS, SP, use_tqdm=False)
    a = LLM(str(tmp_path), device="cpu", tensor_parallel_size=2)
    b = LLM(str(tmp_path), device="cpu", tensor_parallel_size=2)
    try:
        _assert_same(ref, a.generate(PROMPTS, SP, use_tqdm=False))
        _assert_same(ref, b.generate(PROMPTS, SP, use_tqdm=False))
    finally:
        a.close()
        b.close()
    assert not any(p.is_alive() for p in a.workers.procs + b.workers.procs)
    with pytest.raises(RuntimeError, match="workers are gone"):
        a.generate(PROMPTS, SP, use_tqdm=False)


def test_shapes_that_do_not_split_are_refused(tmp_path):
    make_hf_model("llama", tmp_path, vocab_size=333, shape=dict(n_head=4, n_kv_head=2))
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide the model's 4 attention heads"):
        LLM(str(tmp_path), device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(str(tmp_path), device="cpu", tensor_parallel_size=0)


# ---------------------------------------------------------------- the server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model_dir, port, env=None):
    return subprocess.Popen([sys.executable, "-m", "gpt_engine", "serve", str(model_dir), "--device", "cpu",
                             "--port", str(port), "--tensor-parallel-size", "2"],
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _model(url) -> str:
    return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


def _stream(url) -> list[str]:
    body = {"model": _model(url), "prompt": [1, 2, 3, 4, 5], "max_tokens": 8, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 1}
    toks = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                toks += (choice.get("logprobs") or {}).get("tokens") or []
    return toks


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("tp-serve"))  # the server needs a tokenizer


def test_server_streams_and_a_killed_worker_fails_it_fast(gpt2_dir):
    want = [o.token_ids for o in LLM(str(gpt2_dir), device="cpu").generate(
        [[1, 2, 3, 4, 5]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)][0]
    port = _free_port()
    proc = _serve(gpt2_dir, port)
    try:
        url = wait_healthy(proc, port, timeout=300)
        assert len(_stream(url)) == len(want) == 8
        workers = [c for c in _children(proc.pid) if _alive(c)]
        worker = next(c for c in workers if "spawn_main" in open(f"/proc/{c}/cmdline").read())
        os.kill(worker, signal.SIGKILL)
        t = time.monotonic()
        code = proc.wait(timeout=30)
        assert code != 0 and time.monotonic() - t < 30
        assert b"tensor-parallel worker rank 1 died" in proc.stderr.read()
        time.sleep(0.5)
        assert not any(_alive(c) for c in workers)  # nothing orphaned
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("launch", ["nnodes", "torchrun"])
def test_two_nodes_on_one_host(gpt2_dir, launch):
    """Each "node" runs the same command: with NNODES=2 and NODE_RANK, or with torchrun's RANK / WORLD_SIZE /
    LOCAL_RANK. Rank 1 only computes (it serves no HTTP), rank 0 serves; the tokens are one process's."""
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
    ref = LLM(str(gpt2_dir), device="cpu").generate([[1, 2, 3, 4, 5]], sp, use_tqdm=False)[0]
    master, port = _free_port(), _free_port()
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master))
    if launch == "nnodes":
        env1, env0 = dict(env, NNODES="2", NODE_RANK="1"), dict(env, NNODES="2", NODE_RANK="0")
    else:
        env1, env0 = (dict(env, WORLD_SIZE="2", RANK=str(r), LOCAL_RANK="0") for r in (1, 0))
    node1 = _serve(gpt2_dir, _free_port(), env1)
    node0 = _serve(gpt2_dir, port, env0)
    try:
        url = wait_healthy(node0, port, timeout=300)
        r = httpx.post(url + "/v1/completions", json={"model": _model(url), "prompt": [1, 2, 3, 4, 5], "max_tokens": 8,
                                                      "temperature": 0, "ignore_eos": True, "logprobs": 1},
                       timeout=120)
        lp = r.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert lp == pytest.approx([d[t] for d, t in zip(ref.logprobs, ref.token_ids)], abs=1e-5)
        node0.send_signal(signal.SIGTERM)
        assert node0.wait(timeout=120) == 0, node0.stderr.read().decode()[-3000:]
        assert node1.wait(timeout=120) == 0, node1.stderr.read().decode()[-3000:]  # rank 1 ends with rank 0
    finally:
        for p in (node0, node1):
            p.kill()
            p.wait()


def test_mailbox_carries_a_step_and_says_when_one_does_not_fit():
    import multiprocessing

    from gpt_engine.worker.tensor_parallel import Mailbox
    box = Mailbox.create(multiprocessing.get_context("spawn"), 1)
    worker = Mailbox.attach(*box.for_worker(0))
    try:
        assert box.put(b"step") and worker.get() == b"step"
        assert not box.put(b"x" * Mailbox.SIZE) and worker.get() is None  # then it goes over gloo
    finally:
        worker.close()
        box.close()


def test_a_rendezvous_port_in_use_is_a_clear_error(tmp_path, monkeypatch):
    make_hf_model("gpt2", tmp_path, vocab_size=333)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for k, v in dict(NNODES="2", NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
            monkeypatch.setenv(k, v)
        with pytest.raises(OSError, match=f"rendezvous at 127.0.0.1:{port} failed.*address already in use"):
            LLM(str(tmp_path), device="cpu", tensor_parallel_size=2)
    monkeypatch.setenv("NODE_RANK", "2")
    with pytest.raises(ValueError, match=r"NODE_RANK 2 is not in \[0, NNODES=2\)"):
        LLM(str(tmp_path), device="cpu", tensor_parallel_size=2)


def test_a_hung_worker_fails_the_step_at_the_collective_timeout(tmp_path, monkeypatch):
    from gpt_engine.worker import tensor_parallel
    monkeypatch.setattr(tensor_parallel, "COLLECTIVE_TIMEOUT_S", 3.0)  # rank 0's groups: it is the one waiting
    make_hf_model("gpt2", tmp_path, vocab_size=333)
    llm = LLM(str(tmp_path), device="cpu", tensor_parallel_size=2)
    worker = llm.workers.procs[0]
    try:
        os.kill(worker.pid, signal.SIGSTOP)
        t = time.monotonic()
        with pytest.raises(RuntimeError):
            llm.generate(PROMPTS, SP, use_tqdm=False)
        assert time.monotonic() - t < 30
        assert not llm.requests and llm.block_manager.num_free_blocks == llm.block_manager.capacity
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        llm.close()
