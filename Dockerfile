# The one image every tpserve pod runs (Ray head, Ray workers, gRPC frontend). No model weights:
# they come from a volume (k8s/). Build:  make image   (VARIANT=cuda for the GPU image)
ARG VARIANT=cpu
FROM python:3.11-slim AS base
ARG VARIANT
ENV PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=10000 RAY_USAGE_STATS_ENABLED=0 HOME=/tmp \
    TPSERVE_CACHE_DIR=/models PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/tpserve
# A C++ compiler: tpserve's CPU kernels (workers/cpu_kernels.py) and the compiled step are built
# on the node that runs them; without one, pods keep PyTorch's kernels, the gather path and eager.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
COPY requirements.txt pyproject.toml README.md ./
# torch first and pinned: the CPU build from PyTorch's CPU index, or the default (CUDA) build.
RUN if [ "$VARIANT" = "cuda" ]; then pip install torch==2.13.0; \
    else pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; fi \
 && pip install -r requirements.txt \
 && pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
COPY workers ./workers
COPY cluster ./cluster
COPY benchmarks ./benchmarks
RUN pip install --no-deps . && useradd --uid 1000 --create-home tpserve
USER 1000
EXPOSE 50051 9090
ENTRYPOINT []
CMD ["tpserve", "--help"]
