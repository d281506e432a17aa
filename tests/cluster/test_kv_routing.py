"""The KV index and the routing policies, without Ray: the index follows a replica's reports,
survives a missed report and a replica's death, stays within each replica's block count; the
policies choose as documented; the balance guard fires on one hot prefix (the simulator drives
the real policy and the engine's own scheduler and block manager)."""
from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.kv_index import KVIndex
from cluster.routing import RoutingConfig, RoutingPolicy
from cluster.modelled_executor import CostModel, ReplicaModel
from cluster.simulator import SimRequest, simulate
from workers.engine.block_keys import BlockKeyer, new_salt
from workers.engine.messages import EngineLoad, KVDigest, KVEvents

KEYER = BlockKeyer(new_salt())


def keys(tokens, bs=4):
    return KEYER.keys(tokens, bs)


def ev(seq, stored=(), removed=(), num_blocks=100):
    return KVEvents(seq, list(stored), list(removed), EngineLoad(num_blocks=num_blocks))


def test_the_index_follows_reports_and_a_gap_or_a_new_replica_asks_for_a_digest():
    idx = KVIndex()
    idx.slot("r1")  # the router gives a replica its slot when it adds it; reports alone never do
    a = keys(list(range(40)))  # 10 blocks
    assert idx.apply("r1", ev(1, a[:6])) is True  # first report: this frontend joined late, digest it
    idx.apply_digest("r1", KVDigest(1, a[:6], 100, 4))
    assert idx.apply("r1", ev(2, a[6:8])) is False
    slot = idx.slot("r1")
    assert idx.match(a, 1 << slot) == {slot: 8}
    assert idx.apply("r1", ev(3, removed=a[2:3])) is False
    assert idx.match(a, 1 << slot) == {slot: 2}  # a chain stops at its first missing block

    # Report 4 is lost: 5 arrives, and the index asks for a digest, which replaces what it held.
    assert idx.apply("r1", ev(5, a[8:10])) is True
    assert idx.gaps == 1
    truth = a[:3] + a[3:5]  # what the engine holds by then
    idx.apply_digest("r1", KVDigest(5, truth, 100, 4))
    assert idx.keys_of("r1") == set(truth) and idx.match(a, 1 << slot) == {slot: 5}
    assert idx.apply("r1", ev(6)) is False  # in sequence again


def test_the_index_forgets_a_dead_replica_and_keeps_what_others_hold():
    idx = KVIndex()
    shared, own = keys(list(range(16))), keys(list(range(100, 116)))
    for rid, k in (("r1", shared + own), ("r2", shared)):
        idx.slot(rid)
        idx.apply(rid, ev(1, k))
    s1, s2 = idx.slot("r1"), idx.slot("r2")
    assert idx.match(shared, (1 << s1) | (1 << s2)) == {s1: 4, s2: 4}
    idx.forget("r1")
    assert idx.holders(shared[0]) == {"r2"} and idx.holders(own[0]) == set()
    assert idx.size == 4 and "r1" not in idx.sizes()
    # Its slot is reused by the next replica, which starts empty.
    assert idx.slot("r3") == s1 and idx.keys_of("r3") == set()


def test_the_index_holds_at_most_a_replica_s_block_count():
    idx = KVIndex()
    k = keys(list(range(400)))  # 100 blocks
    idx.slot("r1")
    idx.apply("r1", ev(1, k[:60], num_blocks=50))  # evictions were lost: the oldest go
    assert idx.sizes() == {"r1": 50} and idx.keys_of("r1") == set(k[10:60])
    idx.expect("r1", k[60:100])
    assert idx.sizes() == {"r1": 50}


