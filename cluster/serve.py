"""`tpserve serve`: Ray (embedded, or joined), the controller, the router and the gRPC server.

Embedded Ray (no --ray-address): lean (no dashboard, no usage stats, loopback, a small object
store); this process owns everything and SIGTERM tears it all down. Joined: the controller is a
detached named actor shared by frontends; a frontend's SIGTERM drains only its own streams.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass

from cluster.tls import ServerTLS, read_token
from workers.config import ModelConfig
from workers.engine.core import EngineConfig
from workers.engine.speculative import SpeculativeConfig
from workers.errors import ConfigError, PortInUse
from workers.model_source import BUILTIN_MODELS, resolve_model
from workers.defaults import MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS, default_dtype
from workers.worker import DTYPES, WorkerSpec, planned_num_blocks, served_context, weights_folder

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServeOptions:
    model: str = "smollm2-135m"
    tp: int = 1
    replicas: int = 1
    device: str = "cpu"
    dtype: str | None = None
    ray_address: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = 8000  # the OpenAI-compatible HTTP API; 0 turns it off
    metrics_port: int = 9090
    metrics_host: str = "127.0.0.1"  # Prometheus scrapes from outside only when this is opened up
    served_model_name: str | None = None
    max_model_len: int | None = None  # None: the model's, or what the KV cache holds if smaller
    max_num_seqs: int = MAX_NUM_SEQS
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    kv_cache_memory: int | None = None
    max_queue_len: int = 256
    drain_timeout_s: float = 30.0
    ray_num_cpus: int | None = None
    resume_timeout_s: float = 60.0
    max_resumes: int = 3
    collective_timeout_s: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_token_file: str | None = None
    health_port: int | None = None
    stall_timeout_s: float = 30.0
    expose_topology: bool = False
    quantization: str = "none"
    quant_group_size: int = 32
    cpu_collectives: str = "shm"
    compile: bool = False  # the CLI's --compile ($TPSERVE_COMPILE, else off)
    speculative: SpeculativeConfig | None = None  # --speculative-config
    enable_auto_tool_choice: bool = False  # OpenAI tool_choice "auto", parsed by tool_call_parser
    tool_call_parser: str | None = None  # cluster/frontend/tool_parsers.py: hermes, llama3_json
    routing: str = "kv-aware"
    routing_prefill_weight: float = 4.0
    balance_rel: float = 1.5
    balance_abs_tokens: int = 1024

    def validate(self) -> None:
        for name, lo in (("tp", 1), ("replicas", 0), ("max_num_seqs", 1), ("max_queue_len", 0), ("max_resumes", 0),
                         ("max_model_len", 1), ("max_num_batched_tokens", 1)):
            if getattr(self, name) is not None and getattr(self, name) < lo:
                raise ConfigError(name.replace("_", "-"), f"must be >= {lo}, got {getattr(self, name)}")
        for name in ("resume_timeout_s", "collective_timeout_s", "drain_timeout_s", "stall_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(name.removesuffix("_s").replace("_", "-"), f"must be > 0 seconds, got {getattr(self, name)}")
        for name in ("port", "http_port", "metrics_port", "health_port"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(name.replace("_", "-"), f"{getattr(self, name)} is not a TCP port")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError("device", f"{self.device!r} is not one of cpu, cuda")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError("dtype", f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ConfigError("tool-call-parser", "--enable-auto-tool-choice needs the model's tool-call format")
        if self.tool_call_parser is not None and not self.enable_auto_tool_choice:
            raise ConfigError("enable-auto-tool-choice", "--tool-call-parser is used only with --enable-auto-tool-choice")
        from cluster.frontend.tool_parsers import PARSERS

        if self.tool_call_parser not in (None, *PARSERS):
            raise ConfigError("tool-call-parser", f"{self.tool_call_parser!r} is not one of {', '.join(PARSERS)}")
        self.routing_config.validate()
        self.tls.validate()
        read_token(self.auth_token_file)

    @property
    def routing_config(self):
        from cluster.routing import RoutingConfig

        return RoutingConfig(self.routing, self.routing_prefill_weight, self.balance_rel, self.balance_abs_tokens)

    @property
    def tls(self) -> ServerTLS:
        return ServerTLS(self.tls_cert, self.tls_key, self.tls_client_ca)


def served_name(opts: ServeOptions) -> str:
    if opts.served_model_name:
        return opts.served_model_name
    if opts.model in BUILTIN_MODELS:
        return opts.model
    return os.path.basename(os.path.normpath(opts.model))


def init_ray(opts: ServeOptions) -> bool:
    """Join --ray-address, or start a lean local Ray. Returns True when this process owns Ray."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    if opts.ray_address:  # host:port of a GCS (this machine runs a Ray node) or ray://host:port (Ray Client)
        attempts = 3 if opts.ray_address.startswith("ray://") else 1
        for attempt in range(1, attempts + 1):
            try:
                ray.init(address=opts.ray_address, namespace="tpserve", log_to_driver=False)
                return False
            except ConnectionError as e:
                # Ray Client's server process for a new connection sometimes dies as it is forked
                # (ray-project/ray#63202, a few percent of connections): a new connection succeeds.
                if attempt == attempts:
                    raise
                log.warning("Ray Client connection failed (%s); retrying", type(e).__name__)
                ray.shutdown()
                time.sleep(2.0 * attempt)
    cpus = opts.ray_num_cpus or max(opts.replicas * opts.tp, os.cpu_count() or 1)
    # address="local": always a new instance of our own, never a Ray left running on this machine
    # (ray.init with no address joins the one named in /tmp/ray/ray_current_cluster).
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=256 << 20,
             namespace="tpserve", _node_ip_address="127.0.0.1", log_to_driver=False)
    return True


