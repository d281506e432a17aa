"""The grpc.aio server: tpserve.v1, KServe v2, grpc.health.v1 and server reflection.

Health: the overall service "" and the model's name are SERVING once a replica is ready and
NOT_SERVING while draining or with none ready; "liveness" is SERVING while the process answers.
With TLS on, a plaintext `health_port` can serve the health service alone (Kubernetes' gRPC
probes cannot speak TLS). With a token, every call but health needs `authorization: Bearer`.
"""
from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2 as kserve_pb
from tritonclient.grpc import service_pb2_grpc as kserve_grpc

from cluster.api.tpserve.v1 import tpserve_pb2, tpserve_pb2_grpc
from cluster.frontend.core import Frontend
from cluster.frontend.health import HealthServicer
from cluster.frontend.interceptors import DecodeInterceptor, TokenAuthInterceptor
from workers.errors import PortInUse
from cluster.tls import ServerTLS
from cluster.frontend.kserve_api import KServeServicer
from cluster.frontend.tpserve_api import TpserveServicer

MAX_MESSAGE_BYTES = 16 << 20
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
           ("grpc.so_reuseport", 0)]
# The health-only port takes health requests alone: a service name of at most 256 characters.
HEALTH_OPTIONS = [("grpc.max_receive_message_length", 4 << 10), ("grpc.so_reuseport", 0)]
LIVENESS = "liveness"


def _bind(add_port, flag: str, host: str, port: int) -> int:
    """gRPC's add_*_port: 0 or a RuntimeError when the port is taken; a PortInUse naming the flag."""
    try:
        bound = add_port()
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise PortInUse(flag, f"cannot listen on {host}:{port} (in use, or not an address of this host); "
                              f"pick another with --{flag}")
    return bound


class Server:
    def __init__(self, frontend: Frontend, host: str, port: int, tls: ServerTLS | None = None,
                 token: str | None = None, health_port: int | None = None, expose_topology: bool = False):
        self.frontend = frontend
        interceptors = [DecodeInterceptor()]
        if token is not None:
            interceptors.insert(0, TokenAuthInterceptor(token, frontend.metrics.unauthenticated.inc))
        self.server = grpc.aio.server(options=OPTIONS, interceptors=interceptors)
        tpserve_pb2_grpc.add_TpserveServiceServicer_to_server(TpserveServicer(frontend, expose_topology), self.server)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(frontend, self.is_ready), self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (tpserve_pb2.DESCRIPTOR.services_by_name["TpserveService"].full_name,
                 kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.port = _bind(lambda: self.server.add_secure_port(f"{host}:{port}", tls.credentials())
                          if tls is not None and tls.enabled else self.server.add_insecure_port(f"{host}:{port}"),
                          "port", host, port)
        self.health_server, self.health_port = None, None
        if health_port is not None:
            self.health_server = grpc.aio.server(options=HEALTH_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = _bind(lambda: self.health_server.add_insecure_port(f"{host}:{health_port}"),
                                     "health-port", host, health_port)
        self._serving: bool | None = None

    def is_ready(self) -> bool:
        return bool(self.frontend.router.ready) and not self.frontend.router.draining

    async def start(self) -> None:
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.update_health()
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()

    async def update_health(self) -> None:
        serving = self.is_ready()
        if serving == self._serving:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(self.frontend.limits.name, status)

    async def stop(self, grace_s: float) -> None:
        await self.server.stop(grace_s)
        if self.health_server is not None:
            await self.health_server.stop(grace_s)
