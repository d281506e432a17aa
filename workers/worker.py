"""One rank of a tensor-parallel replica: join the group, load this rank's shard, run steps.

Rank 0 drives: it builds each step's plan, broadcasts it on the CPU group and samples from the
gathered logits. The other ranks sit in `follow()`, running whatever plan arrives, until STOP.
The same class runs under the local launcher, inside a Ray actor, or in-process at tp 1.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from workers.config import ModelConfig
from workers.defaults import BLOCK_SIZE, CPU_KV_CACHE_BYTES, DTYPE_NAMES, GPU_MEMORY_UTILIZATION
from workers.errors import ConfigError
from workers.compiled_step import can_compile, compile_model, warm_up
from workers import huge_pages
from workers.kernel_probe import KernelProbe
from workers.layers.embedding import ParallelLMHead
from workers.layers.linear import LinearBase
from workers.layers.linear_method import plain_methods
from workers.loader import load_weights, read_generation_eos
from workers.models import build_model
from workers.models.batch import ForwardBatch
from workers.paged_cache import PagedKVCache, PagedSeq
from workers.paged_decode_op import gather_up_to
from workers.quantization import QuantConfig
from workers.quantized_checkpoint import is_quantized, quantized_checkpoint
from workers.parallel import TPGroup, head_shard
from workers.shm_comm import ShmCommunicator
from workers.step_plan import PlanChannel, PlanOp, StepPlan

log = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
DEVICES = ("cpu", "cuda")
CPU_COLLECTIVES = ("shm", "gloo")


@dataclass(slots=True)
class WorkerSpec:
    """How to build one replica's ranks; identical on every rank."""

    model_path: str
    tp_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    dist_init_method: str | None = None  # tcp://host:port of rank 0's rendezvous
    backend: str | None = None  # default: nccl on cuda, gloo on cpu
    num_threads: int | None = None  # torch threads per rank
    # None: the smaller of the model's context and what the KV cache holds for one sequence.
    max_model_len: int | None = None
    block_size: int = BLOCK_SIZE
    # KV-cache bytes per rank. None: 256 MiB on CPU; on CUDA, gpu_memory_utilization of what is free.
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION
    # A collective waiting longer than this raises (a hung or stopped peer) and the replica fails
    # over instead of hanging. Idle followers get a heartbeat plan well within it.
    collective_timeout_s: float = 30.0
    # Loading shards can take minutes on a slow disk; the one collective after it may wait that long.
    load_timeout_s: float = 900.0
    # Quantization of the projections: none | int8 | w8a8 | int4 (workers/quantization.py).
    quantization: str = "none"
    quant_group_size: int = 32  # int4
    # CPU ranks on one host: shm (shared-memory collectives, gloo where the ranks share no
    # /dev/shm) or gloo (always TCP; for comparison).
    cpu_collectives: str = "shm"
    # The step's regions around attention through torch.compile, warmed up at load (CPU, the Llama
    # family: workers/compiled_step.py). Off: eager, for debugging and for tests of other things.
    compile: bool = False

    @property
    def quant(self) -> QuantConfig:
        return QuantConfig(self.quantization, self.quant_group_size)

    def validate(self, config: ModelConfig) -> None:
        if self.device not in DEVICES:
            raise ConfigError("device", f"{self.device!r} is not one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not 1 <= self.tp_size <= config.num_heads:
            raise ConfigError("tp", f"tp={self.tp_size} must be between 1 and the model's {config.num_heads} query heads")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("max_model_len", f"must be >= 1, got {self.max_model_len}")
        if self.block_size < 1:
            raise ConfigError("block_size", f"must be >= 1, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ConfigError("kv_cache_memory", f"must be a positive number of bytes, got {self.kv_cache_memory}")
        if self.cpu_collectives not in CPU_COLLECTIVES:
            raise ConfigError("cpu_collectives", f"{self.cpu_collectives!r} is not one of {', '.join(CPU_COLLECTIVES)}")
        self.quant.validate()
        if self.quant.enabled and not config.is_llama_family:
            raise ConfigError("quantization", f"only the Llama family (llama, mistral, qwen2) is quantized; "
                                              f"{config.model_type} is not")


def kv_block_bytes(config: ModelConfig, spec: WorkerSpec, tp_size: int, rank: int) -> int:
    """One KV block's bytes on `rank` (its share of the KV heads)."""
    shard = head_shard(config.num_heads, config.num_kv_heads, tp_size, rank)
    return PagedKVCache.bytes_per_block(config.num_layers, spec.block_size, shard.num_kv_heads, config.head_dim,
                                        DTYPES[spec.dtype])


def planned_num_blocks(config: ModelConfig, spec: WorkerSpec) -> int | None:
    """The blocks every rank will agree on, when that is known before start (a byte budget, or
    the CPU default); None on CUDA without one (it depends on the memory free at start)."""
    if spec.kv_cache_memory is None and spec.device == "cuda":
        return None
    budget = spec.kv_cache_memory or CPU_KV_CACHE_BYTES
    return min(budget // kv_block_bytes(config, spec, spec.tp_size, r) for r in range(spec.tp_size))


def served_context(spec: WorkerSpec, config: ModelConfig, num_blocks: int) -> int:
    """The context a replica serves: `--max-model-len` if the KV cache holds one sequence of it,
    else (unset) the smaller of the model's and the cache's. Too large: refused, naming both."""
    cache = num_blocks * spec.block_size
    if spec.max_model_len is None:
        return min(config.max_position_embeddings, cache)
    wanted = min(spec.max_model_len, config.max_position_embeddings)
    if wanted > cache:
        raise ConfigError("max-model-len", f"{wanted} tokens, but the KV cache holds {cache} tokens for one "
                                           f"sequence ({num_blocks} blocks of {spec.block_size}); lower "
                                           f"--max-model-len or raise --kv-cache-memory")
    return wanted


def weights_folder(spec: WorkerSpec) -> str:
    """Where this spec's weights are read: the model folder, or its quantized copy in the cache
    (made once by whoever gets here first: `serve` and the launcher call this before ranks start)."""
    q, held = spec.quant.validate(), is_quantized(spec.model_path)
    if held is not None:
        if held != q.weights:
            raise ConfigError("quantization", f"{spec.model_path} holds {held.tag} weights; load it with "
                                              f"--quantization {held.method}")
        return spec.model_path
    if not q.enabled:
        return spec.model_path
    return str(quantized_checkpoint(spec.model_path, q))


def resolve_backend(spec: WorkerSpec) -> str:
    return spec.backend or ("nccl" if spec.device == "cuda" else "gloo")


def init_tp_group(spec: WorkerSpec, rank: int) -> TPGroup:
    """Join the replica's process group (a collective: every rank calls it)."""
    if spec.tp_size == 1:
        return TPGroup(0, 1)
    backend = resolve_backend(spec)
    load = timedelta(seconds=spec.load_timeout_s)
    dist.init_process_group(backend, init_method=spec.dist_init_method, rank=rank,
                            world_size=spec.tp_size, timeout=load)
    # Serving collectives get the short timeout (a hung peer must fail the step, not stall it);
    # the one collective after loading (the block count) waits on the slowest loader instead.
    serving = timedelta(seconds=spec.collective_timeout_s)
    load_group = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=load)
    device_group = dist.new_group(backend=backend, timeout=serving)
    # The step plan is small host data: it always travels on gloo, beside an NCCL device group.
    cpu_group = device_group if backend == "gloo" else dist.new_group(backend="gloo", timeout=serving)
    shm = None
    if spec.device == "cpu" and backend == "gloo" and spec.cpu_collectives == "shm":
        shm = ShmCommunicator.create(rank, spec.tp_size, load_group, spec.collective_timeout_s)
    return TPGroup(rank, spec.tp_size, device_group, cpu_group,
                   stage_on_host=backend == "gloo" and spec.device == "cuda", shm=shm, load_group=load_group)


class Worker:
    """A rank: process group, model shard, KV cache."""

    def __init__(self, spec: WorkerSpec, rank: int):
        t0 = time.perf_counter()
        self.spec, self.rank = spec, rank
        self.config = ModelConfig.from_pretrained(spec.model_path)
        spec.validate(self.config)
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        if spec.device == "cuda":
            self.device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.group = init_tp_group(spec, rank)
        self.dtype = DTYPES[spec.dtype]
        self.model = build_model(self.config, self.group, self.dtype, self.device, spec.quant).eval()
        self.read_counter = load_weights(self.model, weights_folder(spec))
        self.kernel_probe_seconds = self._finish_loading()
        self.huge_page_bytes = huge_pages.place_weights(self.model)  # CPU parameters only
        if self.device.type == "cpu" and rank == 0:
            log.info("weights in 2 MiB pages: %d MiB%s", self.huge_page_bytes >> 20,
                     "" if self.huge_page_bytes else f" ({huge_pages.available()})")
        self.eos_token_ids = sorted(set(self.config.eos_token_ids + read_generation_eos(spec.model_path)))
        self.block_size = spec.block_size
        self.num_blocks = self._agree_num_blocks()
        self.max_model_len = served_context(spec, self.config, self.num_blocks)
        if rank == 0:
            log.info("serving a context of %d tokens (model %d, KV cache %d blocks x %d)", self.max_model_len,
                     self.config.max_position_embeddings, self.num_blocks, self.block_size)
        shard = head_shard(self.config.num_heads, self.config.num_kv_heads, self.group.size, rank)
        self.cache = PagedKVCache(self.config.num_layers, self.num_blocks, self.block_size, shard.num_kv_heads,
                                  self.config.head_dim, self.dtype, self.device)
        self.cache.gather_up_to = self.decode_gather_up_to
        self.channel = PlanChannel(self.group.cpu_group, rank, shm=self.group.shm) if self.group.size > 1 else None
        self.compile_seconds, self.compiled = 0.0, False
        if spec.compile:
            self._compile()
        self.load_seconds = time.perf_counter() - t0

    def _compile(self) -> None:
        """Each rank compiles and warms up its own regions (workers/compiled_step.py)."""
        why = can_compile(self.model, self.device)
        if why is not None:
            log.warning("rank %d: the step stays eager (%s)", self.rank, why)
            return
        compile_model(self.model)
        self.compile_seconds, self.compiled = warm_up(self.model), True
        if self.rank == 0:
            log.info("compiled step ready in %.1f s (inductor's cache: %s)", self.compile_seconds,
                     os.environ.get("TORCHINDUCTOR_CACHE_DIR"))

    def _finish_loading(self) -> float:
        """Pack quantized weights and choose each layer's kernels and the decode attention's path
        on this machine (cached on disk: workers/kernel_probe.py); returns the seconds it took.
        Before the ranks agree on the cache (a collective under the load timeout), so a slow probe
        or the decode kernel's first build never keeps a peer waiting in a step's collective."""
        t = time.perf_counter()
        probe = KernelProbe.for_this_machine() if self.device.type == "cpu" else None
        for m in self.model.modules():
            if isinstance(m, (LinearBase, ParallelLMHead)):
                m.finish_loading(probe)
        self.decode_gather_up_to = 1 << 30  # CUDA: the gather path
        if probe is not None:
            shard = head_shard(self.config.num_heads, self.config.num_kv_heads, self.group.size, self.rank)
            self.decode_gather_up_to = gather_up_to(probe, shard.num_kv_heads, shard.kv_index(),
                                                    self.config.head_dim, self.spec.block_size, self.dtype)
        seconds = time.perf_counter() - t
        if probe is not None and probe.measured:
            log.info("rank %d: timed %d kernel choices in %.1f s (cached in %s)", self.rank, probe.measured,
                     seconds, probe.path)
        return seconds

    def _agree_num_blocks(self) -> int:
        """Blocks that fit this rank's budget, then the minimum over ranks: every rank must hold
        the same block ids, although uneven head cuts give ranks different KV heads per block."""
        per_block = kv_block_bytes(self.config, self.spec, self.group.size, self.rank)
        budget = self.spec.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * self.spec.gpu_memory_utilization)
            else:
                budget = CPU_KV_CACHE_BYTES
        n = torch.tensor([budget // per_block], dtype=torch.int64)
        if self.group.size > 1:
            dist.all_reduce(n, op=dist.ReduceOp.MIN, group=self.group.load_group)
        if int(n) < 1:
            raise ConfigError("kv_cache_memory", f"{budget} bytes hold no KV block of {per_block} bytes")
        return int(n)

    # ---- what every rank runs ------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Run one forward; logits [len(logits_indices), vocab] on rank 0 in the model's dtype (the
        sampler casts what it computes with: a bf16 step's greedy rows need no float32 copy of
        [rows, vocab]), None elsewhere."""
        dev = self.device
        batch = ForwardBatch(
            input_ids=torch.tensor(plan.input_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(plan.positions(), dtype=torch.long, device=dev),
            attn=self.cache.batch(plan.seqs),
            logits_indices=torch.tensor(plan.logits_indices, dtype=torch.long, device=dev),
        )
        logits = self.model(batch)
        return logits

    def follow(self) -> None:
        """Ranks > 0: run the plans rank 0 broadcasts until it says STOP."""
        while True:
            plan = self.channel.recv()
            if plan.op == PlanOp.STOP:
                return
            if plan.op == PlanOp.STEP:
                self.execute(plan)

    def load_report(self) -> dict:
        """What this rank holds and what it read: the tests compare these with the shard rule."""
        seen, param_bytes = set(), 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                param_bytes += p.numel() * p.element_size()
        # oneDNN's packed copies sit beside the plain weights (linear_method.PlainLinear).
        onednn = [m.onednn_weight for m in plain_methods(self.model) if m.onednn_weight is not None]
        return {"rank": self.rank, "pid": os.getpid(), "param_bytes": param_bytes,
                "onednn_layers": len(onednn), "onednn_bytes": sum(w.numel() * w.element_size() for w in onednn),
                "bytes_read": self.read_counter.bytes_read, "load_seconds": self.load_seconds,
                "kernel_probe_seconds": self.kernel_probe_seconds, "huge_page_bytes": self.huge_page_bytes,
                "compiled": self.compiled,
                "compile_seconds": self.compile_seconds,
                "num_threads": torch.get_num_threads(), "quantization": self.spec.quant.tag,
                "lm_head": self.model.lm_head.format,
                "max_model_len": self.max_model_len, "num_blocks": self.num_blocks, "block_size": self.block_size}

    def close(self) -> None:
        if self.group.shm is not None:
            self.group.shm.close()
            self.group.shm = None
        if self.group.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # ---- rank 0 only ---------------------------------------------------------------------
    def step(self, plan: StepPlan) -> torch.Tensor | None:
        if self.channel is not None:
            self.channel.send(plan)
        return self.execute(plan)

    def heartbeat(self, idle_s: float) -> None:
        """An empty plan to followers idle for `idle_s` or more, so their wait for the next plan
        never reaches the collective timeout while the engine simply has no work."""
        if self.channel is not None and time.monotonic() - self.channel.last_send >= idle_s:
            self.channel.send(StepPlan.noop())

    def stop_followers(self) -> None:
        if self.channel is not None:
            self.channel.send(StepPlan.stop())

    def prefill_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """Logits at every position of each prompt, concatenated: [sum(len), vocab].

        A diagnostic for tests and scoring, run outside the engine: it borrows the first blocks
        of the cache, so it must not run while the engine has requests in flight.
        """
        seqs, ids, next_block = [], [], 0
        for i, p in enumerate(prompts):
            if not p or len(p) > self.max_model_len:
                raise ConfigError(f"prompts[{i}]", f"needs 1..{self.max_model_len} tokens, got {len(p)}")
            nb = -(-len(p) // self.block_size)
            if next_block + nb > self.num_blocks:
                raise ConfigError("prompts", f"need more than the cache's {self.num_blocks} blocks")
            seqs.append(PagedSeq(0, len(p), list(range(next_block, next_block + nb))))
            next_block += nb
            ids += p
        logits = self.step(StepPlan(PlanOp.STEP, seqs, ids, list(range(len(ids)))))
        return None if logits is None else logits.float()

    def set_comm_timing(self, on: bool) -> float:
        """Turn timing of collectives on/off (rank 0); returns the seconds counted so far and resets."""
        seconds, self.group.comm_seconds, self.group.timed = self.group.comm_seconds, 0.0, on
        return seconds

    def layer_stack_steps(self) -> int:
        """Decode steps this rank ran as one C++ call (workers/layer_stack.py)."""
        stack = getattr(getattr(self.model, "model", None), "layer_stack", None)
        return 0 if stack is None else stack.steps

    def info(self) -> dict:
        return {"config": asdict(self.config), "eos_token_ids": self.eos_token_ids,
                "max_model_len": self.max_model_len, "tp_size": self.group.size,
                "num_blocks": self.num_blocks, "block_size": self.block_size}
