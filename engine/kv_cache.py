"""Block manager over a fixed pool of KV-cache blocks (no torch).

A sequence's KV cache lives in fixed-size blocks named by a block table (list of block
ids). Full blocks whose KV has been computed are registered under a hash chain
sha256(parent_hash, tokens) so a later prompt with the same prefix reuses them (prefix
caching). Freed blocks keep their hash and stay findable until the pool needs them back:
never-cached free blocks are handed out first, then cached ones least-recently-freed first.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id, self.ref_count, self.hash = block_id, 0, None


def block_hash(parent: bytes | None, tokens) -> bytes:
    """sha256(parent's digest, the block's token ids as little-endian uint32): a cryptographic
    hash, so no crafted prompt can land on another user's cached prefix (Python's 64-bit tuple
    hash can be collided on purpose)."""
    h = hashlib.sha256(parent or b"")
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[bytes, int] = {}
        self.free_plain: deque[int] = deque(range(num_blocks))     # free, no cached content
        self.free_cached: OrderedDict[int, None] = OrderedDict()    # free, still findable by hash (LRU order)
        self.num_hit_tokens = 0     # prefix-cache statistics
        self.num_query_tokens = 0

    # ---------------------------------------------------------------- pool
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_plain) + len(self.free_cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        if self.free_plain:
            bid = self.free_plain.popleft()
        else:  # evict the least recently freed cached block
            bid, _ = self.free_cached.popitem(last=False)
            self._forget(bid)
        b = self.blocks[bid]
        assert b.ref_count == 0, f"block {bid} handed out while in use"
        b.ref_count = 1
        return bid

    def _forget(self, bid: int) -> None:
        b = self.blocks[bid]
        if b.hash is not None and self.hash_to_block.get(b.hash) == bid:
            del self.hash_to_block[b.hash]
        b.hash = None

    def _release(self, bid: int) -> None:
        b = self.blocks[bid]
        if b.ref_count <= 0:
            raise RuntimeError(f"double free of block {bid}")
        b.ref_count -= 1
        if b.ref_count == 0:
            if b.hash is not None and self.hash_to_block.get(b.hash) == bid:
                self.free_cached[bid] = None
            else:
                b.hash = None
                self.free_plain.append(bid)

    # ---------------------------------------------------------------- sequences
    def can_allocate(self, num_tokens: int) -> bool:
        # pessimistic: ignores prefix hits (a hit on a free cached block still uses a free slot)
        return self.blocks_for(num_tokens) <= self.num_free_blocks

    def allocate(self, token_ids: list[int]) -> tuple[list[int], int]:
        """Blocks for a new sequence's tokens -> (block_table, num_cached_tokens).

        Hits are whole blocks within the first len-1 tokens, so the last token is always
        computed (its logits are needed) and no cached block is ever written again."""
        n = len(token_ids)
        if not self.can_allocate(n):
            raise RuntimeError(f"not enough free KV blocks for {n} tokens")
        table, parent, bs = [], None, self.block_size
        if self.enable_prefix_caching:
            for i in range((n - 1) // bs):
                h = block_hash(parent, token_ids[i * bs:(i + 1) * bs])
                bid = self.hash_to_block.get(h)
                if bid is None:
                    break
                b = self.blocks[bid]
                if b.ref_count == 0:
                    del self.free_cached[bid]
                b.ref_count += 1
                table.append(bid)
                parent = h
        cached = len(table) * bs
        self.num_hit_tokens += cached
        self.num_query_tokens += n
        while len(table) < self.blocks_for(n):
            table.append(self._take())
        return table, cached

    def can_append(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(block_table) <= self.num_free_blocks

    def append(self, block_table: list[int], num_tokens: int) -> None:
        """Grow block_table in place to hold num_tokens tokens."""
        need = self.blocks_for(num_tokens) - len(block_table)
        if need > self.num_free_blocks:
            raise RuntimeError(f"not enough free KV blocks to grow to {num_tokens} tokens")
        for _ in range(need):
            block_table.append(self._take())

    def commit(self, block_table: list[int], token_ids: list[int], num_computed: int, num_hashed: int = 0) -> int:
        """Register the hashes of full blocks whose KV is now computed (only then may others hit
        them); blocks before num_hashed are done already. Returns the new num_hashed."""
        if not self.enable_prefix_caching:
            return num_hashed
        bs = self.block_size
        parent = self.blocks[block_table[num_hashed - 1]].hash if num_hashed else None
        end = min(num_computed // bs, len(block_table))
        for i in range(num_hashed, end):
            b = self.blocks[block_table[i]]
            if b.hash is None:
                b.hash = block_hash(parent, token_ids[i * bs:(i + 1) * bs])
                # a twin computed concurrently keeps the map entry; this block stays private
                self.hash_to_block.setdefault(b.hash, b.block_id)
            parent = b.hash
        return max(num_hashed, end)

    def free(self, block_table: list[int]) -> None:
        # last blocks first: they become the first evicted among this sequence's cached blocks
        for bid in reversed(block_table):
            self._release(bid)
        block_table.clear()

    def check(self) -> None:
        """Invariants (tests): free lists and ref counts agree, the hash map points at hashed blocks."""
        free = list(self.free_plain) + list(self.free_cached)
        free_set = set(free)
        assert len(free) == len(free_set), "block on a free list twice"
        for b in self.blocks:
            assert (b.ref_count == 0) == (b.block_id in free_set), f"block {b.block_id} ref {b.ref_count}"
            assert b.ref_count >= 0
        for h, bid in self.hash_to_block.items():
            assert self.blocks[bid].hash == h
        for bid in self.free_cached:
            assert self.blocks[bid].hash is not None
