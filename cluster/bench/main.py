"""`tpserve bench` and `tpserve bench compare`."""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict
from pathlib import Path

from cluster.bench import HARNESS_VERSION
from cluster.bench.metrics import record_dict, summarize
from cluster.bench.runner import LoadSpec, harness_overhead_ms, http_settings, run_load
from cluster.tls import ClientSecurity, add_client_arguments
from cluster.bench.workload import WorkloadSpec, make_workload
from workers.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="host:port of the server (the only address contacted)")
    p.add_argument("--protocol", default="tpserve", choices=["tpserve", "kserve", "openai"])
    p.add_argument("--http-target", default=None,
                   help="host:port of the OpenAI-compatible HTTP API for --protocol openai (default: the "
                        "--target host, port 8000); --target still answers the model and cluster queries")
    p.add_argument("--model", default="", help="model name (default: the server's)")
    p.add_argument("--tokenizer", default=None,
                   help="--protocol openai against any OpenAI-compatible server (vLLM, SGLang, tpserve's HTTP "
                        "API): a local tokenizer folder or built-in model name for the workload's token ids; "
                        "then --target is the HTTP address, --model is required and no gRPC call is made")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed loop: requests always in flight")
    load.add_argument("--request-rate", type=float, help="open loop: Poisson arrivals per second")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1 = Poisson)")
    p.add_argument("--sweep", default=None, help="comma list of concurrencies (or rates with --request-rate)")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--duration", type=float, default=None, help="stop sending after this many seconds")
    p.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workload", default="random",
                   choices=["fixed", "random", "longtail", "shared-prefix", "multi-tenant", "conversation", "repetitive",
                            "file"],
                   help="repetitive: tasks whose answers repeat their prompts (rewrite, edit code, quote a "
                        "document), for speculative decoding")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--input-range", default="32,256")
    p.add_argument("--output-range", default="16,128")
    p.add_argument("--prefix-len", type=int, default=None,
                   help="shared prefix (shared-prefix: 256) or each tenant's system prompt (multi-tenant: 1000)")
    p.add_argument("--tenants", type=int, default=8, help="multi-tenant: tenants, each with its own system prompt")
    p.add_argument("--turns", type=int, default=4,
                   help="conversation: turns per session (--num-requests counts turns; --protocol tpserve)")
    p.add_argument("--workload-file", default=None)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--slo-e2e-ms", type=float, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request deadline (s)")
    p.add_argument("--out", default=None, help="JSON report")
    p.add_argument("--plot", default=None, help="PNG: TTFT/TPOT distributions and, for a sweep, the frontier")
    p.add_argument("--name", default=None, help="label of this configuration in plots")
    p.add_argument("--no-progress", action="store_true")
    add_client_arguments(p)


def _pair(flag: str, text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(flag, f"expected LO,HI, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise ConfigError(flag, f"need 1 <= LO <= HI, got {text!r}")
    return lo, hi


def http_target(args) -> str:
    if args.http_target:
        return args.http_target
    return args.target if _standalone(args) else f"{args.target.rsplit(':', 1)[0]}:8000"


def _standalone(args) -> bool:
    """An OpenAI-compatible server measured on its own: no tpserve gRPC service to ask for the
    model and vocabulary, which come from --model and --tokenizer instead."""
    return args.protocol == "openai" and args.tokenizer is not None


def tokenizer_vocab(name: str) -> int:
    """The vocabulary of a local tokenizer (a folder, or a name `tpserve serve` takes); never a hub."""
    from workers.model_source import ModelNotFoundError, resolve_model

    path = Path(name).expanduser()
    try:
        folder = path if path.is_dir() else resolve_model(name)
    except ModelNotFoundError as e:
        raise ConfigError("--tokenizer", str(e)) from None
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
    except (OSError, ValueError) as e:
        raise ConfigError("--tokenizer", f"no tokenizer in {folder} ({type(e).__name__})") from None


def openai_server_info(args) -> dict:
    """GET /v1/models of an OpenAI-compatible server; the asked model must be among them."""
    import httpx

    try:
        with httpx.Client(**http_settings(http_target(args), ClientSecurity.from_args(args)), timeout=30) as c:
            r = c.get("/v1/models")
        r.raise_for_status()
        models = r.json()
    except (httpx.HTTPError, ValueError) as e:
        raise ConfigError("--target", f"no OpenAI-compatible server answers GET /v1/models at "
                                      f"{http_target(args)} ({type(e).__name__})") from None
    ids = [m.get("id") for m in models.get("data", [])]
    if args.model not in ids:
        raise ConfigError("--model", f"{args.model!r} is not served at {http_target(args)} (it serves {ids})")
    return {"models": models}


def server_info(target: str, security: ClientSecurity | None = None) -> dict:
    from google.protobuf.json_format import MessageToDict

    from cluster.api.tpserve.v1 import tpserve_pb2 as pb
    from cluster.api.tpserve.v1 import tpserve_pb2_grpc as pb_grpc

    channel, metadata = (security or ClientSecurity()).channel(target)
    with channel as ch:
        stub = pb_grpc.TpserveServiceStub(ch)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30, metadata=metadata)
        status = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30, metadata=metadata)
    return {"model_info": MessageToDict(info), "cluster_status": MessageToDict(status)}


