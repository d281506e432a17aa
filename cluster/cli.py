"""`tpserve` command line. Errors print one line and exit non-zero; no tracebacks for bad input."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from workers import set_openmp_env  # noqa: E402
set_openmp_env()  # before torch loads: ranks share cores

from workers.defaults import MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS  # noqa: E402
from workers.errors import TpserveError  # noqa: E402

log = logging.getLogger("tpserve")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="a Hugging Face-format folder, a .gguf file, or a built-in name (smollm2-135m)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (1..number of query heads)")
    p.add_argument("--device", default="cpu", choices=None, help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--quantization", default="none", choices=["none", "int8", "w8a8", "int4"],
                   help="quantization of the projections (quantized once into the cache; CPU kernels): int8 and int4 "
                        "weights, or w8a8 (int8 weights and per-token int8 activations: for many sequences at once)")
    p.add_argument("--quant-group-size", type=int, default=32, help="int4: input columns per scale (32, 64, 128, 256)")
    p.add_argument("--cpu-collectives", default="shm", choices=["shm", "gloo"],
                   help="CPU ranks of one replica on one host: shared-memory collectives (gloo where the ranks "
                        "share no /dev/shm) or always gloo")
    # Off by default: the step the engine runs by default (a decode step's layers in one C++ call,
    # workers/layer_stack.py) decodes ~2x faster and starts ~4x sooner than this one; `on` turns the
    # layer stack off (docs/benchmarks.md, fourteenth session: 4.9 against 10.5 ms a token for bf16
    # int4, starts of 2.4-2.8 against 7.9-9.1 s with each cache warm).
    p.add_argument("--compile", default=os.environ.get("TPSERVE_COMPILE", "off"), choices=["on", "off"],
                   help="CPU, Llama family: the step's regions around attention through torch.compile, warmed up "
                        "at load and cached on disk (experimental, and slower than the default C++ step; default: "
                        "$TPSERVE_COMPILE or off)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s keys: {"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4, "prompt_lookup_min": 2} or {"method": "draft_model", "model": '
                        'PATH, "num_speculative_tokens": 4}; also max_batch (speculate only while a step decodes '
                        'at most this many sequences; default: no bound, the measured step costs decide), adaptive '
                        'and min_acceptance (docs/architecture.md)')


def cmd_prepare(args) -> int:
    from workers.model_source import resolve_model

    print(resolve_model(args.model))
    return 0


def cmd_generate(args) -> int:
    from cluster.offline import OfflineGenerator, read_prompts_file, write_results
    from workers.engine.speculative import SpeculativeConfig

    if (args.prompt is None) == (args.prompts_file is None):
        raise_usage("--prompt", "give exactly one of --prompt and --prompts-file")
    if args.max_tokens < 1:
        raise_usage("--max-tokens", f"must be >= 1, got {args.max_tokens}")
    if args.temperature < 0:
        raise_usage("--temperature", f"must be >= 0, got {args.temperature}")
    speculative = SpeculativeConfig.parse(args.speculative_config)
    requests = read_prompts_file(args.prompts_file, args) if args.prompts_file else None
    with OfflineGenerator(args.model, tp=args.tp, device=args.device, dtype=args.dtype,
                          kv_cache_memory=args.kv_cache_memory, max_model_len=args.max_model_len,
                          quantization=args.quantization, quant_group_size=args.quant_group_size,
                          cpu_collectives=args.cpu_collectives, compile=args.compile == "on",
                          speculative=speculative) as gen:
        if requests is None:
            print(gen.generate_text(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                    seed=args.seed, chat=args.chat))
            return 0
        results = gen.generate_many(requests, chat=args.chat)
    write_results(results, args.out)
    return 0


def cmd_serve(args) -> int:
    from cluster.serve import ServeOptions, serve
    from workers.engine.speculative import SpeculativeConfig

    opts = ServeOptions(model=args.model, tp=args.tp, replicas=args.replicas, device=args.device, dtype=args.dtype,
                        ray_address=args.ray_address, host=args.host, port=args.port, metrics_port=args.metrics_port,
                        served_model_name=args.served_model_name, max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        kv_cache_memory=args.kv_cache_memory, max_queue_len=args.max_queue_len,
                        drain_timeout_s=args.drain_timeout, ray_num_cpus=args.ray_num_cpus,
                        resume_timeout_s=args.resume_timeout, max_resumes=args.max_resumes,
                        collective_timeout_s=args.collective_timeout, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                        auth_token_file=args.auth_token_file, health_port=args.health_port,
                        metrics_host=args.metrics_host, stall_timeout_s=args.stall_timeout,
                        expose_topology=args.expose_topology, http_port=args.http_port, routing=args.routing,
                        routing_prefill_weight=args.routing_prefill_weight, balance_rel=args.balance_rel,
                        balance_abs_tokens=args.balance_abs_tokens, quantization=args.quantization,
                        quant_group_size=args.quant_group_size, cpu_collectives=args.cpu_collectives,
                        compile=args.compile == "on", speculative=SpeculativeConfig.parse(args.speculative_config),
                        enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser)
    return serve(opts, ready_file=args.ready_file)


def cmd_client(args) -> int:
    import grpc

    from cluster.api.tpserve.v1 import tpserve_pb2 as pb
    from cluster.api.tpserve.v1 import tpserve_pb2_grpc as pb_grpc

    sampling = pb.SamplingParameters(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.seed is not None:
        sampling.seed = args.seed
    sampling.stop.extend(args.stop or [])
    req = pb.GenerateRequest(model=args.model or "", sampling=sampling)
    if args.chat:
        req.messages.messages.append(pb.ChatMessage(role="user", content=args.prompt))
    else:
        req.prompt = args.prompt
    from cluster.tls import ClientSecurity

    channel, metadata = ClientSecurity.from_args(args).channel(args.target)
    with channel:
        stub = pb_grpc.TpserveServiceStub(channel)
        try:
            final = None
            for msg in stub.Generate(req, timeout=args.timeout, metadata=metadata):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                final = msg
            sys.stdout.write("\n")
            if final is not None and args.verbose:
                print(f"[{pb.FinishReason.Name(final.finish_reason)}; prompt {final.prompt_tokens} tokens, "
                      f"completion {final.completion_tokens}]", file=sys.stderr)
        except grpc.RpcError as e:
            print(f"tpserve: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


class UsageError(TpserveError):
    pass


def raise_usage(flag: str, message: str):
    raise UsageError(f"{flag}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpserve", description="Tensor-parallel LLM inference")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="resolve a model (convert GGUF once into the cache) and print its folder")
    p.add_argument("--model", default="smollm2-135m")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("generate", help="generate a completion offline (no server)")
    _add_model_args(p)
    p.add_argument("--prompt", help="one prompt (or use --prompts-file)")
    p.add_argument("--prompts-file", help="JSONL, one object a line: prompt, and optionally max_tokens, "
                                           "temperature, top_p, top_k, seed, stop; all run concurrently")
    p.add_argument("--out", help="JSONL results, in input order (default: stdout)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV-cache bytes per rank")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context in tokens (default: the model's, or what the KV cache holds for one sequence)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="run the cluster: Ray replicas behind a gRPC frontend")
    _add_model_args(p)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start an embedded one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health); 0: off")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics (0: off)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the metrics endpoint binds (loopback by default; 0.0.0.0 in a pod)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context in tokens (default: the model's, or what the KV cache holds for one sequence)")
    p.add_argument("--max-num-seqs", type=int, default=MAX_NUM_SEQS)
    p.add_argument("--max-num-batched-tokens", type=int, default=MAX_NUM_BATCHED_TOKENS)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV-cache bytes per rank")
    p.add_argument("--max-queue-len", type=int, default=256, help="requests admitted beyond the replicas' batches")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight streams get on SIGTERM")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="logical CPUs of an embedded Ray")
    p.add_argument("--resume-timeout", type=float, default=60.0,
                   help="seconds a request whose replica failed may wait for another to resume on")
    p.add_argument("--max-resumes", type=int, default=3,
                   help="times one request may be resumed after losing its replica (it may run on this many + 1); "
                        "a request in flight on 2 replicas whose engines failed is never resumed again")
    p.add_argument("--collective-timeout", type=float, default=30.0,
                   help="seconds a tensor-parallel collective may wait on a peer before the replica fails over")
    p.add_argument("--stall-timeout", type=float, default=30.0,
                   help="seconds a replica with work may go without an engine step before it is replaced")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='OpenAI tool_choice "auto": the model decides, its own tool-call format parsed (needs '
                        "--tool-call-parser)")
    p.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                   help="the model's tool-call format: hermes (<tool_call>{...}</tool_call>: Hermes, Qwen) or "
                        "llama3_json ({\"name\", \"parameters\"}: Llama 3.1+)")
    p.add_argument("--routing", default="kv-aware", choices=["kv-aware", "least-load", "round-robin"],
                   help="kv-aware: least prefill-weight x uncached prompt tokens + load (docs/routing.md); "
                        "least-load: least queued and running tokens; round-robin: in turn")
    p.add_argument("--routing-prefill-weight", type=float, default=4.0,
                   help="kv-aware: what one uncached prompt token costs against one token of queued work")
    p.add_argument("--balance-rel", type=float, default=1.5,
                   help="kv-aware balance guard: take the least-loaded replica when the cache's choice has more "
                        "than this x the least load + --balance-abs-tokens")
    p.add_argument("--balance-abs-tokens", type=int, default=1024, help="see --balance-rel")
    p.add_argument("--expose-topology", action="store_true",
                   help="GetClusterStatus includes each worker's pid, node id and IP (off: none of them)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain of the gRPC server (turns TLS on)")
    p.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    p.add_argument("--tls-client-ca", default=None, help="PEM CA that client certificates must chain to (mutual TLS)")
    p.add_argument("--auth-token-file", default=None,
                   help="file holding the bearer token every call but health must present")
    p.add_argument("--health-port", type=int, default=None,
                   help="also serve grpc.health.v1 alone on this plaintext port (for probes when TLS is on)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="level of tpserve's own logs (Ray's and gRPC's stay at warning)")
    p.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)

    sub.add_parser("bench", help="load-test a running server (tpserve bench --help)", add_help=False)

    from cluster.planner.cli import add_plan_args, add_profile_args, cmd_plan, cmd_profile

    p = sub.add_parser("profile", help="measure this machine for the planner (hw.json)")
    add_profile_args(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("plan", help="predict TTFT/TPOT/throughput per tp x replicas x max_num_seqs")
    add_plan_args(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("client", help="stream a completion from a running server")
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--prompt", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append")
    p.add_argument("--chat", action="store_true")
    p.add_argument("--timeout", type=float, default=300.0)
    from cluster.tls import add_client_arguments

    add_client_arguments(p)
    p.set_defaults(func=cmd_client)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: `tpserve bench ...` and `tpserve bench compare A B`
        logging.basicConfig(level=logging.WARNING)
        from cluster.bench.main import main as bench_main

        try:
            return bench_main(argv[1:])
        except TpserveError as e:
            print(f"tpserve: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "log_level", None) and not args.verbose:
        for name in ("cluster", "workers"):
            logging.getLogger(name).setLevel(args.log_level.upper())
    try:
        return args.func(args)
    except TpserveError as e:
        print(f"tpserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
