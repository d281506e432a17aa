"""A tpserve.v1 server with scripted timings and no model: tests the harness and measures its ceiling."""
from __future__ import annotations

import asyncio

import grpc

from cluster.api.tpserve.v1 import tpserve_pb2 as pb
from cluster.api.tpserve.v1 import tpserve_pb2_grpc as pb_grpc

SLOW, REFUSE = 7, 9  # first prompt id: 7 -> first token after `slow_first_s`; 9 -> RESOURCE_EXHAUSTED


class ScriptedServicer(pb_grpc.TpserveServiceServicer):
    def __init__(self, first_s: float, gap_s: float, slow_first_s: float):
        self.first_s, self.gap_s, self.slow_first_s = first_s, gap_s, slow_first_s
        self.prompts: list[list[int]] = []  # every prompt received, in order (the tests read them)

    async def Generate(self, request, context):
        ids = list(request.prompt_token_ids.ids)
        self.prompts.append(ids)
        if ids and ids[0] == REFUSE:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "scripted refusal")
        n = request.sampling.max_tokens
        await asyncio.sleep(self.slow_first_s if ids and ids[0] == SLOW else self.first_s)
        for i in range(n):
            if i:
                await asyncio.sleep(self.gap_s)
            last = i == n - 1
            yield pb.GenerateResponse(token_ids=[100 + i], text="x",
                                      finish_reason=pb.FINISH_REASON_LENGTH if last else 0,
                                      prompt_tokens=len(ids) if last else 0, completion_tokens=n if last else 0)

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(name="fake", vocab_size=1000, max_model_len=4096, tp_size=1)

    async def GetClusterStatus(self, request, context):
        return pb.ClusterStatus(model="fake")


async def start(first_s=0.05, gap_s=0.01, slow_first_s=0.15) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    server.servicer = ScriptedServicer(first_s, gap_s, slow_first_s)
    pb_grpc.add_TpserveServiceServicer_to_server(server.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port