SPEC_KEYS = ("specDecodeNumDrafts", "specDecodeNumDraftTokens", "specDecodeNumAcceptedTokens")


def _spec_counters(args) -> dict[str, int]:
    """The cluster's speculative-decoding counters, summed over replicas (GetClusterStatus)."""
    if _standalone(args):
        return {}
    try:
        status = server_info(args.target, ClientSecurity.from_args(args))["cluster_status"]
    except Exception:  # the run's own figures stand without them
        return {}
    return {k: sum(int(r.get(k, 0)) for r in status.get("replicas", [])) for k in SPEC_KEYS}


def _spec_delta(before: dict, after: dict) -> dict | None:
    """Acceptance over one run (None where nothing was proposed): accepted / proposed, and the mean
    tokens a verifying sequence-step emitted (1 + accepted / drafts). Other clients' requests in
    the same window count too."""
    if not before or not after:
        return None
    d = {k: after[k] - before[k] for k in SPEC_KEYS}
    drafts, proposed, accepted = (d[k] for k in SPEC_KEYS)
    if not proposed:
        return None
    return {"drafts": drafts, "draft_tokens": proposed, "accepted_tokens": accepted,
            "acceptance_rate": accepted / proposed, "mean_accepted_length": 1 + accepted / max(drafts, 1)}