def build_spec(opts: ServeOptions) -> tuple[WorkerSpec, ModelConfig]:
    folder = resolve_model(opts.model)
    cfg = ModelConfig.from_pretrained(folder)
    spec = WorkerSpec(str(folder), tp_size=opts.tp, device=opts.device,
                      dtype=opts.dtype or default_dtype(opts.device),
                      max_model_len=opts.max_model_len, kv_cache_memory=opts.kv_cache_memory,
                      collective_timeout_s=opts.collective_timeout_s, quantization=opts.quantization,
                      quant_group_size=opts.quant_group_size, cpu_collectives=opts.cpu_collectives,
                      compile=opts.compile)
    spec.validate(cfg)
    blocks = planned_num_blocks(cfg, spec)
    if blocks is not None:  # refuse a context the KV cache cannot hold before any rank starts
        served_context(spec, cfg, blocks)
    weights_folder(spec)  # a quantized copy is made here once, before any rank starts
    return spec, cfg


async def run_frontend(opts: ServeOptions, controller, spec: WorkerSpec, cfg: ModelConfig, owns_ray: bool,
                       ready_file: str | None = None) -> None:
    from cluster.frontend.core import Frontend
    from cluster.frontend.server import Server
    from cluster.frontend.tokenize import PromptEncoder
    from cluster.frontend.validate import ModelLimits
    from cluster.metrics import Metrics
    from cluster.router import Router

    name = served_name(opts)
    encoder = PromptEncoder(spec.model_path)
    blocks = planned_num_blocks(cfg, spec)
    max_len = served_context(spec, cfg, blocks) if blocks is not None else \
        min(spec.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    limits = ModelLimits(name, cfg.vocab_size, max_len)
    info = {"name": name, "architecture": cfg.model_type, "max_model_len": max_len, "tp_size": spec.tp_size,
            "vocab_size": cfg.vocab_size, "dtype": spec.dtype, "device": spec.device,
            "has_chat_template": encoder.has_chat_template, "routing": opts.routing,
            "quantization": spec.quant.tag}
    import ray

    from workers.engine.block_keys import BlockKeyer

    # The engines' configuration is the controller's: the block-key salt, and the admission bound's
    # batch size and block size (a joined frontend started with other flags must not disagree).
    controller_info = ray.get(controller.info.remote(), timeout=60)
    engine_config, engine_spec = controller_info["engine"], controller_info["spec"]
    if engine_config.max_num_seqs != opts.max_num_seqs:
        log.warning("the replicas run max_num_seqs %d (this frontend was given %d); admitting by theirs",
                    engine_config.max_num_seqs, opts.max_num_seqs)
    router = Router(controller, engine_config.max_num_seqs, opts.max_queue_len, opts.routing_config,
                    BlockKeyer(engine_config.block_key_salt), engine_spec.block_size)
    metrics = Metrics()
    metrics.watch(router)
    if opts.metrics_port:
        metrics.serve(opts.metrics_port, opts.metrics_host)
    frontend = Frontend(router, encoder, limits, info, metrics, resume_timeout_s=opts.resume_timeout_s,
                        max_resumes=opts.max_resumes)
    server = Server(frontend, opts.host, opts.port, tls=opts.tls, token=read_token(opts.auth_token_file),
                    health_port=opts.health_port, expose_topology=opts.expose_topology)
    await server.start()
    http = None
    if opts.http_port:
        from cluster.frontend.http_server import HttpServer
        from cluster.frontend.openai_api import OpenAIApi

        http = HttpServer(OpenAIApi(frontend, server.is_ready, read_token(opts.auth_token_file),
                                    tool_parser=opts.tool_call_parser if opts.enable_auto_tool_choice else None),
                          opts.host, opts.http_port, tls=opts.tls)
        await http.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    security = ("TLS" if not opts.tls_client_ca else "mutual TLS") if opts.tls.enabled else "plaintext"
    security += ", bearer token" if opts.auth_token_file else ""
    health = f"; health also on plaintext :{server.health_port}" if server.health_port else ""
    openai = f"; OpenAI-compatible HTTP on {opts.host}:{http.port}" if http else ""
    print(f"tpserve: serving {name!r} on {opts.host}:{server.port} ({security}; tpserve.v1, KServe v2, health, "
          f"reflection){openai}; metrics on {opts.metrics_host}:{opts.metrics_port}{health}", flush=True)
    announced, controller_error, counters_read = False, None, 0.0
    try:
        while not stop.is_set():
            try:
                await loop.run_in_executor(None, router.refresh)
                if time.monotonic() - counters_read > 5.0:  # the restart counter of the metrics
                    counters_read = time.monotonic()
                    await loop.run_in_executor(None, router.controller_info)
                controller_error = None
                served = router.served_max_model_len()
                if served is not None and min(served, max_len) != limits.max_model_len:
                    # The engines' own figure (their KV caches, or a cluster started with other
                    # flags): the frontend never admits a request an engine would refuse.
                    limits.max_model_len = info["max_model_len"] = min(served, max_len)
                    log.info("serving a context of %d tokens (the replicas' KV caches and flags)",
                             limits.max_model_len)
            except Exception as e:  # the replicas serve without the controller: keep the ones we know
                if controller_error is None:
                    log.warning("cannot reach the controller (%s); serving on the %d known replica(s)",
                                type(e).__name__, len(router.ready))
                controller_error = e
            await server.update_health()
            if server.is_ready() and not announced:
                announced = True
                print(f"tpserve: ready ({len(router.ready)} replica(s) x tp {spec.tp_size}); try:\n"
                      f"  tpserve client --target {opts.host}:{server.port} --prompt 'Hello'", flush=True)
                if ready_file:
                    open(ready_file, "w").write(str(server.port))
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except TimeoutError:
                pass
        # Drain: refuse new work, let streams in flight finish within the grace period.
        router.draining = True
        await server.update_health()
        deadline = loop.time() + opts.drain_timeout_s
        while router.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if http is not None:
            await http.stop()
        await server.stop(grace_s=1.0)
    finally:
        router.close()
        encoder.close()
        if owns_ray:
            import ray

            ray.get(controller.shutdown.remote(), timeout=60)
            ray.shutdown()


def check_ports(opts: ServeOptions) -> None:
    """Every port flag's port is free now: a second frontend on one host learns it in a line, before
    it starts Ray or loads a model (the servers' own binds name the flag too, if one loses a race)."""
    for flag, host, port in (("port", opts.host, opts.port), ("http-port", opts.host, opts.http_port),
                             ("metrics-port", opts.metrics_host, opts.metrics_port),
                             ("health-port", opts.host, opts.health_port)):
        if not port:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
            try:
                sock.bind((host, port))
            except OSError as e:
                raise PortInUse(flag, f"cannot listen on {host}:{port} ({e.strerror}); pick another with "
                                      f"--{flag}") from None


def serve(opts: ServeOptions, ready_file: str | None = None) -> int:
    opts.validate()
    check_ports(opts)
    spec, cfg = build_spec(opts)
    owns = init_ray(opts)
    import ray

    from cluster.controller import ClusterConfig, get_or_create_controller

    try:
        config = ClusterConfig(served_name(opts), spec,
                               EngineConfig(opts.max_num_seqs, opts.max_num_batched_tokens,
                                            speculative=opts.speculative).validate(), opts.replicas,
                               stall_timeout_s=opts.stall_timeout_s)
        controller, created = get_or_create_controller(config, detached=not owns)
        if not created:
            log.info("found the running controller for %s", config.model_name)
        asyncio.run(run_frontend(opts, controller, spec, cfg, owns, ready_file))
        # Let Ray's own threads settle before it shuts down: a poll in flight must not race it.
        time.sleep(0.2)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return 0
