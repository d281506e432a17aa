"""Each parallel layer cut into shards and recombined equals the unsharded layer (TGI's test).

A fake group runs every rank in this process; its collectives return the local partial, which
the test combines by hand: sum for row-parallel and embedding, concatenation for column and head.
"""
import pytest
import torch
import torch.nn.functional as F

from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                   RowParallelLinear)
from workers.parallel import TPGroup, head_shard, split_sizes
from workers.tensor_source import TensorSource

DT = torch.float64


class FakeGroup(TPGroup):
    """A rank of a group whose collectives do nothing: the test combines partials itself."""

    def all_reduce(self, x):
        return x

    def gather_last_dim(self, x, sizes):
        return x


def src(name, t):
    return TensorSource.wrap(name, t)


def shards(tp):
    return [FakeGroup(r, tp) for r in range(tp)]


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_column_parallel_concat_equals_full(tp):
    w, b, x = torch.randn(10, 6, dtype=DT), torch.randn(10, dtype=DT), torch.randn(5, 6, dtype=DT)
    outs = []
    for g in shards(tp):
        layer = ColumnParallelLinear(6, 10, True, g, DT)
        layer.weight.weight_loader(layer.weight, src("w", w))
        layer.bias.weight_loader(layer.bias, src("b", b))
        outs.append(layer(x))
    torch.testing.assert_close(torch.cat(outs, -1), F.linear(x, w, b), rtol=0, atol=1e-12)


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
@pytest.mark.parametrize("transposed", [False, True])
def test_row_parallel_sum_equals_full_and_bias_added_once(tp, transposed):
    w, b, x = torch.randn(6, 11, dtype=DT), torch.randn(6, dtype=DT), torch.randn(5, 11, dtype=DT)
    total, biases = 0, 0
    for g in shards(tp):
        layer = RowParallelLinear(11, 6, True, g, DT)
        stored = src("w", w.t().contiguous()).T if transposed else src("w", w)  # Conv1D stores [in, out]
        layer.weight.weight_loader(layer.weight, stored)
        if layer.bias is not None:
            layer.bias.weight_loader(layer.bias, src("b", b))
            biases += 1
        x_shard = x[:, layer.in_start:layer.in_end]
        total = total + layer(x_shard)
    assert biases == 1
    torch.testing.assert_close(total, F.linear(x, w, b), rtol=0, atol=1e-12)


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_merged_gate_up_holds_each_parts_slice(tp):
    gate, up, x = torch.randn(13, 6, dtype=DT), torch.randn(13, 6, dtype=DT), torch.randn(3, 6, dtype=DT)
    gates, ups = [], []
    for g in shards(tp):
        layer = MergedColumnParallelLinear(6, [13, 13], False, g, DT)
        layer.weight.weight_loader(layer.weight, src("gate", gate), 0)
        layer.weight.weight_loader(layer.weight, src("up", up), 1)
        a, c = layer(x).chunk(2, -1)
        gates.append(a), ups.append(c)
    torch.testing.assert_close(torch.cat(gates, -1), x @ gate.t(), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat(ups, -1), x @ up.t(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
@pytest.mark.parametrize("fused", [False, True])
def test_qkv_cut_by_heads_with_shared_kv_heads_copied(tp, fused):
    nh, nkv, d, hidden = 9, 3, 4, 12
    wq, wk, wv = (torch.randn(n * d, hidden, dtype=DT) for n in (nh, nkv, nkv))
    bq, bk, bv = (torch.randn(n * d, dtype=DT) for n in (nh, nkv, nkv))
    x = torch.randn(5, hidden, dtype=DT)
    q_full, k_full, v_full = F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)
    q_parts = []
    for r in range(tp):
        s = head_shard(nh, nkv, tp, r)
        layer = QKVParallelLinear(hidden, d, nh, nkv, s, True, DT)
        if fused:  # GPT-2's c_attn: one [q; k; v] tensor (here stored transposed, like Conv1D)
            w = torch.cat([wq, wk, wv]).t().contiguous()
            layer.weight.weight_loader(layer.weight, src("c_attn.weight", w).T)
            layer.bias.weight_loader(layer.bias, src("c_attn.bias", torch.cat([bq, bk, bv])))
        else:
            for sid, wt, bt in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
                layer.weight.weight_loader(layer.weight, src(sid, wt), sid)
                layer.bias.weight_loader(layer.bias, src(sid, bt), sid)
        q, k, v = layer(x)
        q_parts.append(q)
        torch.testing.assert_close(k, k_full[:, s.kv_start * d:s.kv_end * d], rtol=0, atol=1e-12)
        torch.testing.assert_close(v, v_full[:, s.kv_start * d:s.kv_end * d], rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat(q_parts, -1), q_full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_vocab_parallel_embedding_sum_equals_lookup(tp):
    table, ids = torch.randn(251, 8, dtype=DT), torch.tensor([0, 5, 62, 63, 64, 125, 126, 200, 250])
    total = 0
    for g in shards(tp):
        emb = VocabParallelEmbedding(251, 8, g, DT)
        emb.weight.weight_loader(emb.weight, src("emb", table))
        # A FakeGroup of size 1 would take the fast path; force the masked path the real group uses.
        total = total + (emb(ids) if tp > 1 else F.embedding(ids, emb.weight))
    torch.testing.assert_close(total, table[ids], rtol=0, atol=0)


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_vocab_shards_concat_equal_full_logits(tp, tied):
    table, h = torch.randn(251, 8, dtype=DT), torch.randn(4, 8, dtype=DT)
    parts = []
    for g in shards(tp):
        emb = VocabParallelEmbedding(251, 8, g, DT)
        emb.weight.weight_loader(emb.weight, src("emb", table))
        head = ParallelLMHead(251, 8, g, DT, tie_to=emb if tied else None)
        if tied:
            assert head.weight is emb.weight  # one shard serves both
        else:
            head.weight.weight_loader(head.weight, src("head", table))
        parts.append(head(h))
    assert [p.shape[-1] for p in parts] == split_sizes(251, tp)
    torch.testing.assert_close(torch.cat(parts, -1), h @ table.t(), rtol=0, atol=1e-12)


def test_tp1_group_runs_no_collective():
    g = TPGroup(0, 1)  # no process group exists: any collective would raise
    x = torch.randn(2, 5)
    assert g.gather_last_dim(x, [5]) is x and g.all_reduce(x) is x
