import random

import pytest

from gpt_engine.core.block_manager import BlockManager


def test_random_operations_keep_invariants():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=40, block_size=4)
    tables: list[tuple[list[int], list[int]]] = []  # (block_table, tokens)
    prefixes = [[rng.randrange(5) for _ in range(12)] for _ in range(3)]
    for _ in range(2000):
        op = rng.random()
        if op < 0.35:
            toks = rng.choice(prefixes)[:rng.randrange(1, 13)] + [rng.randrange(5) for _ in range(rng.randrange(0, 9))]
            if bm.can_allocate(len(toks)):
                table, cached = bm.allocate(toks)
                assert cached % 4 == 0 and cached < len(toks)
                assert len(table) == bm.blocks_for(len(toks))
                bm.commit(table, toks, len(toks))
                tables.append((table, toks))
        elif op < 0.7 and tables:
            table, toks = rng.choice(tables)
            toks.append(rng.randrange(5))
            if bm.can_append(table, len(toks)):
                bm.append(table, len(toks))
                bm.commit(table, toks, len(toks))
            else:
                toks.pop()
        elif tables:
            table, _ = tables.pop(rng.randrange(len(tables)))
            bm.free(table)
        bm.check()
        used = {b for t, _ in tables for b in t}
        assert bm.num_free_blocks == bm.num_blocks - len(used)
        for b in bm.blocks:  # ref count = number of tables holding the block
            assert b.ref_count == sum(t.count(b.block_id) for t, _ in tables)
    for table, _ in tables:
        bm.free(table)
    bm.check()
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0


def test_hash_chain_hits_and_shares_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = list(range(10))
    ta, cached = bm.allocate(a)
    assert cached == 0
    bm.commit(ta, a, len(a))  # blocks [0:4], [4:8] full and computed
    tb, cached = bm.allocate(a[:8] + [99, 98])
    assert cached == 8 and tb[:2] == ta[:2] and tb[2] != ta[2]
    assert bm.blocks[ta[0]].ref_count == 2
    # same second block after a different first block: no hit (the hash covers the prefix)
    tc, cached = bm.allocate([7, 7, 7, 7] + a[4:8] + [1])
    assert cached == 0
    # the last token is always computed: a fully cached prompt hits all blocks but its last
    td, cached = bm.allocate(a[:8])
    assert cached == 4
    for t in (ta, tb, tc, td):
        bm.free(t)
    bm.check()
    assert bm.num_free_blocks == 10


def test_freed_cached_blocks_are_reused_lru_and_evicted():
    bm = BlockManager(num_blocks=4, block_size=2)
    x, y = [1, 2, 3], [4, 5, 6]
    tx, _ = bm.allocate(x)
    bm.commit(tx, x, 3)
    bm.free(tx)
    ty, _ = bm.allocate(y)
    bm.commit(ty, y, 3)
    bm.free(ty)
    # both cached prefixes are still findable after being freed
    t, cached = bm.allocate(x)
    assert cached == 2
    bm.free(t)
    # filling the pool evicts the least recently freed cached blocks
    big = list(range(100, 108))
    t, cached = bm.allocate(big)
    assert cached == 0 and bm.num_free_blocks == 0 and not bm.hash_to_block
    bm.free(t)
    t, cached = bm.allocate(x)
    assert cached == 0
    bm.free(t)
    bm.check()


def test_double_free_and_overallocation_raise():
    bm = BlockManager(num_blocks=2, block_size=2)
    t, _ = bm.allocate([1, 2, 3])
    copy = list(t)
    bm.free(t)
    with pytest.raises(RuntimeError):
        bm.free(copy)
    assert not bm.can_allocate(5)
    with pytest.raises(RuntimeError):
        bm.allocate([1] * 5)


def test_no_prefix_caching():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    t, _ = bm.allocate([1, 2, 3])
    bm.commit(t, [1, 2, 3], 3)
    t2, cached = bm.allocate([1, 2, 3])
    assert cached == 0
    bm.free(t), bm.free(t2)
    assert bm.num_free_blocks == 4


def test_shifted_block_never_hits():
    # a block's KV depends on every token before it: the same tokens at another position (or
    # after another prefix) must not reuse it, even when the lookup starts with that block
    bm = BlockManager(num_blocks=16, block_size=4)
    p, q, r = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    a = p + q + r + [0]
    ta, _ = bm.allocate(a)
    bm.commit(ta, a, len(a))  # three full blocks hashed: p, p|q, p|q|r
    # the sequence's second (third) block first: same tokens, shifted position
    for prompt in (q + r + [0], r + [0], q + [0]):
        t, cached = bm.allocate(prompt)
        assert cached == 0, prompt
        assert not set(t) & set(ta)
        bm.free(t)
    # the first block hits, then a cached block's tokens under another prefix must miss
    t, cached = bm.allocate(p + r + [0])
    assert cached == 4 and t[0] == ta[0] and t[1] not in ta
    bm.free(t)
    # a block repeated in its own sequence: each position is its own cache entry
    rep = p + p + p + [0]
    trep, _ = bm.allocate(rep)
    bm.commit(trep, rep, len(rep))
    assert trep[0] == ta[0]  # p at position 0 was cached already
    t, cached = bm.allocate(p + p + [0])
    assert cached == 8 and t[:2] == trep[:2]
    bm.free(t)
    t, cached = bm.allocate(p * 4 + [0])
    assert cached == 12 and t[:3] == trep[:3] and t[3] not in trep
    bm.free(t)
    bm.free(trep)
    bm.free(ta)
    bm.check()
    assert bm.num_free_blocks == 16


def test_hit_after_free_only_under_same_prefix():
    # freed blocks stay findable by hash: the same holds for them
    bm = BlockManager(num_blocks=8, block_size=2)
    a = [1, 2, 3, 4, 5, 6, 0]
    ta, _ = bm.allocate(a)
    bm.commit(ta, a, len(a))
    bm.free(ta)
    t, cached = bm.allocate([3, 4, 5, 6, 0])
    assert cached == 0
    bm.free(t)
    t, cached = bm.allocate([1, 2, 5, 6, 0])
    assert cached == 2
    bm.free(t)
    t, cached = bm.allocate(a)
    assert cached == 6
    bm.free(t)
    bm.check()
