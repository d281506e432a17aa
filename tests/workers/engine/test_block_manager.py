"""Block bookkeeping: reference counts, prefix sharing by chained hashes, LRU eviction."""
from workers.engine.block_keys import BlockKeyer, new_salt
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


class ConstantKeys(BlockKeyer):
    """Every block gets the same key: only the parent and token checks stand between requests."""

    def key(self, parent, tokens):
        return b"\1" * 16


def test_a_colliding_key_never_shares_a_block_between_different_prompts():
    bm = BlockManager(num_blocks=10, block_size=4, keyer=ConstantKeys(new_salt()))
    a = seq(range(12), "a")
    run_prefill(bm, a)
    # Same first block, then other tokens; and another prompt altogether.
    # Same first block then other tokens; another prompt altogether; and the first block's tokens
    # again in second place, where only the parent check tells the cached block (computed at
    # positions 0-3, with no prefix) from what this prompt needs at positions 4-7.
    for other in (list(range(4)) + [50, 51, 52, 53, 54, 55, 56, 57, 58], [90, 91, 92, 93, 94, 95, 96, 97, 98],
                  list(range(4)) * 2 + [7]):
        b = seq(other, "b")
        bm.match_prefix(b)
        for i, bid in enumerate(b.block_table):
            assert bm.blocks[bid].token_ids == tuple(other[i * 4:(i + 1) * 4])
        assert len(b.block_table) == (1 if other[:4] == list(range(4)) else 0)
        bm.free(b)


def test_keys_are_keyed_by_the_salt_and_chained():
    tokens = list(range(8))
    a, b = BlockKeyer(new_salt()), BlockKeyer(new_salt())
    assert a.keys(tokens, 4) != b.keys(tokens, 4)  # another cluster, other keys
    assert a.keys(tokens, 4) == a.keys(tokens, 4) and len(a.keys(tokens, 4)) == 2
    assert a.keys([9, 9, 9, 9] + tokens[4:], 4)[1] != a.keys(tokens, 4)[1]  # the second key depends on the first


def test_requests_with_different_cache_salts_never_share_blocks():
    bm = BlockManager(num_blocks=20, block_size=4)

    def salted(rid, salt):
        return Sequence(rid, list(range(13)), SamplingParams(cache_salt=salt))

    a = salted("a", "tenant-1")
    run_prefill(bm, a)
    same = salted("b", "tenant-1")
    bm.match_prefix(same)
    assert same.num_computed_tokens == 12  # same tenant: shared
    other, unsalted = salted("c", "tenant-2"), salted("d", None)
    for s in (other, unsalted):
        bm.match_prefix(s)
        assert s.num_computed_tokens == 0 and not set(s.block_table) & set(a.block_table)
