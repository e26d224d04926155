"""Scheduler alone (no model): a fake step samples token = position % 7; request.check_stop
ends the requests, as LLM.step does."""
from types import SimpleNamespace

import pytest

from gpt_engine.core.block_manager import BlockManager
from gpt_engine.core.request import Request, check_stop
from gpt_engine.core.scheduler import Scheduler, Sequence, Status


def params(max_tokens=8, **kw):
    return SimpleNamespace(**{"max_tokens": max_tokens, "ignore_eos": True, "stop_token_ids": [], "stop": [],
                              "logprobs": None, "min_tokens": 0, **kw})


def run_step(s: Scheduler, eos=()):
    batch = s.schedule()
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        assert seq.num_computed_tokens + n <= seq.num_tokens
        assert len(seq.block_table) * s.bm.block_size >= seq.num_computed_tokens + n
    assert batch.num_tokens <= s.max_num_batched_tokens and len(batch) <= s.max_num_seqs
    sampled = [seq.num_tokens % 7 if smp else None for seq, smp in zip(batch.seqs, batch.sample)]
    for i in s.postprocess(batch, sampled):
        seq = batch.seqs[i]
        reason = check_stop(Request(seq, None, None, eos, False), s.max_model_len)
        if reason is not None:
            s.finish(seq, reason)
    s.bm.check()
    # running stays in arrival order (re-admitted preempted ones too): the batch's order rests on it
    assert [q.arrival for q in s.running] == sorted(q.arrival for q in s.running)
    return batch


def drain(s, limit=1000, eos=()):
    steps = 0
    while s.has_unfinished():
        run_step(s, eos)
        steps += 1
        assert steps < limit
    return steps


def test_chunked_prefill_splits_long_prompt_and_mixes_decodes():
    bm = BlockManager(64, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10, max_model_len=128)
    short = Sequence("a", [1, 2], params(max_tokens=5))
    s.add(short)
    run_step(s)  # prefill of the short one
    long = Sequence("b", list(range(25)), params(max_tokens=3))
    s.add(long)
    b = run_step(s)
    assert dict(zip([q.request_id for q in b.seqs], b.num_new_tokens)) == {"a": 1, "b": 9}
    assert b.sample == [True, False]
    chunks = [9]
    while long.num_computed_tokens < 25:
        b = run_step(s)
        chunks.append(dict(zip([q.request_id for q in b.seqs], b.num_new_tokens)).get("b", 0))
    assert sum(chunks) == 25 and max(chunks) <= 10 and len(chunks) >= 3
    drain(s)
    assert short.finish_reason == long.finish_reason == "length"
    assert short.num_output_tokens == 5 and long.num_output_tokens == 3
    assert bm.num_free_blocks == bm.num_blocks


def test_preemption_with_a_tiny_pool_finishes_everything_and_leaks_nothing():
    bm = BlockManager(8, 4)  # 32 slots for 4 sequences that grow to 20 tokens each
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    seqs = [Sequence(f"r{i}", [i + 1] * 6, params(max_tokens=14)) for i in range(4)]
    for q in seqs:
        s.add(q)
    drain(s)
    assert s.num_preemptions > 0
    assert all(q.finish_reason == "length" and q.num_output_tokens == 14 for q in seqs)
    # a preempted sequence resumes where it was: outputs follow the fake rule token = position % 7
    for q in seqs:
        assert q.output_token_ids == [(6 + i) % 7 for i in range(14)]
    assert bm.num_free_blocks == bm.num_blocks


def test_preemption_takes_the_newest():
    bm = BlockManager(6, 2)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    old, new = Sequence("old", [1, 2, 3], params(9)), Sequence("new", [4, 5, 6], params(9))
    s.add(old), s.add(new)
    while s.num_preemptions == 0:
        run_step(s)
    assert new.status is Status.WAITING and old.status is Status.RUNNING
    assert new.block_table == [] and new.num_computed_tokens == 0


def test_preemption_takes_the_newest_of_many():
    # the victim is the newest running sequence, not merely one other than the one that grows
    bm = BlockManager(9, 2)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    seqs = [Sequence(n, [1, 2, 3], params(9)) for n in ("a", "b", "c")]
    for q in seqs:
        s.add(q)
    while s.num_preemptions == 0:
        run_step(s)
    assert [q.status for q in seqs] == [Status.RUNNING, Status.RUNNING, Status.WAITING]


def test_abort_frees_blocks_at_once():
    bm = BlockManager(16, 4)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    a, b = Sequence("a", list(range(9)), params(20)), Sequence("b", list(range(5)), params(20))
    s.add(a), s.add(b)
    run_step(s)
    run_step(s)
    used = bm.num_blocks - bm.num_free_blocks
    s.finish(a, "abort")
    assert a.status is Status.FINISHED and a.finish_reason == "abort" and a.block_table == []
    assert bm.num_blocks - bm.num_free_blocks < used
    s.finish(a, "abort")  # twice: nothing more happens
    assert bm.num_blocks - bm.num_free_blocks < used and s.finished_ids == ["a"]
    s.finish(b, "abort")
    assert not s.has_unfinished() and bm.num_free_blocks == bm.num_blocks
    # aborting a waiting request too
    c = Sequence("c", [1], params())
    s.add(c)
    s.finish(c, "abort")
    assert not s.waiting


