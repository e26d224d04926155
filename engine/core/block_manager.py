"""Block manager over a fixed pool of KV-cache blocks (no torch).

A sequence's KV cache lives in fixed-size blocks named by a block table (list of block
ids). Full blocks whose KV has been computed are registered under a hash chain
sha256(parent_hash, tokens) so a later prompt with the same prefix reuses them (prefix
caching). Freed blocks keep their hash and stay findable until the pool needs them back:
never-cached free blocks are handed out first, then cached ones least-recently-freed first.

With a sliding window of W keys on every layer (sliding_window=W), no query from position p on sees
a key before p - (W - 1): the blocks wholly before that go back to the pool as the sequence moves on
(slide), and their table entries name the null block, a real block id reserved at start (the kernels
check every entry is a block of the cache) that is never handed out, never written and never read
for a key inside the window. Released blocks that were hashed stay findable by later prompts.
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


def lora_root(lora_id: int) -> bytes | None:
    """The parent of a LoRA request's first block (None: the base model's): each adapter's KV gets a
    chain of its own. 13 bytes in: no block's input (4 bytes per token, after 0 or 32) has that length."""
    return hashlib.sha256(b"lora:" + struct.pack("<Q", lora_id)).digest() if lora_id else None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True,
                 sliding_window: int = 0):
        """sliding_window: W > 0 when every layer attends through a window of W keys (itself included);
        0 when any layer sees the whole context (then nothing is released before the sequence ends)."""
        if num_blocks < 1 or block_size < 1 or sliding_window < 0:
            raise ValueError(f"need num_blocks >= 1, block_size >= 1 and sliding_window >= 0, got {num_blocks}, "
                             f"{block_size}, {sliding_window}")
        if sliding_window and num_blocks < 2:
            raise ValueError("a windowed cache needs num_blocks >= 2: one is the reserved null block")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.window = sliding_window
        self.null_block = 0 if sliding_window else None
        self.blocks = [Block(i) for i in range(num_blocks)]
        if sliding_window:
            self.blocks[0].ref_count = 1  # held for good: never on a free list, never released
        self.hash_to_block: dict[bytes, int] = {}
        self.free_plain: deque[int] = deque(range(1 if sliding_window else 0, num_blocks))  # free, no cached content
        self.free_cached: OrderedDict[int, None] = OrderedDict()    # free, still findable by hash (LRU order)
        self.num_hit_tokens = 0     # prefix-cache statistics
        self.num_query_tokens = 0

    # ---------------------------------------------------------------- pool
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_plain) + len(self.free_cached)

    @property
    def capacity(self) -> int:
        """Blocks that can hold KV: all but the null block."""
        return self.num_blocks - (self.null_block is not None)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.capacity

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def band_blocks(self) -> int:
        """The most blocks the W keys a query sees can span (W - 1 before it, unaligned): what a windowed
        sequence holds while it decodes."""
        return self.blocks_for(self.window - 1) + 1

    def held_tokens(self, num_tokens: int) -> int:
        """Tokens' worth of blocks a sequence of num_tokens needs at least once, at its longest: all of
        them, or with a window the band's."""
        return min(num_tokens, self.band_blocks * self.block_size) if self.window else num_tokens

    def live_from(self, num_computed: int) -> int:
        """Index of the first block any query from position num_computed on can see."""
        return max(0, num_computed - self.window + 1) // self.block_size if self.window else 0

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
        """Blocks for all of a new sequence's tokens -> (block_table, num_cached_tokens)."""
        table, cached, _ = self.admit(token_ids)
        return table, cached

    def admit(self, token_ids: list[int], budget: int | None = None, read_cache: bool = True,
              root: bytes | None = None) -> tuple[list[int], int, bytes | None]:
        """Blocks for a new sequence -> (block_table, num_cached_tokens, the hash of the last cached
        block: the parent of the next one's, for commit).

        Hits are whole blocks within the first len-1 tokens, so the last token is always
        computed (its logits are needed) and no cached block is ever written again. Without a
        window (or a budget) the table holds every token; with one, the hits before the window are
        released at once and the table holds the cached tokens and at most budget more, as many
        as the free blocks hold (at least one token, else RuntimeError). read_cache=False takes no
        hits (a request scoring its prompt needs every position computed); its blocks are still
        committed for others. root: the first block's parent (lora_root: the adapter's chain)."""
        n = len(token_ids)
        windowed = self.window and budget is not None
        if not windowed and not self.can_allocate(n):
            raise RuntimeError(f"not enough free KV blocks for {n} tokens")
        table, parent, bs = [], root, self.block_size
        if self.enable_prefix_caching and read_cache:
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
        end = n
        if windowed:
            table = self.slide(table, cached)
            end = min(n, cached + budget, (len(table) + self.num_free_blocks) * bs)
            if end <= cached:
                self.free(table)
                raise RuntimeError(f"not enough free KV blocks for a window of {self.window} tokens")
        self.num_hit_tokens += cached
        self.num_query_tokens += n
        while len(table) < self.blocks_for(end):
            table.append(self._take())
        return table, cached, parent

    def can_append(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(block_table) <= self.num_free_blocks

    def append(self, block_table: list[int], num_tokens: int) -> None:
        """Grow block_table in place to hold num_tokens tokens."""
        need = self.blocks_for(num_tokens) - len(block_table)
        if need > self.num_free_blocks:
            raise RuntimeError(f"not enough free KV blocks to grow to {num_tokens} tokens")
        for _ in range(need):
            block_table.append(self._take())

    def slide(self, block_table: list[int], num_computed: int) -> list[int]:
        """Release the blocks no query from position num_computed on can see -> the table, a new list
        with null entries for them when any was released (a table's list is never changed in place
        but to grow: the runner keeps rows built from it)."""
        first = self.live_from(num_computed)
        if first == 0 or block_table[first - 1] == self.null_block:
            return block_table
        table = list(block_table)
        i = first - 1
        while i >= 0 and table[i] != self.null_block:
            self._release(table[i])
            table[i] = self.null_block
            i -= 1
        return table

    def commit(self, block_table: list[int], token_ids: list[int], num_computed: int, num_hashed: int = 0,
               parent: bytes | None = None) -> tuple[int, bytes | None]:
        """Register the hashes of full blocks whose KV is now computed (only then may others hit
        them); blocks before num_hashed are done already, parent is the hash of the last of them
        (its table entry may be null by now). Returns the new (num_hashed, parent)."""
        if not self.enable_prefix_caching:
            return num_hashed, parent
        bs = self.block_size
        end = min(num_computed // bs, len(block_table))
        for i in range(num_hashed, end):
            b = self.blocks[block_table[i]]
            if b.block_id == self.null_block:  # released before it was hashed: the chain goes on past it
                parent = block_hash(parent, token_ids[i * bs:(i + 1) * bs])
                continue
            if b.hash is None:
                b.hash = block_hash(parent, token_ids[i * bs:(i + 1) * bs])
                # a twin computed concurrently keeps the map entry; this block stays private
                self.hash_to_block.setdefault(b.hash, b.block_id)
            parent = b.hash
        return max(num_hashed, end), parent

    def free(self, block_table: list[int]) -> None:
        # last blocks first: they become the first evicted among this sequence's cached blocks
        for bid in reversed(block_table):
            if bid != self.null_block:
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
        if self.null_block is not None:
            null = self.blocks[self.null_block]
            assert null.ref_count == 1 and null.hash is None, "the null block was handed out or freed"
