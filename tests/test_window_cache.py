"""A KV cache that keeps only the sliding window's blocks (every layer windowed): the block manager and the
scheduler with a fake step, then the engine against transformers on a small Mistral whose pool holds little
more than the window. A mixed GPT-Neo model (a global layer) releases nothing."""
from __future__ import annotations

import random

import pytest

from gpt_engine import SamplingParams
from gpt_engine.core.block_manager import BlockManager, block_hash
from gpt_engine.core.intake import Intake
from gpt_engine.core.request import RequestError
from gpt_engine.core.scheduler import Scheduler, Sequence

from .test_scheduler import drain, params, run_step

W, BS = 6, 4  # a window of 6 keys spans at most blocks_for(5) + 1 = 3 blocks of 4


def real(table, bm):
    return [b for b in table if b != bm.null_block]


def held_per_step(bm, prompt_len=30, max_tokens=60, budget=8):
    """One sequence generating far past the window: (most real blocks it held at once, free blocks after each step)."""
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=256)
    seq = Sequence("a", list(range(prompt_len)), params(max_tokens=max_tokens))
    s.add(seq)
    most, free = 0, []
    while s.has_unfinished():
        run_step(s)
        most = max(most, len(real(seq.block_table, bm)))
        free.append(bm.num_free_blocks)
    assert seq.finish_reason == "length" and seq.num_output_tokens == max_tokens
    return most, free


def test_long_generation_holds_only_the_window():
    windowed = BlockManager(64, BS, sliding_window=W)
    most, free = held_per_step(windowed)
    assert windowed.band_blocks == 3
    # a prefill chunk of 8 on top of the 5 keys before it spans at most 4 blocks; decoding, the band's 3
    assert most <= 4
    plain = BlockManager(64, BS)
    most_plain, free_plain = held_per_step(plain)
    assert most_plain == plain.blocks_for(30 + 60 - 2)  # up to the last step's, whose end frees it
    # the saving: the windowed pool keeps nearly all of itself free while the plain one fills up
    assert min(free) >= windowed.capacity - 4
    assert min(free_plain) <= plain.capacity - 22
    for bm in (windowed, plain):  # everything back after the finish
        bm.check()
        assert bm.num_free_blocks == bm.capacity


def test_released_entries_are_the_null_block_and_never_handed_out():
    bm = BlockManager(8, BS, sliding_window=W)
    assert bm.capacity == 7 and bm.null_block == 0 and 0 not in bm.free_plain
    table, cached, _ = bm.admit(list(range(20)), budget=20)
    assert cached == 0 and len(table) == 5 and 0 not in table
    table = bm.slide(table, 20)  # next query at 20 sees keys 15..20: blocks 0..2 (tokens 0..11) are behind it
    assert table[:3] == [0, 0, 0] and 0 not in table[3:]
    assert bm.num_free_blocks == 7 - 2
    # released before they were hashed: the chain still runs through them to the blocks that stay
    assert bm.commit(table, list(range(20)), 20) == (5, chain(list(range(20)), 5)[-1])
    assert set(bm.hash_to_block) == set(chain(list(range(20)), 5)[3:])
    bm.free(table)
    bm.check()
    assert bm.num_free_blocks == 7


def test_request_longer_than_the_pool_runs_when_windowed():
    """A pool of 4 blocks (16 tokens) and sequences of 90: refused without the window, served with it."""
    with pytest.raises(RequestError, match="never fit"):
        Intake(None, 100, 256, BlockManager(5, BS)).prepare(list(range(30)), SamplingParams(max_tokens=60))
    bm = BlockManager(5, BS, sliding_window=W)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=256)
    seqs = [Sequence(str(i), [i] * (30 + i), params(max_tokens=60)) for i in range(3)]
    for q in seqs:
        s.add(q)
    drain(s)
    assert all(q.finish_reason == "length" and q.num_output_tokens == 60 for q in seqs)
    assert bm.num_free_blocks == bm.capacity
    # a window that cannot fit is still refused: 3 blocks needed, 2 there
    with pytest.raises(RequestError, match="never fit"):
        Intake(None, 100, 256, BlockManager(3, BS, sliding_window=W)).prepare([1] * 9, SamplingParams(max_tokens=60))


def chain(tokens, n_blocks):
    out, parent = [], None
    for i in range(n_blocks):
        parent = block_hash(parent, tokens[i * BS:(i + 1) * BS])
        out.append(parent)
    return out