def test_policies_choose_as_documented():
    idx = KVIndex()
    hot = keys(list(range(64)))  # 16 blocks
    idx.slot("a"), idx.slot("b")
    idx.apply("a", ev(1, hot))
    idx.apply("b", ev(1))
    sa, sb = idx.slot("a"), idx.slot("b")
    prompt_len = 70
    kv = RoutingPolicy(RoutingConfig("kv-aware", prefill_weight=1.0, balance_rel=1.5, balance_abs_tokens=100), idx)
    # a holds 64 of the 70 tokens: 6 + 50 < 70 + 0, so a serves despite its load
    d = kv.choose([sa, sb], [50, 0], hot, prompt_len, 4)
    assert (d.index, d.reason, d.cached_tokens) == (0, "cache", 64)
    # more load than the cache saves: b
    d = kv.choose([sa, sb], [80, 0], hot, prompt_len, 4)
    assert (d.index, d.reason) == (1, "load")
    # a heavier prefill weight keeps it on a ... until the balance guard says a is too far ahead
    heavy = RoutingPolicy(RoutingConfig("kv-aware", prefill_weight=4.0, balance_rel=1.5, balance_abs_tokens=100), idx)
    assert heavy.choose([sa, sb], [80, 0], hot, prompt_len, 4).index == 0
    d = heavy.choose([sa, sb], [101, 0], hot, prompt_len, 4)
    assert (d.index, d.reason, d.cached_tokens) == (1, "balance", 0)
    ll = RoutingPolicy(RoutingConfig("least-load"), idx)
    assert ll.choose([sa, sb], [5, 3], hot, prompt_len, 4).index == 1
    rr = RoutingPolicy(RoutingConfig("round-robin"), idx)
    assert [rr.choose([sa, sb], [0, 9], hot, prompt_len, 4).index for _ in range(4)] == [0, 1, 0, 1]


def reference_choice(cfg, hits, slots, loads, prompt_len, block_size, start):
    """The policy's formula as written in cluster/routing.py's docstring, over every replica in
    rotation order: the least score, ties to the least load, then the first from `start`."""
    n = len(slots)
    base, saved = cfg.prefill_weight * prompt_len, cfg.prefill_weight * block_size
    best_i, best_score, best_load = -1, float("inf"), 0
    for i in itertools.chain(range(start, n), range(start)):
        score = base + loads[i] - saved * hits.get(slots[i], 0)
        if score < best_score or (score == best_score and loads[i] < best_load):
            best_i, best_score, best_load = i, score, loads[i]
    least = min(loads)
    if best_load > cfg.balance_rel * least + cfg.balance_abs_tokens:
        guard, most = -1, -1
        for i in itertools.chain(range(start, n), range(start)):
            if loads[i] == least and hits.get(slots[i], 0) > most:
                guard, most = i, hits.get(slots[i], 0)
        return guard, "balance", most * block_size
    cached = hits.get(slots[best_i], 0) * block_size
    return best_i, "cache" if cached else "load", cached


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_kv_aware_choice_equals_the_formula_over_every_replica(data):
    """choose() scores only the least-loaded replica and those holding a prefix; that must pick
    exactly what scoring every replica picks (ties, the guard and the rotation included)."""
    n = data.draw(st.integers(1, 12), label="replicas")
    block_size = 4
    blocks = data.draw(st.integers(1, 8), label="prompt blocks")
    prompt_len = blocks * block_size + 1
    idx = KVIndex()
    names = [f"r{i}" for i in range(n)]
    prompt = keys(list(range(prompt_len)), block_size)
    held = {}
    for name in names:
        h = data.draw(st.integers(0, blocks), label=f"blocks {name} holds")
        idx.slot(name)
        idx.apply(name, ev(1, prompt[:h]))
        held[idx.slot(name)] = h
    slots = [idx.slot(name) for name in data.draw(st.permutations(names), label="order")]
    loads = data.draw(st.lists(st.sampled_from([0, 4, 8, 40, 100, 400]), min_size=n, max_size=n), label="loads")
    cfg = RoutingConfig("kv-aware", prefill_weight=data.draw(st.sampled_from([1.0, 4.0])), balance_rel=1.5,
                        balance_abs_tokens=data.draw(st.sampled_from([0, 16, 1024])))
    policy = RoutingPolicy(cfg, idx)
    turns = data.draw(st.integers(0, 2 * n), label="earlier decisions")
    for _ in range(turns):
        policy.choose(slots, loads, prompt, prompt_len, block_size)
    hits = {s: h for s, h in held.items() if h}
    d = policy.choose(slots, loads, prompt, prompt_len, block_size)
    assert (d.index, d.reason, d.cached_tokens) == reference_choice(cfg, hits, slots, loads, prompt_len, block_size,
                                                                    turns % n)
    ll = RoutingPolicy(RoutingConfig("least-load"), idx)
    for _ in range(turns):
        ll.choose(slots, loads, prompt, prompt_len, block_size)
    least = min(range(n), key=lambda i: (loads[i], (i - turns) % n))
    assert ll.choose(slots, loads, prompt, prompt_len, block_size).index == least


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_match_counts_each_replica_s_leading_blocks_whatever_else_it_holds(data):
    """Any holdings, not only whole prefixes (an eviction may take a chain's middle block): a
    replica's count stops at its first missing block, and replicas outside `among` never count."""
    n = data.draw(st.integers(1, 10), label="replicas")
    blocks = data.draw(st.integers(0, 12), label="prompt blocks")
    prompt = keys(list(range(blocks * 4)), 4)
    idx = KVIndex()
    held = {}
    for i in range(n):
        which = data.draw(st.lists(st.booleans(), min_size=blocks, max_size=blocks), label=f"r{i} holds")
        idx.slot(f"r{i}")
        idx.apply(f"r{i}", ev(1, [k for k, h in zip(prompt, which) if h]))
        held[idx.slot(f"r{i}")] = which
    among = data.draw(st.integers(0, 2 ** n - 1), label="among")
    expected = {}
    for slot, which in held.items():
        lead = next((j for j, h in enumerate(which) if not h), blocks)
        if among >> slot & 1 and lead:
            expected[slot] = lead
    assert idx.match(prompt, among) == expected


