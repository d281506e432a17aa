"""The planner: memory verdicts, the cheapest rule, the simulator's closed loop under a known step
cost, the roofline's terms, and `tpserve plan` / `tpserve profile` end to end."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.planner.cost import RooflineCost
from cluster.planner.hardware import HardwareProfile
from cluster.planner.model_shape import ModelShape, load_config
from cluster.planner.plan import Candidate, Planner, cheapest, parse_slo
from cluster.modelled_executor import ReplicaModel, StepShape
from cluster.simulator import SimRequest, simulate
from workers.engine.block_keys import BlockKeyer, new_salt
from workers.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
LLAMA_70B = ROOT / "benchmarks" / "data" / "llama-3-70b-config.json"


def toy_cpu_profile() -> HardwareProfile:
    """A made-up 2-core machine with round numbers: every term is easy to price by hand."""
    per_elem = {"1": 1e-10, "64": 1e-10, "256": 4e-10}
    return HardwareProfile(
        name="toy", source="made up for a test", device="cpu", devices_per_node=2, memory_bytes=16 << 30,
        read_gbs=40.0, linear_s={q: {"1": per_elem, "2": per_elem} for q in ("none", "int8", "int4")},
        attn_call_s={"1": 1e-5, "2": 1e-5}, attn_kv_s_per_byte={"1": 1e-10, "2": 1e-10},
        attn_prefill_flops={"1": 1e10, "2": 1e10},
        collectives={op: {"2": {"576": 20.0, "589824": 2000.0}} for op in ("all_reduce", "gather", "broadcast")},
        step_s={"1": 2e-3, "2": 2e-3}, layer_s={"1": 1e-4, "2": 1e-4}, seq_s_per_kvocab=1e-6)


def test_llama_70b_in_bf16_does_not_fit_one_h100_and_fits_at_tp_4():
    model = ModelShape(load_config(str(LLAMA_70B)), "llama-3-70b")
    planner = Planner(model, HardwareProfile.load("h100"), "none", "bfloat16")
    fits, why, _, _ = planner.memory(1, 1, 64, 2048)
    assert not fits and "weights" in why
    assert 130 < model.weight_bytes(1, "none", "bfloat16", "cuda") / 2**30 < 133  # 70.6 B parameters x 2 bytes
    fits, why, blocks, _ = planner.memory(4, 1, 64, 2048)
    assert fits, why
    assert blocks >= 64 * 2048 // 16


def test_the_cheapest_is_fewest_devices_then_the_higher_throughput():
    def cand(tp, replicas, tok_s, ok=True, fits=True):
        return Candidate(tp, replicas, 64, tp * replicas, fits, output_tok_s=tok_s, slo_ok=ok)

    cands = [cand(4, 1, 900.0), cand(2, 2, 1100.0), cand(1, 2, 5000.0, ok=False), cand(2, 1, 9000.0, fits=False),
             cand(1, 4, 1000.0)]
    best = cheapest(cands)
    assert (best.tp, best.replicas) == (2, 2)
    assert cheapest([cand(1, 1, 1.0, ok=False)]) is None


def test_closed_loop_keeps_the_concurrency_and_a_known_step_cost_gives_its_tpot():
    class TenMs:
        def step_time(self, shape: StepShape) -> float:
            return 0.010

    reqs = [SimRequest(0.0, list(range(100, 140)), 11) for _ in range(12)]
    res = simulate(reqs, "least-load", 1, ReplicaModel(num_blocks=512, max_num_batched_tokens=4096), TenMs(),
                   BlockKeyer(new_salt()), concurrency=3)
    done = sorted(res.requests, key=lambda r: r.arrival)
    assert all(r.done is not None for r in done)
    for r in done:  # at most 3 in flight at any arrival
        assert sum(1 for o in done if o.arrival <= r.arrival < o.done) <= 3
    # one request: a prefill step, then 10 decode steps of 10 ms each
    alone = simulate([SimRequest(0.0, list(range(100, 140)), 11)], "least-load", 1, ReplicaModel(num_blocks=64),
                     TenMs(), BlockKeyer(new_salt()), concurrency=1).requests[0]
    assert alone.ttft == pytest.approx(0.010)
    assert alone.tpot == pytest.approx(0.010)


def test_roofline_terms_follow_the_shape(smollm2_dir):
    model = ModelShape(load_config(str(smollm2_dir)), "smollm2")
    hw = toy_cpu_profile()
    one = RooflineCost(model, hw, 1)
    two = RooflineCost(model, hw, 2)
    a = one.parts(StepShape((), (100,)))
    b = one.parts(StepShape((), (100,) * 8))
    assert b["linear"] == pytest.approx(a["linear"])  # memory-bound: 8 rows read the weights once, like 1
    assert b["attention"] > a["attention"] and a["collectives"] == 0.0
    t2 = two.parts(StepShape((), (100,)))
    vocab_rows = model.rank(2).vocab_rows
    assert t2["collectives"] == pytest.approx((2 * 30 * hw.collective_us("all_reduce", 2, 576)
                                               + hw.collective_us("gather", 2, vocab_rows)
                                               + hw.collective_us("broadcast", 2, 128)) * 1e-6)
    assert hw.collective_us("all_reduce", 2, 576) == pytest.approx(20.0)
    assert t2["linear"] < a["linear"]  # half the projections per rank
    prefill = one.parts(StepShape(((256, 0),), ()))
    assert prefill["linear"] > a["linear"]
    assert a["served"] == 0.0  # a profile without the served path prices none


def test_w8a8_holds_int8_codes_keeps_a_float_head_and_is_priced_by_its_own_kernel(smollm2_dir):
    model = ModelShape(load_config(str(smollm2_dir)), "smollm2")
    r, b = model.rank(1), 2  # bf16
    # int8 codes for the projections; the head (tied: the embedding) in bf16 plus its oneDNN copy.
    assert model.weight_bytes(1, "w8a8", "bfloat16") == r.proj_elements + (r.lm_head_elements + r.other_elements) * b \
        + r.lm_head_elements * b
    # int8 adds the head's int8 codes instead of a float copy.
    assert model.weight_bytes(1, "int8", "bfloat16") - model.weight_bytes(1, "w8a8", "bfloat16") \
        == r.lm_head_elements * (1 - b)
    hw = toy_cpu_profile()
    w8a8_elem = {"1": 3e-10, "64": 3e-10, "256": 3e-10}
    hw.linear_s["bfloat16"] = hw.linear_s["float32"]  # a bf16 model is priced by its dtype's tables
    hw.linear_s["bfloat16"]["w8a8"] = {"1": w8a8_elem, "2": w8a8_elem}
    step = StepShape((), (100,) * 4)
    linear = RooflineCost(model, hw, 1, "w8a8", "bfloat16").engine_parts(step)["linear"]
    head = hw.linear_seconds(r.lm_head_elements, 4, "none", b, 1, "bfloat16")  # the head by the float table
    assert linear == pytest.approx(r.proj_elements * 3e-10 + head)
    int8 = RooflineCost(model, hw, 1, "int8", "bfloat16").engine_parts(step)["linear"]
    assert int8 == pytest.approx(r.proj_elements * 1e-10 + hw.linear_seconds(r.lm_head_elements, 4, "int8", 1, 1,
                                                                               "bfloat16"))


def test_a_bfloat16_model_is_priced_by_its_own_tables_and_steps_and_an_unmeasured_dtype_is_an_error(
        tmp_path, smollm2_dir):
    """A bf16 model's layers run other kernels than a float32 one's (unquantized at one row, 0.45x
    the time per weight here): its matmuls are priced from the profile's bf16 tables and its steps
    calibrated by its own steps alone. A profile that did not measure a dtype refuses to price it."""
    model = ModelShape(load_config(str(smollm2_dir)), "smollm2")
    hw = toy_cpu_profile()
    half = {"1": 0.5e-10, "64": 0.5e-10, "256": 2e-10}
    hw.linear_s["bfloat16"] = {q: {"1": half, "2": half} for q in ("none", "int8", "int4")}
    r = model.rank(1)
    step = StepShape((), (100,) * 4)
    f32, bf16 = RooflineCost(model, hw, 1), RooflineCost(model, hw, 1, "none", "bfloat16")
    assert bf16.engine_parts(step)["linear"] == pytest.approx((r.proj_elements + r.lm_head_elements) * 0.5e-10)
    assert f32.engine_parts(step)["linear"] == pytest.approx((r.proj_elements + r.lm_head_elements) * 1e-10)

    def price(cost, shape):
        return sum(cost.engine_parts(shape).values())

    at = {n: StepShape((), (25,) * n) for n in (1, 16)}
    hw.served_s = {"1": {"alone": {str(n): 1.5 * price(f32, at[n]) for n in at},
                         "served": {str(n): 1.5 * price(f32, at[n]) + 0.01 for n in at},
                         "dtypes": {"bfloat16": {"alone_by_quantization": {
                             "none": {str(n): 0.8 * price(bf16, at[n]) for n in at}}}}}}
    hw.served_context = 25
    # Each dtype's measured step comes back, plus what serving adds (float32's where the profile
    # served no other dtype).
    assert RooflineCost(model, hw, 1).step_time(at[1]) == pytest.approx(1.5 * price(f32, at[1]) + 0.01)
    assert RooflineCost(model, hw, 1, "none", "bfloat16").step_time(at[16]) == pytest.approx(
        0.8 * price(bf16, at[16]) + 0.01)
    # Served in bf16 too: its own added time (it grows with what the step's threads are stalled in).
    hw.served_s["1"]["dtypes"]["bfloat16"]["served"] = {str(n): 0.8 * price(bf16, at[n]) + 0.02 for n in at}
    assert RooflineCost(model, hw, 1, "none", "bfloat16").step_time(at[1]) == pytest.approx(
        0.8 * price(bf16, at[1]) + 0.02)
    assert RooflineCost(model, hw, 1).step_time(at[1]) == pytest.approx(1.5 * price(f32, at[1]) + 0.01)
    # A profile of float32 only (every profile before dtypes were measured) names the field.
    old = toy_cpu_profile()
    with pytest.raises(ConfigError, match="^dtype: .*no bfloat16 figures.*--dtypes bfloat16"):
        RooflineCost(model, old, 1, "none", "bfloat16").step_time(step)
    path = tmp_path / "hw.json"
    old.save(path)
    run = subprocess.run([sys.executable, "-m", "cluster.cli", "plan", "--model", str(smollm2_dir), "--hardware",
                          str(path), "--concurrency", "4", "--num-requests", "8", "--input-len", "32",
                          "--output-len", "8", "--tp", "1", "--replicas", "1", "--dtype", "bfloat16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().startswith("tpserve: error: dtype:")
    # An old profile's file (quantizations at the top of linear_s) loads as float32's tables.
    data = json.loads(path.read_text())
    data["linear_s"] = data["linear_s"]["float32"]
    path.write_text(json.dumps(data))
    assert set(HardwareProfile.load(path).linear_s) == {"float32"}


def test_a_cpu_profile_without_a_quantizations_figures_is_an_error_naming_it(tmp_path, smollm2_dir):
    hw = tmp_path / "hw.json"
    toy_cpu_profile().save(hw)  # none, int8, int4 only: as a profile from before w8a8
    cmd = [sys.executable, "-m", "cluster.cli", "plan", "--model", str(smollm2_dir), "--hardware", str(hw),
           "--concurrency", "4", "--num-requests", "8", "--input-len", "32", "--output-len", "8",
           "--tp", "1", "--replicas", "1", "--quantization", "w8a8"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().startswith("tpserve: error: quantization:") and "no w8a8 matmul figures" in run.stderr


def test_the_served_steps_the_profile_measured_are_priced_exactly_and_calibrate_the_rest(smollm2_dir):
    model = ModelShape(load_config(str(smollm2_dir)), "smollm2")
    hw = toy_cpu_profile()
    plain = RooflineCost(model, hw, 1)
    assert plain.parts(StepShape((), (25,)))["served"] == 0.0  # a profile without the served path

    def price(cost, shape):
        return sum(cost.engine_parts(shape).values())

    one, sixteen = (price(plain, StepShape((), (25,) * n)) for n in (1, 16))
    hw.served_s = {"1": {"alone": {"1": 1.5 * one, "16": 2.0 * sixteen},
                         "served": {"1": 1.5 * one + 0.010, "16": 2.0 * sixteen + 0.030}}}
    hw.served_context = 25
    cost = RooflineCost(model, hw, 1)
    # The measured served steps come back exactly.
    assert cost.step_time(StepShape((), (25,))) == pytest.approx(1.5 * one + 0.010)
    assert cost.step_time(StepShape((), (25,) * 16)) == pytest.approx(2.0 * sixteen + 0.030)
    # Between them the scale is linear in the step's tokens, the added time in its sequences;
    # past them, flat.
    mixed = StepShape(((4, 0),), (100,) * 4)  # 8 tokens, 5 sequences
    assert cost.step_time(mixed) == pytest.approx((1.5 + 7 / 15 * 0.5) * price(plain, mixed) + 0.010 + 4 / 15 * 0.020)
    chunk = StepShape(((512, 0),), ())  # a prefill chunk runs at many tokens' scale, one sequence's added time
    assert cost.step_time(chunk) == pytest.approx(2.0 * price(plain, chunk) + 0.010)
    wide = StepShape((), (300,) * 64)
    assert cost.step_time(wide) == pytest.approx(2.0 * price(plain, wide) + 0.030)
    # int8, and two replicas on the node, take the scale measured unquantized on one replica.
    int8 = RooflineCost(model, hw, 1, "int8", ranks_on_node=2)
    assert int8.step_time(StepShape((), (25,))) == pytest.approx(1.5 * price(int8, StepShape((), (25,))) + 0.010)
    # A tp measured alone but not served takes its own scale and the served tp's added time.
    cost2 = RooflineCost(model, hw, 2)
    two = price(cost2, StepShape((), (25,)))
    hw.served_s["2"] = {"alone": {"1": 1.2 * two, "16": 1.2 * price(cost2, StepShape((), (25,) * 16)), "64": 1.2 * two}}
    assert RooflineCost(model, hw, 2).step_time(StepShape((), (25,))) == pytest.approx(1.2 * two + 0.010)


def test_a_quantized_step_alone_calibrates_its_own_quantization(smollm2_dir):
    """int8's kernels change at the probe's row cut-over, so its step alone is measured and its
    own price scaled by it; int4 has its own where the profile measured it (since 2026-12-06; its
    decode kernel is tpserve's GEMV), else takes int8's, as w8a8 does."""
    model = ModelShape(load_config(str(smollm2_dir)), "smollm2")
    hw = toy_cpu_profile()

    def price(cost, shape):
        return sum(cost.engine_parts(shape).values())

    plain, q8, q4 = (RooflineCost(model, hw, 1, q) for q in ("none", "int8", "int4"))
    at = {n: StepShape((), (25,) * n) for n in (1, 16, 64)}
    hw.served_s = {"1": {"alone": {str(n): 1.5 * price(plain, at[n]) for n in at},
                         "alone_by_quantization": {"int8": {str(n): f * price(q8, at[n])
                                                            for n, f in ((1, 1.2), (16, 1.1), (64, 0.7))}},
                         "served": {str(n): 1.5 * price(plain, at[n]) + 0.01 for n in at}}}
    hw.served_context = 25
    int8 = RooflineCost(model, hw, 1, "int8")
    for n, f in ((1, 1.2), (16, 1.1), (64, 0.7)):  # the measured int8 steps, plus what serving adds
        assert int8.step_time(at[n]) == pytest.approx(f * price(q8, at[n]) + 0.01)
    # Not the unquantized scale: that would put 64 sequences at 1.5x int8's price, not 0.7x.
    assert int8.step_time(at[64]) < RooflineCost(model, hw, 1, "none").step_time(at[64]) * price(q8, at[64]) / price(plain, at[64])
    int4 = RooflineCost(model, hw, 1, "int4")
    assert int4.step_time(at[64]) == pytest.approx(0.7 * price(q4, at[64]) + 0.01)
    assert RooflineCost(model, hw, 1, "none").step_time(at[16]) == pytest.approx(1.5 * price(plain, at[16]) + 0.01)
    hw.served_s["1"]["alone_by_quantization"]["int4"] = {str(n): 0.9 * price(q4, at[n]) for n in at}
    assert RooflineCost(model, hw, 1, "int4").step_time(at[64]) == pytest.approx(0.9 * price(q4, at[64]) + 0.01)


def test_a_prefill_step_alone_calibrates_the_steps_at_its_tokens(smollm2_dir):
    """Past the decode steps' 64 tokens the steps are mostly prefill chunks: the profile's prefill
    alone, not the 64-sequence decode step, scales them (in the quantization measured)."""
    model = ModelShape(load_config(str(smollm2_dir)), "smollm2")
    hw = toy_cpu_profile()

    def price(cost, shape):
        return sum(cost.engine_parts(shape).values())

    plain, q8 = RooflineCost(model, hw, 1), RooflineCost(model, hw, 1, "int8")
    at = {n: StepShape((), (25,) * n) for n in (1, 64)}
    fill = StepShape(((256, 0),), ())
    hw.served_s = {"1": {"alone": {str(n): 1.5 * price(plain, at[n]) for n in at},
                         "alone_by_quantization": {"int8": {str(n): 1.5 * price(q8, at[n]) for n in at}},
                         "prefill": {"none": {"256": 0.9 * price(plain, fill)}, "int8": {"256": 1.2 * price(q8, fill)}},
                         "served": {str(n): 1.5 * price(plain, at[n]) + 0.01 for n in at}}}
    hw.served_context = 25
    cost, int8 = RooflineCost(model, hw, 1), RooflineCost(model, hw, 1, "int8")
    # The measured prefill comes back (plus one sequence's served time), in each quantization.
    assert cost.step_time(fill) == pytest.approx(0.9 * price(plain, fill) + 0.01)
    assert int8.step_time(fill) == pytest.approx(1.2 * price(q8, fill) + 0.01)
    # Past it flat; between 64 and 256 tokens linear in tokens from the decode scale to it.
    chunk = StepShape(((512, 0),), ())
    assert cost.step_time(chunk) == pytest.approx(0.9 * price(plain, chunk) + 0.01)
    mid = StepShape(((160, 0),), ())
    assert cost.step_time(mid) == pytest.approx((1.5 - 0.6 * 96 / 192) * price(plain, mid) + 0.01)
    # The decode steps keep their own scale.
    assert cost.step_time(at[64]) == pytest.approx(1.5 * price(plain, at[64]) + 0.01)


def test_bad_slo_names_the_field():
    assert parse_slo("ttft=500,tpot=40") == {"ttft": 500.0, "tpot": 40.0}
    for bad in ("ttft=abc", "latency=5", "tpot=-1"):
        with pytest.raises(ConfigError, match="slo"):
            parse_slo(bad)


def test_tpserve_plan_json_reports_the_given_configuration_and_errors_are_one_line(tmp_path, smollm2_dir):
    hw = tmp_path / "hw.json"
    toy_cpu_profile().save(hw)
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "cluster.cli", "plan", "--model", str(smollm2_dir), "--hardware", str(hw),
           "--concurrency", "4", "--num-requests", "16", "--input-len", "64", "--output-len", "16",
           "--slo", "ttft=2000,tpot=200", "--tp", "2", "--replicas", "1", "--json", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert (data["tp"], data["replicas"]) == (2, 1)
    for key in ("tpot_ms", "ttft_ms_p50", "ttft_ms_p90", "output_tok_s"):
        assert isinstance(data[key], float) and data[key] > 0
    assert data["ttft_ms_p50"] <= data["ttft_ms_p90"]
    assert data["cheapest"] is not None and data["cheapest"]["devices"] == 1  # 1 device meets so loose an SLO
    assert "cheapest" in run.stdout
    # `--json -`: stdout is the JSON alone (a script parses it), the table goes to stderr.
    piped = subprocess.run(cmd[:-1] + ["-"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["tp"] == 2 and "cheapest meeting the SLO" in piped.stderr
    bad = subprocess.run(cmd[:-2] + ["--slo", "ttft=soon"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("tpserve: error: slo:")
    assert "Traceback" not in bad.stderr


def test_steps_alone_are_sampled_count_by_count_across_groups_in_a_turned_order(monkeypatch):
    """Each group's step is compared with the others' (int8 against unquantized): samples of one
    sequence count are taken back to back across the groups, not group by group minutes apart,
    and the groups' order turns each repeat so a drift does not always favour the first."""
    from cluster.planner import profile as prof

    calls, firsts = [], []
    monkeypatch.setattr(prof, "decode_step", lambda engine, prompt, c, tokens: calls.append((engine, c, tokens)) or 0.1)
    monkeypatch.setattr(prof, "prefill_step", lambda engine, first: calls.append((engine, "prefill", 0))
                        or firsts.append(first) or 0.3)
    alone = object.__new__(prof.AloneSteps)
    alone.groups = {(1, "float32", "none"): type("G", (), {"engine": "none"})(),
                    (1, "float32", "int8"): type("G", (), {"engine": "int8"})()}
    alone.samples, alone.prefill_samples, alone._prompts = {}, {}, itertools.count(3000)
    alone.sample(0)
    alone.sample(1)
    counts = list(prof.ALONE_CONCURRENCY) + ["prefill"]
    assert [(e, c) for e, c, _ in calls] == (
        [(g, c) for c in counts for g in ("none", "int8")] + [(g, c) for c in counts for g in ("int8", "none")])
    assert all(t == prof.ALONE_TOKENS[c] for _, c, t in calls if c != "prefill")
    assert all(len(v) == 2 for v in alone.samples.values()) and len(alone.samples) == 2 * len(prof.ALONE_CONCURRENCY)
    # Every prefill sample is a prompt not seen before (no prefix-cache hit), one per group and turn.
    assert len(set(firsts)) == 4 and all(len(v) == 2 for v in alone.prefill_samples.values())
    assert alone.prefill_medians() == {1: {"float32": {"none": {str(prof.PREFILL_TOKENS): 0.3},
                                                       "int8": {str(prof.PREFILL_TOKENS): 0.3}}}}


def test_each_repeat_keeps_the_faster_of_its_two_prefill_samples(monkeypatch):
    """A prefill step alone is sampled twice per repeat, the second time in the other order, and the
    repeat keeps the faster (a slow moment under one ~2 s sample set every TTFT past one sequence);
    across repeats the median of those."""
    from cluster.planner import profile as prof

    times = iter([2.0, 1.0, 1.2, 3.0,   # turn 0: none, int8 by sample; int8, none again (reversed)
                  1.5, 1.6, 1.4, 4.0,   # turn 1: int8, none; none, int8
                  9.0, 9.0, 1.1, 1.3])  # turn 2 as turn 0
    order = []
    monkeypatch.setattr(prof, "decode_step", lambda engine, prompt, c, tokens: 0.1)
    monkeypatch.setattr(prof, "prefill_step", lambda engine, first: order.append(engine) or next(times))
    alone = object.__new__(prof.AloneSteps)
    alone.groups = {(1, "float32", "none"): type("G", (), {"engine": "none"})(),
                    (1, "float32", "int8"): type("G", (), {"engine": "int8"})()}
    alone.samples, alone.prefill_samples, alone._prompts = {}, {}, itertools.count(3000)
    for turn in range(3):
        alone.sample(turn)
        alone.sample_prefill_again(turn)
    assert order == ["none", "int8", "int8", "none", "int8", "none", "none", "int8", "none", "int8", "int8", "none"]
    # none: min(2.0, 3.0), min(1.6, 1.4), min(9.0, 1.3) -> median(2.0, 1.4, 1.3); int8: 1.0, 1.5, 1.1
    assert alone.prefill_medians() == {1: {"float32": {"none": {str(prof.PREFILL_TOKENS): 1.4},
                                                       "int8": {str(prof.PREFILL_TOKENS): 1.1}}}}
    assert alone.spread()[f"alone prefill tp 1 float32 none {prof.PREFILL_TOKENS}"] == [1.3, 9.0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_profile_times_every_quantizations_layers_in_each_dtype(monkeypatch, dtype):
    """Through the engine's own layers as they hold their weights after loading (an int4 layer keeps
    only its decode kernel's copy and PyTorch's packed one: timing it by `layer.weight` failed)."""
    from cluster.planner import profile as prof

    monkeypatch.setattr(prof, "COPIES", 1)
    monkeypatch.setattr(prof, "ROWS", (1, 64))
    monkeypatch.setattr(prof, "_LAYERS", {})
    for q in prof.QUANTS:
        table = prof.linear_table(q, dtype)
        assert set(table) == {"1", "64"} and all(0 < v < 1e-6 for v in table.values()), (q, table)
        if q == "none":  # the layers of a `dtype` model
            assert all(layer.weight.dtype == getattr(torch, dtype) for layer in prof._LAYERS[(q, dtype)])


def test_tpserve_profile_names_a_bad_dtype_before_measuring_anything(tmp_path):
    out = tmp_path / "hw.json"
    run = subprocess.run([sys.executable, "-m", "cluster.cli", "profile", "--out", str(out), "--repeats", "1",
                          "--dtypes", "float32,float64"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().startswith("tpserve: error: dtypes:") and "'float64'" in run.stderr
    assert not out.exists()