@pytest.mark.parametrize("window", [W, 3])
def test_prefix_cache_stays_correct_past_the_window(window):
    """Blocks released behind the window keep their hashes (a repeat of the prompt hits them), the chain goes on
    from the sequence's own last hash (a window within a block releases the last hashed block before the next
    is hashed), and a sequence that hits shared blocks then slides past them drops exactly its own references."""
    bm = BlockManager(64, BS, sliding_window=window)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=256)
    prompt = [random.Random(0).randrange(50) for _ in range(41)]
    a = Sequence("a", prompt, params(max_tokens=12))
    s.add(a)
    drain(s)
    full = a.token_ids
    want = chain(full, (len(full) - 1) // BS)  # every block computed: all but the last token's
    assert all(h in bm.hash_to_block for h in want)  # the chain through released entries is the tokens' own
    # two repeats at once: both hit the 10 cached blocks, share the ones in the window, then slide off them
    b, c = Sequence("b", prompt, params(max_tokens=12)), Sequence("c", prompt, params(max_tokens=12))
    s.add(b)
    s.add(c)
    run_step(s)
    assert b.num_cached_tokens == c.num_cached_tokens == 40
    shared = set(real(b.block_table, bm)) & set(real(c.block_table, bm))
    assert shared and all(bm.blocks[x].ref_count == 2 for x in shared)
    while s.has_unfinished():
        run_step(s)
        for x in bm.blocks[1:]:  # a block's references are the tables that name it
            assert x.ref_count == sum(q.block_table.count(x.block_id) for q in (b, c))
    assert b.token_ids == c.token_ids == full[:41] + b.output_token_ids
    assert bm.num_free_blocks == bm.capacity


def test_preempt_and_abort_free_only_real_blocks():
    """A pool too small for all the windows at once: sequences are preempted (with null entries in their tables)
    and re-admitted; aborts mid-way; nothing leaks and the null block stays reserved."""
    bm = BlockManager(8, BS, sliding_window=W)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=12, max_model_len=256)
    seqs = [Sequence(str(i), [i % 5] * (20 + 3 * i), params(max_tokens=40)) for i in range(6)]
    for q in seqs:
        s.add(q)
    nulls = False
    while s.num_preemptions < 3:
        run_step(s)
        nulls |= any(bm.null_block in q.block_table for q in s.running)
    assert nulls
    s.finish(seqs[1], "abort")
    s.finish(seqs[4], "abort")
    bm.check()
    drain(s)
    assert bm.num_free_blocks == bm.capacity
    assert [q.finish_reason for q in seqs] == ["length", "abort", "length", "length", "abort", "length"]


# ---------------------------------------------------------------- the engine against transformers

EW = 8  # the models' window
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    from .helpers import make_hf_model
    d = tmp_path_factory.mktemp("mistral-window")
    return d, make_hf_model("mistral", d, sliding_window=EW, initializer_range=0.1)


def _prompts():
    import torch
    return [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            for n in (5, 3 * EW + 1, 45)]


@pytest.mark.usefixtures("torch_cpu_path")
@pytest.mark.parametrize("blocks,budget", [(10, 2048), (10, 12), (64, 12)])
def test_windowed_engine_matches_transformers(mistral, blocks, budget):
    """Prompts and generations several windows long, with prefix caching on; with budget 12 the long prompts
    prefill in chunks. A pool of 9 usable blocks of 4 holds less than one sequence; one of 63 keeps the released
    blocks findable, and the repeated prompts hit them."""
    from gpt_engine.llm import LLM
    from gpt_engine import SamplingParams

    from .helpers import hf_greedy
    d, hf = mistral
    prompts = _prompts()
    sp = SamplingParams(max_tokens=40, **GREEDY)
    want = [hf_greedy(hf, p, sp.max_tokens) for p in prompts]
    llm = LLM(str(d), device="cpu", block_size=4, num_kv_blocks=blocks, max_num_batched_tokens=budget)
    bm = llm.block_manager
    assert bm.window == EW and llm.max_model_len == 128  # not clamped to the pool
    assert [o.token_ids for o in llm.generate(prompts, sp, use_tqdm=False)] == want
    assert [o.token_ids for o in llm.generate(prompts[::-1], sp, use_tqdm=False)] == want[::-1]
    if blocks == 64:
        assert llm.stats()["prefix_cache_hit_tokens"] >= 4 + 24 + 44
    bm.check()
    assert bm.num_free_blocks == bm.capacity


@pytest.mark.usefixtures("torch_cpu_path")
def test_pool_of_just_the_window(mistral):
    """A pool whose free blocks are one window's band: a 45-token prompt generating 60 runs alone, in chunks
    that fit; each step it holds at most the band."""
    from gpt_engine.llm import LLM
    from gpt_engine import SamplingParams

    from .helpers import hf_greedy
    d, hf = mistral
    prompt = _prompts()[2]
    llm = LLM(str(d), device="cpu", block_size=4, num_kv_blocks=4)
    bm = llm.block_manager
    assert bm.capacity == bm.band_blocks == 3
    seq = llm.add_request(prompt, SamplingParams(max_tokens=60, **GREEDY))
    out = None
    while llm.has_unfinished():
        outs = llm.step()
        assert len(real(seq.block_table, bm)) <= 3
        out = outs[0] if outs else out
    assert out.token_ids == hf_greedy(hf, prompt, 60)
    # one block short of the band: the context is what the pool holds, as without a window
    assert LLM(str(d), device="cpu", block_size=4, num_kv_blocks=3).max_model_len == 8


@pytest.mark.usefixtures("torch_cpu_path")
def test_mixed_model_releases_nothing(tmp_path):
    """GPT-Neo's global layer reads every key: no block is released, every table entry stays a real block."""
    from gpt_engine.llm import LLM
    from gpt_engine import SamplingParams

    from .helpers import hf_greedy, make_hf_model
    hf = make_hf_model("gpt_neo", tmp_path, window_size=EW, initializer_range=0.1)
    prompt = _prompts()[1]
    llm = LLM(str(tmp_path), device="cpu", block_size=4, max_num_batched_tokens=12)
    bm = llm.block_manager
    assert bm.window == 0 and bm.null_block is None
    seq = llm.add_request(prompt, SamplingParams(max_tokens=30, **GREEDY))
    out, most = None, 0
    while llm.has_unfinished():
        outs = llm.step()
        if not seq.is_finished:
            assert len(seq.block_table) >= bm.blocks_for(seq.num_computed_tokens)
            assert bm.num_free_blocks == bm.capacity - len(set(seq.block_table))
            most = max(most, len(seq.block_table))
        out = outs[0] if outs else out
    assert most == bm.blocks_for(len(prompt) + 30 - 2)  # every block up to the last step's
    assert out.token_ids == hf_greedy(hf, prompt, 30)
