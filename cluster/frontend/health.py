"""grpc.health.v1 with bounds: a service name is at most 256 characters and the open Watch
streams are capped, so probes cannot be turned into a memory or connection sink.

Watch is written here rather than inherited: grpc's reference servicer drops a service's
condition when any one of its watchers leaves, so the others would never hear of a change.
"""
from __future__ import annotations

import collections

import grpc
from grpc_health.v1 import health, health_pb2

MAX_SERVICE_NAME_CHARS = 256
MAX_WATCHES = 64


class HealthServicer(health.aio.HealthServicer):
    def __init__(self, max_watches: int = MAX_WATCHES):
        super().__init__()
        self.max_watches = max_watches
        self.watches = 0
        self._watchers_of: collections.Counter[str] = collections.Counter()

    @staticmethod
    async def _check_name(request, context) -> None:
        if len(request.service) > MAX_SERVICE_NAME_CHARS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"service: {len(request.service)} characters; at most {MAX_SERVICE_NAME_CHARS}")

    async def Check(self, request, context):
        await self._check_name(request, context)
        return await super().Check(request, context)

    async def Watch(self, request, context):
        await self._check_name(request, context)
        if self.watches >= self.max_watches:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.watches} health watches are open; at most {self.max_watches}")
        service = request.service
        self.watches += 1
        self._watchers_of[service] += 1
        condition = self._server_watchers[service]
        last = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                        last = status
                    await condition.wait()
        finally:
            self.watches -= 1
            self._watchers_of[service] -= 1
            if not self._watchers_of[service]:  # the last watcher of this name: forget its condition
                del self._watchers_of[service]
                self._server_watchers.pop(service, None)