def test_prefix_cache_hit_skips_computed_tokens():
    bm = BlockManager(32, 4)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    prefix = list(range(10, 22))  # 3 full blocks
    a = Sequence("a", prefix + [1, 2], params(2))
    s.add(a)
    drain(s)
    b = Sequence("b", prefix + [3], params(2))
    s.add(b)
    batch = run_step(s)
    assert b.num_cached_tokens == 12 and batch.num_new_tokens == [1]
    drain(s)
    # a prompt that is entirely cached still recomputes its last block (its logits are needed)
    c = Sequence("c", prefix, params(1))
    s.add(c)
    batch = run_step(s)
    assert c.num_cached_tokens == 8 and batch.num_new_tokens == [4]
    drain(s)
    assert bm.num_free_blocks == bm.num_blocks


def test_eos_and_stop_tokens_finish():
    bm = BlockManager(16, 4)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    # fake tokens: num_tokens % 7 -> prompt of 3 samples 3, then 4, 5, ...
    a = Sequence("a", [0, 0, 0], params(10, ignore_eos=False))
    b = Sequence("b", [0, 0, 0], params(10, ignore_eos=False, stop_token_ids=[4]))
    c = Sequence("c", [0, 0, 0], params(10))
    for q in (a, b, c):
        s.add(q)
    drain(s, eos=[5, 6])
    assert a.output_token_ids == [3, 4, 5] and a.finish_reason == "stop"
    assert b.output_token_ids == [3, 4] and b.finish_reason == "stop"
    assert c.num_output_tokens == 10 and c.finish_reason == "length"
    # the context limit ends a request too
    d = Sequence("d", [0] * 60, params(10))
    s.add(d)
    drain(s)
    assert d.num_tokens == 64 and d.finish_reason == "length"
    # min_tokens: a stop token before then does not end the request (the sampler bans them; the rule is one)
    e = Sequence("e", [0, 0, 0], params(10, ignore_eos=False, stop_token_ids=[4], min_tokens=3))
    s.add(e)
    drain(s, eos=[5])
    assert e.output_token_ids == [3, 4, 5, 6, 0, 1, 2, 3, 4] and e.finish_reason == "stop"


def test_max_num_seqs_caps_the_batch():
    bm = BlockManager(64, 4)
    s = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64)
    for i in range(5):
        s.add(Sequence(f"r{i}", [1, 2, 3], params(3)))
    b = run_step(s)
    assert len(b) == 2 and len(s.waiting) == 3
    drain(s)
    assert bm.num_free_blocks == bm.num_blocks


def test_request_that_could_outgrow_the_pool_is_refused_at_intake():
    from gpt_engine import SamplingParams
    from gpt_engine.core.intake import Intake
    intake = Intake(None, 10, 64, BlockManager(4, 4))
    with pytest.raises(ValueError, match="never fit"):
        intake.prepare([0] * 10, SamplingParams(max_tokens=10))  # up to 20 tokens > 16 slots
    r = intake.prepare([0] * 10, SamplingParams(max_tokens=6))
    s = Scheduler(BlockManager(4, 4), max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    s.add(Sequence("ok", r.prompt_token_ids, r.params))


class Gate:
    def __init__(self):
        self.open = False

    def done(self):
        return self.open


@pytest.mark.parametrize("prompt_len", [1, 2, 9, 30])
def test_a_shut_gate_holds_back_sampling_while_others_run(prompt_len):
    """A gated sequence (its grammar compiling) computes its prompt but for the last token, chunk by chunk,
    and does not sample while the others decode; once its gate opens it samples, and nothing leaks."""
    bm = BlockManager(64, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8, max_model_len=128)
    gate = Gate()
    other = Sequence("free", [5, 6, 7], params(max_tokens=20))
    gated = Sequence("gated", list(range(prompt_len)), params(max_tokens=3), gate=gate)
    s.add(other)
    s.add(gated)
    for _ in range(8):
        batch = run_step(s)
        assert other in batch.seqs
        if gated in batch.seqs:
            assert not batch.sample[batch.seqs.index(gated)]
    assert gated.status is Status.RUNNING and gated.num_computed_tokens == prompt_len - 1
    assert gated.num_output_tokens == 0 and other.num_output_tokens == 8  # the other one never waited
    gate.open = True
    batch = run_step(s)
    i = batch.seqs.index(gated)
    assert batch.num_new_tokens[i] == 1 and batch.sample[i] and gated.gate is None
    drain(s)
    assert gated.num_output_tokens == 3 and other.num_output_tokens == 20
    assert bm.num_free_blocks == bm.capacity


def test_a_gated_sequence_alone_samples():
    """Alone, a gated sequence samples at once: there is nothing for the step to let through instead (the
    engine's step then waits for the gate)."""
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128)
    gate = Gate()
    gated = Sequence("gated", list(range(9)), params(max_tokens=2), gate=gate)
    s.add(gated)
    batch = run_step(s)
    assert batch.num_new_tokens == [9] and batch.sample == [True] and gated.gate is gate


def test_a_gated_sequence_survives_preemption():
    """Preempted while its gate is shut, it is recomputed, and samples only once it may."""
    bm = BlockManager(6, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    gate = Gate()
    hog = Sequence("hog", list(range(8)), params(max_tokens=16))
    gated = Sequence("gated", list(range(6)), params(max_tokens=2), gate=gate)
    s.add(hog)
    s.add(gated)
    for _ in range(10):
        batch = run_step(s)
        assert gated not in batch.seqs or not batch.sample[batch.seqs.index(gated)]
    assert s.num_preemptions >= 1 and gated.num_output_tokens == 0
    gate.open = True
    drain(s)
    assert gated.num_output_tokens == 2 and hog.num_output_tokens == 16
    assert bm.num_free_blocks == bm.capacity
