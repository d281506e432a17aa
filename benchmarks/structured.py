"""What structured outputs cost: 16 concurrent requests constrained by a grammar against the same
16 unconstrained, on one replica, output tokens per second (issue 22's bound: at most 10% less).

    python -m benchmarks.structured [--model smollm2-135m] [--tp 1] [--concurrency 16] [--repeats 3]

Each constrained request decodes exactly --max-tokens tokens (a regex of 300+ characters cannot
end sooner, and its stop token is masked until it could), as each unconstrained one does with
ignore_eos: the same number of steps, so the ratio is the grammar's cost (the mask fill, its
application to the constrained rows, each token's matcher advance) and nothing else. Grammars are
compiled once before timing (the cache serves the repeats), as a served schema is.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from workers import set_openmp_env

set_openmp_env()

from workers.engine.sampling_params import SamplingParams  # noqa: E402
from workers.engine.structured import StructuredSpec  # noqa: E402
from workers.launcher import LocalWorkerGroup  # noqa: E402
from workers.model_source import resolve_model  # noqa: E402
from workers.worker import WorkerSpec  # noqa: E402

SPECS = {
    # Not "([a-z]+ ){200}": xgrammar fills that shape's mask in ~15 ms per row (measured; a grouped
    # repetition of a `+` is not precomputed), against 8 us for this one.
    "regex": StructuredSpec("regex", "[a-z ]{300,}"),
    "json_schema": StructuredSpec("json_schema", json.dumps(
        {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string"},
                                                    "minItems": 200}}, "required": ["words"]})),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    prompts = [[100 + i, 200 + i, 300 + i, 400, 500, 600] for i in range(args.concurrency)]
    rows: dict[str, list[float]] = {"none": [], **{k: [] for k in SPECS}}
    with LocalWorkerGroup(WorkerSpec(str(resolve_model(args.model)), tp_size=args.tp)) as g:
        def run(spec: StructuredSpec | None) -> float:
            params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=spec is None,
                                    structured=spec)
            t = time.perf_counter()
            outs = g.engine.generate(prompts, params)
            n = sum(len(o.token_ids) for o in outs)
            assert n == args.max_tokens * len(prompts), (n, [o.finish_reason for o in outs])
            return n / (time.perf_counter() - t)

        for spec in SPECS.values():  # compile (cached) and warm
            run(spec)
        run(None)
        for rep in range(args.repeats):  # interleaved, so drift shows in every column alike
            for name, spec in [("none", None), *SPECS.items()]:
                rows[name].append(run(spec))
            print(f"  repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in rows.items()), flush=True)
    base = statistics.median(rows["none"])
    print(f"\n`python -m benchmarks.structured --tp {args.tp} --concurrency {args.concurrency} --max-tokens "
          f"{args.max_tokens} --repeats {args.repeats}`, {time.strftime('%Y-%m-%d')}; median (min-max)\n")
    print("| requests | output tok/s | vs unconstrained |\n|---|---:|---:|")
    for name, v in rows.items():
        print(f"| {args.concurrency} x {name} | {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f}) | "
              f"{statistics.median(v) / base:.2f}x |")


if __name__ == "__main__":
    main()
