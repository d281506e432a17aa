"""The shard rule: contiguous ranges, sizes within one, larger first; GQA head ownership."""
import pytest

from workers.errors import ConfigError
from workers.parallel import head_shard, shard_range, split_sizes


CASES = [(n, p) for n in (1, 7, 9, 64, 251, 1536) for p in (1, 2, 3, 4, 7) if p <= n]


@pytest.mark.parametrize(("n", "parts"), CASES)
def test_split_sizes_cover_contiguously_with_larger_ranges_first(n, parts):
    sizes = split_sizes(n, parts)
    assert sum(sizes) == n and len(sizes) == parts
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)
    ends = [shard_range(n, parts, r) for r in range(parts)]
    assert ends[0][0] == 0 and ends[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ends, ends[1:]))


def test_smollm2_head_cut_at_tp2_copies_the_shared_kv_head():
    r0, r1 = head_shard(9, 3, 2, 0), head_shard(9, 3, 2, 1)
    assert (r0.q_start, r0.q_end, r0.kv_start, r0.kv_end) == (0, 5, 0, 2)
    assert (r1.q_start, r1.q_end, r1.kv_start, r1.kv_end) == (5, 9, 1, 3)
    assert r0.kv_index() == [0, 0, 0, 1, 1]
    assert r1.kv_index() == [0, 1, 1, 1]


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 9])
def test_every_query_head_owned_once_with_its_kv_head(tp):
    owned = []
    for r in range(tp):
        s = head_shard(9, 3, tp, r)
        for i, h in enumerate(range(s.q_start, s.q_end)):
            owned.append(h)
            assert s.kv_start + s.kv_index()[i] == h // 3
    assert owned == list(range(9))


def test_tp_above_head_count_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="tp=10 exceeds the model's 9 query heads"):
        head_shard(9, 3, 10, 0)


def test_more_parts_than_items_is_refused():
    with pytest.raises(ConfigError, match="tp_size"):
        split_sizes(3, 4)
