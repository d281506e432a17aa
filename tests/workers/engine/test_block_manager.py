"""Block bookkeeping: reference counts, prefix sharing by chained hashes, LRU eviction."""
from workers.engine.block_manager import BlockManager
from workers.engine.sampling_params import SamplingParams
from workers.engine.sequence import Sequence


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams())


def run_prefill(bm, s):
    bm.match_prefix(s)
    assert bm.grow(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.register_computed(s)


def test_shared_prefix_blocks_are_reference_counted_and_reused():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(range(10), "a")  # blocks: [0-3] [4-7] [8-9]
    run_prefill(bm, a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 7
    b = seq(list(range(8)) + [99, 98, 97], "b")
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_computed_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.free(a)
    assert bm.blocks[b.block_table[0]].ref_count == 1
    bm.free(b)
    assert bm.num_free_blocks == 10


def test_the_last_token_is_always_left_to_compute():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(range(8), "a")
    run_prefill(bm, a)
    b = seq(range(8), "b")  # identical: both blocks cached, but the last token must run for logits
    bm.match_prefix(b)
    assert b.num_computed_tokens == 4


def test_same_block_after_a_different_prefix_is_not_a_hit():
    bm = BlockManager(num_blocks=10, block_size=2)
    run_prefill(bm, seq([1, 2, 3, 4, 5], "a"))
    b = seq([9, 9, 3, 4, 5], "b")
    bm.match_prefix(b)
    assert b.num_computed_tokens == 0


def test_freed_prefix_survives_until_evicted_least_recent_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5], "a")
    run_prefill(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.hash_to_block) == 2
    c = seq([1, 2, 3, 4, 7], "c")
    bm.match_prefix(c)
    assert c.num_computed_tokens == 4  # found after its owner finished
    bm.free(c)
    big = seq(range(100, 108), "big")  # needs all 4 blocks: every cached prefix is evicted
    bm.match_prefix(big)
    assert bm.grow(big, 8)
    assert bm.stats.evictions == 2 and not bm.hash_to_block


def test_grow_refuses_without_taking_anything():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(range(3))
    assert not bm.grow(s, 12)
    assert s.block_table == [] and bm.num_free_blocks == 2
