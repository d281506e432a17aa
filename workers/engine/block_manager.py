"""The paged KV cache's bookkeeping: fixed-size blocks, a free list, reference counts, and a
prefix cache of full blocks keyed by their whole token prefix (`block_keys`: a keyed chain hash).
A hit also compares the block's parent key and its own tokens, so even a key collision cannot
hand one request another's KV.

A freed block that holds a hashed prefix is not wiped: it waits in an LRU list where a later
request with the same prefix can pick it up, and is evicted (oldest first) only when a fresh
block is needed and the plain free list is empty.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from workers.engine.block_keys import BlockKey, BlockKeyer, new_salt
from workers.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: BlockKey | None = None
    # Checked on a hit, with the parent key: a key collision is a miss, never a wrong block.
    token_ids: tuple[int, ...] = field(default_factory=tuple)
    parent: BlockKey | None = None


@dataclass(slots=True)
class KVEventLog:
    """Keys that became findable (stored) or stopped being findable (removed) since the last
    `take`: what a router's index of this cache needs to stay exact."""

    stored: list[BlockKey] = field(default_factory=list)
    removed: list[BlockKey] = field(default_factory=list)

    def take(self) -> tuple[list[BlockKey], list[BlockKey]]:
        out = self.stored, self.removed
        self.stored, self.removed = [], []
        return out


@dataclass(slots=True)
class BlockStats:
    prefix_hit_tokens: int = 0
    prefix_queried_tokens: int = 0
    evictions: int = 0


class BlockManager:
    """Owns block ids [0, num_blocks); sequences hold them in their block tables."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 keyer: BlockKeyer | None = None):
        self.keyer = keyer or BlockKeyer(new_salt())
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # ref 0 but holding a hashed prefix, LRU first
        self.hash_to_block: dict[BlockKey, int] = {}
        self.stats = BlockStats()
        self.events = KVEventLog()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.cached_free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        if self.free_ids:
            bid = self.free_ids.popleft()
        else:
            bid, _ = self.cached_free.popitem(last=False)  # evict the least recently used prefix
            self.stats.evictions += 1
            blk = self.blocks[bid]
            if blk.hash is not None and self.hash_to_block.get(blk.hash) == bid:
                del self.hash_to_block[blk.hash]
                self.events.removed.append(blk.hash)
        blk = self.blocks[bid]
        blk.hash, blk.token_ids, blk.parent, blk.ref_count = None, (), None, 1
        return bid

    def _ref(self, bid: int) -> None:
        blk = self.blocks[bid]
        if blk.ref_count == 0:
            self.cached_free.pop(bid, None)
        blk.ref_count += 1

    def _lookup(self, tokens, usable: int, root: BlockKey | None) -> list[tuple[int, BlockKey]]:
        """(block id, key) of the cached blocks that start `tokens`, up to `usable` blocks."""
        found, prev, bs = [], root, self.block_size
        for i in range(usable):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = self.keyer.key(prev, chunk)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != chunk or self.blocks[bid].parent != prev:
                break
            found.append((bid, h))
            prev = h
        return found

    def reads_cache(self, seq: Sequence) -> bool:
        """A request that asks for its prompt's logprobs runs every prompt position (their logits
        are the answer), so it takes nothing from the cache; its blocks are still cached for others."""
        return self.enable_prefix_caching and seq.params.prompt_logprobs is None

    def cached_prefix_tokens(self, seq: Sequence) -> int:
        """Tokens a prefix match would serve from the cache now (nothing is taken)."""
        if not self.reads_cache(seq):
            return 0
        usable = (seq.num_tokens - 1) // self.block_size
        return len(self._lookup(seq.all_token_ids, usable, self.keyer.root(seq.params.cache_salt))) * self.block_size

    def match_prefix(self, seq: Sequence) -> None:
        """Admit a sequence with no blocks: share every cached full block of its prefix.

        At least the last token is left to compute, because the step that computes it yields
        the logits for the next token.
        """
        tokens = seq.all_token_ids
        usable = (len(tokens) - 1) // self.block_size
        self.stats.prefix_queried_tokens += len(seq.prompt_token_ids)
        if self.reads_cache(seq):
            for bid, h in self._lookup(tokens, usable, self.keyer.root(seq.params.cache_salt)):
                self._ref(bid)
                seq.block_table.append(bid)
                seq.block_hashes.append(h)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        seq.num_prefix_cached_tokens = min(seq.num_computed_tokens, len(seq.prompt_token_ids))
        self.stats.prefix_hit_tokens += seq.num_prefix_cached_tokens

    def cached_keys(self) -> list[BlockKey]:
        """Every key a prefix match can find now (a digest for a router's index)."""
        return list(self.hash_to_block)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give seq enough blocks for num_tokens; False (and nothing taken) if too few are free."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._take())
        return True

    def shrink(self, seq: Sequence, num_tokens: int) -> None:
        """Return seq's blocks past what num_tokens need: the tail a rejected proposal grew. They
        hold no accepted token, so none is hashed or shared."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > max(keep, len(seq.block_hashes)):
            blk = self.blocks[seq.block_table.pop()]
            blk.ref_count -= 1
            if blk.ref_count == 0:
                blk.hash, blk.token_ids, blk.parent = None, (), None
                self.free_ids.append(blk.block_id)

    def register_computed(self, seq: Sequence) -> None:
        """Hash the blocks that became full and computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens, seq.num_tokens) // bs
        prev = seq.block_hashes[-1] if seq.block_hashes else self.keyer.root(seq.params.cache_salt)
        for i in range(len(seq.block_hashes), full):
            chunk = tuple(seq.token_at(j) for j in range(i * bs, (i + 1) * bs))
            h = self.keyer.key(prev, chunk)
            blk = self.blocks[seq.block_table[i]]
            if h not in self.hash_to_block:
                self.hash_to_block[h] = blk.block_id
                blk.hash, blk.token_ids, blk.parent = h, chunk, prev
                self.events.stored.append(h)
            seq.block_hashes.append(h)
            prev = h

    def free(self, seq: Sequence) -> None:
        """Return every block of seq; hashed ones stay findable until evicted."""
        for bid in reversed(seq.block_table):  # tail first, so a prefix's head is evicted last
            blk = self.blocks[bid]
            blk.ref_count -= 1
            if blk.ref_count == 0:
                if blk.hash is not None and self.hash_to_block.get(blk.hash) == bid:
                    self.cached_free[bid] = None
                else:
                    blk.hash, blk.token_ids, blk.parent = None, (), None
                    self.free_ids.append(bid)
        seq.block_table, seq.block_hashes = [], []