def hot_prefix(n=120, rate=12.0, prefix=512, seed=0):
    """One tenant: every request shares a 512-token system prompt."""
    rng = np.random.default_rng(seed)
    system = rng.integers(100, 40000, size=prefix).tolist()
    t = np.cumsum(rng.exponential(1 / rate, size=n))
    out = []
    for i in range(n):
        prompt = system + rng.integers(100, 40000, size=16).tolist()
        out.append(SimRequest(float(t[i]), prompt, 16, KEYER.keys(prompt, 16)))
    return out


def test_the_balance_guard_fires_on_one_hot_prefix():
    model, cost = ReplicaModel(num_blocks=512), CostModel()
    guarded = simulate(hot_prefix(), "kv-aware", 2, model, cost, KEYER)
    unguarded = simulate(hot_prefix(), "kv-aware", 2, model, cost, KEYER,
                         RoutingConfig(balance_rel=1e9, balance_abs_tokens=10**9))
    share = [np.bincount([r.replica for r in res.requests], minlength=2).max() / 120 for res in (guarded, unguarded)]
    assert guarded.reasons.get("balance", 0) > 0 and "balance" not in unguarded.reasons
    assert share[0] < share[1], share  # the guard spreads the hot prefix over both replicas
    g, u = guarded.summary(), unguarded.summary()
    assert g["ttft_p90_ms"] < u["ttft_p90_ms"], (g, u)


def test_simulated_routing_decisions_are_fast_and_kv_aware_beats_least_load_on_tenants():
    from cluster.simulator import multi_tenant

    model = ReplicaModel(num_blocks=256)
    reqs = multi_tenant(tenants=24, requests=300, rate=6.0, prefix_len=256, question=(8, 32), output=(4, 8),
                        zipf_s=0.0, keyer=KEYER, block_size=16)
    res = {p: simulate([SimRequest(r.arrival, r.prompt, r.max_tokens, r.keys) for r in reqs], p, 4, model,
                       CostModel(), KEYER).summary() for p in ("kv-aware", "least-load")}
    assert res["kv-aware"]["hit_rate"] > res["least-load"]["hit_rate"] + 0.1, res
    assert res["kv-aware"]["ttft_p90_ms"] < res["least-load"]["ttft_p90_ms"], res
    assert res["kv-aware"]["completed"] == res["least-load"]["completed"] == 300
