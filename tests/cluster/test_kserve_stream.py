"""KServe's ModelStreamInfer under faults the real cluster cannot be made to show on demand: a bug
inside one request (answered in-stream, never dropped) and a client that stops reading (the
stream stops taking requests: bounded memory). The real servicer on a real grpc.aio server, in
front of a request path that injects the fault."""
from __future__ import annotations

import asyncio
import struct

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from cluster.frontend.kserve_api import STREAM_MAX_ACTIVE, KServeServicer
from cluster.frontend.validate import ModelLimits
from workers.engine.outputs import RequestOutput


class FaultyPath:
    """Stands in for Frontend.stream: raises a bug, or streams 40 deltas of 4 KiB per request (300
    requests make 48 MiB of replies: more than every transport buffer holds)."""

    limits = ModelLimits("m", 100, 1000)

    class encoder:  # noqa: N801 (the attribute the servicer reads)
        @staticmethod
        def check(prompt, context=None):
            return None

    def __init__(self, bug: bool):
        self.bug, self.started, self.active, self.peak = bug, 0, 0, 0

    async def stream(self, prompt, params, request_id=None, deadline=None):
        self.started += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.bug:
                raise RuntimeError("injected bug")
            for i in range(40):
                await asyncio.sleep(0)
                yield RequestOutput("r", new_token_ids=[1], new_text="y" * 4096, finished=i == 39,
                                    finish_reason="length" if i == 39 else None, output_tokens=i + 1)
        finally:
            self.active -= 1


def request(i: int) -> pb.ModelInferRequest:
    T = pb.ModelInferRequest.InferInputTensor
    r = pb.ModelInferRequest(model_name="m", id=f"q{i}", inputs=[T(name="text_input", datatype="BYTES", shape=[1]),
                                                                  T(name="max_tokens", datatype="INT32", shape=[1])])
    r.raw_input_contents.extend([struct.pack("<I", 2) + b"hi", struct.pack("<i", 40)])
    return r


async def serve(path):
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(path, lambda: True), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_a_bug_inside_one_request_is_answered_in_stream_and_the_stream_goes_on():
    async def run():
        path = FaultyPath(bug=True)
        server, port = await serve(path)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                replies = [r async for r in pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(
                    iter([request(0), request(1)]), timeout=30)]
        finally:
            await server.stop(0)
        return replies

    replies = asyncio.run(run())
    assert len(replies) == 2  # one answer per request, none dropped
    assert all(r.error_message.startswith("INTERNAL: RuntimeError") for r in replies)
    assert {r.infer_response.id for r in replies} == {"q0", "q1"}


def test_a_client_that_stops_reading_makes_the_stream_stop_taking_requests():
    async def run():
        path = FaultyPath(bug=False)
        server, port = await serve(path)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(request(i) for i in range(300))
                await asyncio.sleep(2.0)  # the client reads nothing
                stalled = (path.started, path.peak)
                finals = 0
                async for r in call:  # now it reads: every request is answered in full
                    assert not r.error_message, r.error_message
                    finals += r.infer_response.parameters["triton_final_response"].bool_param
        finally:
            await server.stop(0)
        return stalled, finals, path.peak

    (started, peak_stalled), finals, peak = asyncio.run(run())
    assert peak_stalled <= STREAM_MAX_ACTIVE and started < 300  # bounded while nobody read
    assert finals == 300 and peak <= STREAM_MAX_ACTIVE