def run_bench(args) -> int:
    for flag in ("num_requests", "warmup"):
        if getattr(args, flag) < (1 if flag == "num_requests" else 0):
            raise ConfigError(f"--{flag.replace('_', '-')}", f"must be >= 1, got {getattr(args, flag)}")
    if args.concurrency is not None and args.concurrency < 1:
        raise ConfigError("--concurrency", f"must be >= 1, got {args.concurrency}")
    spec = WorkloadSpec(args.workload, args.input_len, args.output_len, _pair("--input-range", args.input_range),
                        _pair("--output-range", args.output_range), args.prefix_len, args.workload_file,
                        args.tenants, args.turns)
    if args.workload == "conversation" and args.protocol != "tpserve":
        raise ConfigError("--workload", "conversation sends token ids and reads the answer's: use --protocol tpserve")
    if args.prefix_len is not None and args.prefix_len < 1:
        raise ConfigError("--prefix-len", f"must be >= 1, got {args.prefix_len}")
    if args.tokenizer is not None and args.protocol != "openai":
        raise ConfigError("--tokenizer", "is for --protocol openai (other protocols ask the tpserve server)")
    if _standalone(args):
        if not args.model:
            raise ConfigError("--model", "is required with --tokenizer (there is no tpserve server to ask)")
        model, vocab = args.model, tokenizer_vocab(args.tokenizer)
        openai_server_info(args)
    else:
        try:
            info = server_info(args.target, ClientSecurity.from_args(args))
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError("--target", f"cannot reach a tpserve server at {args.target} "
                                          f"({type(e).__name__}; another OpenAI-compatible server: --protocol "
                                          f"openai --tokenizer)") from None
        model = args.model or info["model_info"]["name"]
        vocab = int(info["model_info"].get("vocabSize", 32000))
    slo = {"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms, "e2e": args.slo_e2e_ms}
    if args.sweep:
        try:
            points = [float(x) if args.request_rate else int(x) for x in args.sweep.split(",")]
        except ValueError:
            raise ConfigError("--sweep", f"expected a comma list of numbers, got {args.sweep!r}") from None
    else:
        points = [args.request_rate or args.concurrency or 1]
    try:
        requests = make_workload(spec, args.num_requests + args.warmup, vocab, args.seed)
    except ValueError as e:
        raise ConfigError("--workload", str(e)) from None
    # A conversation's entries are sessions of --turns requests each.
    measured_n = -(-args.num_requests // args.turns) if args.workload == "conversation" else args.num_requests
    warm, measured = requests[:len(requests) - measured_n], requests[len(requests) - measured_n:]
    runs = []
    for point in points:
        load = LoadSpec(concurrency=None if args.request_rate else int(point),
                        request_rate=float(point) if args.request_rate else None, burstiness=args.burstiness,
                        num_requests=args.num_requests, duration_s=args.duration, seed=args.seed,
                        timeout_s=args.timeout)
        label = f"rate {point:g}/s" if args.request_rate else f"conc {int(point)}"
        if warm:
            asyncio.run(run_load(args.target, args.protocol, model, warm, LoadSpec(concurrency=len(warm)),
                                  security=ClientSecurity.from_args(args), http_target=http_target(args)))
        before = _spec_counters(args)
        records, duration = _run_with_progress(args, model, measured, load, label)
        run = {"load": asdict(load), "load_label": label, "summary": summarize(records, duration, slo),
               "records": [record_dict(r) for r in records]}
        acceptance = _spec_delta(before, _spec_counters(args))
        if acceptance is not None:
            run["summary"]["speculative"] = acceptance
        runs.append(run)
        from cluster.bench.report import print_summary

        print_summary(run)
    overhead = harness_overhead_ms()
    # counters after the run
    after = openai_server_info(args) if _standalone(args) else server_info(args.target, ClientSecurity.from_args(args))
    report = {"harness_version": HARNESS_VERSION, "name": args.name or f"{model}", "target": args.target,
              "protocol": args.protocol, "http_target": http_target(args) if args.protocol == "openai" else None,
              "workload": asdict(spec), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "harness_overhead_ms_per_chunk": overhead, "server": after, "runs": runs}
    print(f"harness overhead: {overhead * 1e3:.2f} us of client-side work per timed token chunk")
    if args.out:
        from cluster.bench.report import save

        save(report, args.out)
    if args.plot:
        from cluster.bench.report import plot

        plot(report, args.plot)
    return 0


def _run_with_progress(args, model, requests, load, label):
    if args.no_progress:
        return asyncio.run(run_load(args.target, args.protocol, model, requests, load,
                                    security=ClientSecurity.from_args(args), http_target=http_target(args)))
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task(label, total=sum(1 + len(r.follow_ups or ()) for r in requests))
        return asyncio.run(run_load(args.target, args.protocol, model, requests, load,
                                    on_done=lambda rec: bar.advance(task), security=ClientSecurity.from_args(args),
                                    http_target=http_target(args)))


def run_compare(argv: list[str]) -> int:
    from cluster.bench.report import compare

    ap = argparse.ArgumentParser(prog="tpserve bench compare")
    ap.add_argument("a")
    ap.add_argument("b")
    args = ap.parse_args(argv)
    for path in (args.a, args.b):
        import os

        if not os.path.isfile(path):
            raise ConfigError("report", f"no such file: {path}")
    print("\n".join(compare(args.a, args.b)))
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "compare":
        return run_compare(argv[1:])
    ap = argparse.ArgumentParser(prog="tpserve bench", description="load-test a running tpserve (or KServe v2) server")
    add_arguments(ap)
    return run_bench(ap.parse_args(argv))
