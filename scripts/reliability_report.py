"""Run the reliability tests and print their figures as the table in docs/reliability.md.

The tests record what they injected and saw (tests/reliability.py) when TPSERVE_RELIABILITY_OUT
is set; this script sets it, runs them, and renders the records. A failing test fails the script.

    python scripts/reliability_report.py            # or: make reliability
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/cluster/test_faults.py", "tests/cluster/test_fuzz.py", "tests/cluster/test_soak.py",
         "tests/cluster/test_security.py", "tests/cluster/test_event_loop.py", "tests/cluster/test_shared_replicas.py",
         "tests/cluster/test_poison.py",
         "tests/cluster/test_lifecycle.py::test_a_node_that_goes_away_loses_no_request_and_its_replica_is_replaced"]


def statuses(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "-"


def rows(records: list[dict]) -> list[tuple[str, str, str, str, str]]:
    """(check, injected / sent, lost, statuses seen, figures)"""
    out = []
    for r in records:
        k = r["kind"]
        if k == "fault":
            out.append(("dead worker", f"{r['fault']}, {r['streams']} greedy streams", str(r["lost"]),
                        f"OK {r['streams']}", f"{r['resumed']} resumed; tokens equal a fault-free run; "
                                              f"{r['replicas_after']} replicas after"))
        elif k == "hang":
            out.append(("hung worker", f"{r['fault']}, {r['streams']} greedy streams", str(r["lost"]),
                        f"OK {r['streams']}", f"detected in {r['detected_s']} s; all done {r['all_finished_s']} s "
                                              f"after the stop; {r['resumed']} resumed; tokens equal"))
        elif k == "node":
            out.append(("node gone", f"{r['fault']}, {r['streams']} greedy streams", str(r["lost"]),
                        f"OK {r['streams']}", f"{r['resumed']} resumed; tokens equal a fault-free run; "
                                              "replaced on the surviving node"))
        elif k == "fuzz":
            for api, seen in r.items():
                if isinstance(seen, dict) and seen:
                    out.append((f"malformed requests, {api}", f"{sum(seen.values())} generated", "0",
                                statuses(seen), "no UNKNOWN/INTERNAL; every stream answered; healthy after; "
                                                "every KV block free"))
            out.append(("malformed requests, all", f"{r['requests']} generated", "0", "-",
                        f"frontend RSS growth {r['frontend_rss_growth_mb']:+.1f} MB"))
        elif k == "event_loop":
            out.append(("huge requests vs the event loop", f"{r['huge_requests']} chat requests of 15 MiB / 0.9 M "
                                                            f"characters beside {r['streams']} streams", "0",
                        "INVALID_ARGUMENT for the 8", f"worst inter-token gap {r['worst_gap_with_huge_s']} s "
                                                       f"(quiet {r['worst_gap_quiet_s']} s; one tokenized on the loop would "
                                                       f"stall it {r['tokenize_one_s']} s); {r['probes']} liveness "
                                                       f"probes, slowest {r['worst_probe_s']} s"))
        elif k == "event_loop_http":
            out.append(("large HTTP bodies vs the event loop", f"{r['bodies']} bodies of {r['body_mib']} MiB (~1 s of "
                                                               "JSON each) beside 8 gRPC streams", "0", "200 for the 8",
                        f"worst inter-token gap {r['worst_gap_with_bodies_s']} s (quiet {r['worst_gap_quiet_s']} s; one "
                        f"parsed on the loop would stall it {r['decode_one_s']} s); "
                        f"slowest liveness probe {r['worst_probe_s']} s"))
        elif k == "poison":
            tried = ", ".join(f"{api} {n}" for api, n in r["extreme_values"].items())
            out.append(("extreme values, every field", f"{r['tried']} requests ({tried}): 2^63 and past it, "
                                                       "out-of-vocabulary and negative ids, lone surrogates, "
                                                       "subnormal and huge floats", "0",
                        "400 / INVALID_ARGUMENT naming the field, or served where in range",
                        f"replicas lost {r['replicas_lost']}; no rank process replaced; serves after"))
        elif k == "quarantine":
            out.append(("poison request (dead-letter rule)", f"a request that fails every engine it reaches, "
                                                             f"{r['replicas']} replicas, beside a 200-token stream",
                        "0", f"{r['status']} for it; OK for the stream",
                        f"{r['replicas_failed']} replicas failed (not 4); answered in {r['seconds_to_answer']} s; "
                        f"the other stream got all {r['other_stream_tokens']} tokens"))
        elif k == "frontends":
            out.append(("two frontends, one killed", f"{r['streams']} greedy streams over 2 frontends; one SIGKILLed "
                                                     "mid-stream", "0", f"OK {r['survivor_streams']} (survivor)",
                        "tokens equal a single-frontend run; 0 replica restarts"))
        elif k == "silence":
            out.append(("no frontend at all", f"{r['silent_s']} s without a frontend (stall timeout "
                                              f"{r['stall_timeout_s']} s), a load of {r['load_s']} s", "-", "-",
                        f"{r['restarts']} restarts; a SIGSTOPped rank replaced in {r['hung_replaced_s']} s"))
        elif k == "soak":
            growth = ", ".join(f"{name.replace('-', ' of ')} {mb:+.1f}" for name, mb in r["rss_growth_mb"].items())
            out.append(("soak", f"{r['requests']} short requests, ~20% cancelled, ~20% short deadlines", "0",
                        statuses(r["statuses"]), f"{r['seconds']} s; RSS growth MB: {growth}; all blocks free"))
        elif k == "overload":
            out.append(("overload", f"{r['requests']} at once (10x the bound of {r['bound']})", "0",
                        statuses(r["statuses"]), f"refusals p99 {r['refused_p99_s']} s; frontend RSS "
                                                 f"{r['frontend_rss_growth_mb']:+.1f} MB"))
        elif k == "security":
            detail = ", ".join(f"{a.replace('_', ' ')} {b}" for a, b in r.items() if a not in ("kind", "server"))
            out.append(("security", r["server"], "-", "UNAUTHENTICATED / failed handshake for the wrong clients",
                        detail))
    return out


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.jsonl"
        env = {**os.environ, "TPSERVE_RELIABILITY_OUT": str(out), "TPSERVE_FUZZ_EXAMPLES": "5000"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=ROOT,
                              env=env)
        records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    print("\n| check | injected / sent | requests lost | statuses seen | figures |")
    print("|---|---|---|---|---|")
    for row in rows(records):
        print("| " + " | ".join(row) + " |")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
