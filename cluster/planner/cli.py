"""The `tpserve profile` and `tpserve plan` commands (argument parsing and printing only)."""
from __future__ import annotations

import argparse
import sys

from workers.defaults import MAX_NUM_BATCHED_TOKENS
from workers.errors import ConfigError


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="where to write the hardware profile (JSON)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="smollm2-135m",
                   help="the model the served path is measured with (what `tpserve serve` takes; none: not measured)")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="model dtypes to measure, comma-separated (float32 always is: the CPU default; "
                        "`tpserve plan --dtype` prices only a measured one)")


def cmd_profile(args) -> int:
    from cluster.planner.model_shape import DTYPE_BYTES
    from cluster.planner.profile import profile

    if args.repeats < 1:
        raise ConfigError("repeats", f"must be >= 1, got {args.repeats}")
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    for d in dtypes:
        if d not in DTYPE_BYTES:
            raise ConfigError("dtypes", f"{d!r} is not one of {', '.join(DTYPE_BYTES)}")
    hw = profile(args.repeats, progress=lambda line: print(line, file=sys.stderr, flush=True),
                 model=None if args.model == "none" else args.model, dtypes=dtypes)
    hw.save(args.out)
    print(f"{hw.name}: read {hw.read_gbs:.1f} GB/s; {hw.source}; wrote {args.out}")
    return 0


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="a model folder, a .gguf, a built-in name, or a config.json alone")
    p.add_argument("--hardware", required=True, help="a profile from `tpserve profile`, or h100 | h200 | a100")
    p.add_argument("--quantization", default="none", choices=["none", "int8", "w8a8", "int4"])
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--slo", default=None, help="ttft=MS,tpot=MS: TTFT p90 and TPOT p90 bounds")
    p.add_argument("--workload", default="fixed", choices=["fixed", "random", "longtail", "file"])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--input-range", default="32,256")
    p.add_argument("--output-range", default="16,128")
    p.add_argument("--workload-file", default=None, help="JSONL of {\"prompt\": ..., \"max_tokens\": ...}")
    p.add_argument("--num-requests", type=int, default=200)
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    load.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    p.add_argument("--max-devices", type=int, default=None, help="devices to spend at most (default: one node)")
    p.add_argument("--max-num-seqs", default="16,64,256", help="values of max_num_seqs to try")
    p.add_argument("--max-num-batched-tokens", type=int, default=MAX_NUM_BATCHED_TOKENS)
    p.add_argument("--tp", type=int, default=None,
                   help="report this configuration (with --replicas) at its best --max-num-seqs in the JSON's top level")
    p.add_argument("--replicas", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the candidates and the choice as JSON here ('-': stdout)")


def cmd_plan(args) -> int:
    from cluster.bench.main import _pair  # the bench's own LO,HI parsing: same flags, same errors
    from cluster.planner.hardware import HardwareProfile
    from cluster.planner.model_shape import ModelShape, load_config
    from cluster.planner.plan import Planner, Workload, cheapest, parse_slo, table, to_json, workload_lengths

    for flag in ("num_requests", "input_len", "output_len", "max_num_batched_tokens"):
        if getattr(args, flag) < 1:
            raise ConfigError(flag.replace("_", "-"), f"must be >= 1, got {getattr(args, flag)}")
    if args.rate is not None and not args.rate > 0:
        raise ConfigError("rate", f"must be > 0, got {args.rate}")
    if args.concurrency is not None and args.concurrency < 1:
        raise ConfigError("concurrency", f"must be >= 1, got {args.concurrency}")
    if (args.tp is None) != (args.replicas is None):
        raise ConfigError("tp", "give --tp and --replicas together")
    try:
        seqs = tuple(int(v) for v in args.max_num_seqs.split(","))
    except ValueError:
        raise ConfigError("max-num-seqs", f"{args.max_num_seqs!r}: use a comma list of integers") from None
    slo = parse_slo(args.slo)
    hw = HardwareProfile.load(args.hardware)
    cfg = load_config(args.model)
    model = ModelShape(cfg, args.model)
    lengths = workload_lengths(args.workload, args.num_requests, args.input_len, args.output_len,
                               _pair("--input-range", args.input_range), _pair("--output-range", args.output_range),
                               args.workload_file, args.seed)
    work = Workload(lengths, rate=args.rate, concurrency=args.concurrency, seed=args.seed)
    planner = Planner(model, hw, args.quantization, args.dtype, args.max_num_batched_tokens)
    max_devices = args.max_devices or hw.devices_per_node
    cands = planner.candidates(work, slo, max_devices, seqs=seqs)
    chosen = None
    if args.tp is not None:  # its best max_num_seqs: fits first, then the higher throughput
        mine = [c for c in cands if c.tp == args.tp and c.replicas == args.replicas]
        if not mine:
            mine = [planner.evaluate(args.tp, args.replicas, n, work, slo) for n in seqs]
            cands += mine
        chosen = max(mine, key=lambda c: (c.fits, c.output_tok_s or 0.0))
    best = cheapest(cands)
    load = f"rate {args.rate}/s" if args.rate else f"concurrency {args.concurrency}"
    # With `--json -` stdout carries the JSON alone (a script parses it); the table goes to stderr.
    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"{args.model} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads}/{cfg.num_kv_heads} heads), "
          f"{args.quantization}, on {hw.name} [{hw.source.split(':')[0]}]; {len(lengths)} requests, {load}", file=out)
    print(table(cands, best, slo), file=out)
    if slo:
        print("cheapest meeting the SLO: " + (f"tp {best.tp} x {best.replicas} replicas, max_num_seqs "
                                               f"{best.max_num_seqs} ({best.devices} devices)" if best else "none"),
              file=out)
    if args.json:
        meta = {"model": args.model, "hardware": hw.name, "hardware_source": hw.source, "quantization":
                args.quantization, "slo": slo, "rate": args.rate, "concurrency": args.concurrency,
                "requests": len(lengths)}
        text = to_json(cands, best, chosen, meta)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0
