"""Drives a server over gRPC (tpserve.v1 or KServe v2) or its OpenAI-compatible HTTP API, and
times every request on the client.

Load shapes: closed loop (`concurrency` requests always in flight) or open loop (requests sent
at seeded arrival times, Poisson or gamma). A run stops after its requests or its duration,
whichever comes first, and only ever talks to the one target given.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc

from cluster.tls import ClientSecurity

from cluster.bench.arrivals import arrival_times
from cluster.bench.metrics import RequestRecord
from cluster.bench.workload import BenchRequest


@dataclass(slots=True)
class LoadSpec:
    concurrency: int | None = None  # closed loop
    request_rate: float | None = None  # open loop (requests/s)
    burstiness: float = 1.0
    num_requests: int = 100
    duration_s: float | None = None
    seed: int = 0
    timeout_s: float = 600.0


class TpserveProtocol:
    def __init__(self, channel: grpc.aio.Channel, model: str, metadata=()):
        from cluster.api.tpserve.v1 import tpserve_pb2 as pb
        from cluster.api.tpserve.v1 import tpserve_pb2_grpc as pb_grpc

        self.pb, self.stub, self.model = pb, pb_grpc.TpserveServiceStub(channel), model
        self.metadata = metadata

    async def send(self, req: BenchRequest, rec: RequestRecord, timeout: float) -> list[int]:
        """Returns the output token ids (a conversation's next turn appends them)."""
        pb = self.pb
        out_ids: list[int] = []
        msg = pb.GenerateRequest(model=self.model, sampling=pb.SamplingParameters(
            max_tokens=req.output_len, temperature=0.0, ignore_eos=True), cache_salt=req.cache_salt or "")
        if req.prompt_ids is not None:
            msg.prompt_token_ids.ids.extend(req.prompt_ids)
        else:
            msg.prompt = req.prompt_text
        start = last = time.perf_counter()
        async for m in self.stub.Generate(msg, timeout=timeout, metadata=self.metadata):
            now = time.perf_counter()
            if m.token_ids:
                if rec.ttft is None:
                    rec.ttft = now - start
                else:
                    rec.itl.append(now - last)
                last = now
                rec.output_tokens += len(m.token_ids)
                out_ids += m.token_ids
            if m.finish_reason:
                rec.prompt_tokens = m.prompt_tokens
                rec.cached_tokens = m.cached_prompt_tokens
        rec.e2e = time.perf_counter() - start
        return out_ids


class KServeProtocol:
    def __init__(self, channel: grpc.aio.Channel, model: str, metadata=()):
        from tritonclient.grpc import service_pb2 as pb
        from tritonclient.grpc import service_pb2_grpc as pb_grpc

        self.pb, self.stub, self.model = pb, pb_grpc.GRPCInferenceServiceStub(channel), model
        self.metadata = metadata

    def _request(self, req: BenchRequest, rid: str):
        import struct

        pb = self.pb
        T = pb.ModelInferRequest.InferInputTensor
        text = req.prompt_text.encode()
        r = pb.ModelInferRequest(model_name=self.model, id=rid, inputs=[
            T(name="text_input", datatype="BYTES", shape=[1]), T(name="max_tokens", datatype="INT32", shape=[1]),
            T(name="sampling_parameters", datatype="BYTES", shape=[1])])
        params = b'{"ignore_eos": true, "temperature": 0.0}'
        r.raw_input_contents.extend([struct.pack("<I", len(text)) + text, struct.pack("<i", req.output_len),
                                     struct.pack("<I", len(params)) + params])
        return r

    async def send(self, req: BenchRequest, rec: RequestRecord, timeout: float) -> None:
        async def one():
            yield self._request(req, "bench")

        start = last = time.perf_counter()
        async for m in self.stub.ModelStreamInfer(one(), timeout=timeout, metadata=self.metadata):
            now = time.perf_counter()
            if m.error_message:
                raise BenchError(m.error_message.split(":", 1)[0])
            resp = m.infer_response
            text_len = len(resp.raw_output_contents[0]) - 4 if resp.raw_output_contents else 0
            if text_len > 0:
                if rec.ttft is None:
                    rec.ttft = now - start
                else:
                    rec.itl.append(now - last)
                last = now
            if resp.parameters["triton_final_response"].bool_param:
                rec.output_tokens = resp.parameters["output_tokens"].int64_param
                break
        rec.e2e = time.perf_counter() - start


class OpenAIProtocol:
    """POST /v1/completions with stream=true, read as server-sent events by httpx (not the `openai`
    package: the HTTP-versus-gRPC ratio should measure the server, not a client library)."""

    def __init__(self, client, model: str):
        self.client, self.model = client, model

    async def send(self, req: BenchRequest, rec: RequestRecord, timeout: float) -> None:
        import json

        body = {"model": self.model, "prompt": req.prompt_ids if req.prompt_ids is not None else req.prompt_text,
                "max_tokens": req.output_len, "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        if req.cache_salt:
            body["cache_salt"] = req.cache_salt
        start = last = time.perf_counter()
        async with self.client.stream("POST", "/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                raise BenchError(f"HTTP_{r.status_code}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    raise BenchError(chunk["error"].get("type", "error"))
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    if rec.ttft is None:
                        rec.ttft = now - start
                    else:
                        rec.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    rec.output_tokens = chunk["usage"]["completion_tokens"]
                    rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
        rec.e2e = time.perf_counter() - start


class BenchError(Exception):
    """A status reported inside a stream (KServe error_message), or an HTTP status."""


PROTOCOLS = {"tpserve": TpserveProtocol, "kserve": KServeProtocol, "openai": OpenAIProtocol}


async def _session(proto, req: BenchRequest, timeout: float, on_record) -> None:
    """A conversation: each turn's prompt is the previous turn's prompt + its answer + a question.
    A failed turn ends the session (its later turns are not sent)."""
    prompt = list(req.prompt_ids)
    for i, question in enumerate([None] + list(req.follow_ups)):
        if question is not None:
            prompt = prompt + answer + question
        turn = BenchRequest(prompt, "", req.output_len)
        answer: list[int] = []
        rec = await _one(proto, turn, timeout, answer)
        on_record(rec)
        if not rec.ok:
            return


async def _one(proto, req: BenchRequest, timeout: float, answer: list[int] | None = None) -> RequestRecord:
    rec = RequestRecord()
    try:
        ids = await proto.send(req, rec, timeout)
        if answer is not None:
            answer += ids
        rec.ok = rec.output_tokens > 0
        if not rec.ok:
            rec.status = "EMPTY"
    except grpc.aio.AioRpcError as e:
        rec.status = e.code().name
    except BenchError as e:
        rec.status = str(e)
    except Exception as e:  # an HTTP transport error (httpx): the request is lost, the run goes on
        import httpx

        if not isinstance(e, httpx.HTTPError):
            raise
        rec.status = type(e).__name__
    return rec


def http_settings(http_target: str, security: ClientSecurity | None) -> dict:
    """httpx client settings for an OpenAI API: https with --tls-ca (and the client certificate),
    the bearer token."""
    import ssl

    from cluster.tls import read_token

    sec = security or ClientSecurity()
    token = read_token(sec.token_file, "auth-token-file")
    verify: ssl.SSLContext | bool = True
    if sec.ca:
        verify = ssl.create_default_context(cafile=sec.ca)
        if sec.cert:
            verify.load_cert_chain(sec.cert, sec.key)
    scheme = "https" if sec.ca else "http"
    return {"base_url": f"{scheme}://{http_target}", "verify": verify,
            "headers": {"Authorization": f"Bearer {token}"} if token else None}


def http_client(http_target: str, security: ClientSecurity | None, concurrency: int):
    """An async httpx client for the OpenAI API, with enough connections for the load."""
    import httpx

    return httpx.AsyncClient(**http_settings(http_target, security),
                             limits=httpx.Limits(max_connections=max(8, concurrency)), timeout=None)


async def run_load(target: str, protocol: str, model: str, requests: list[BenchRequest], load: LoadSpec,
                   on_done=None, security: ClientSecurity | None = None,
                   http_target: str | None = None) -> tuple[list[RequestRecord], float]:
    """Send the requests under the load shape; returns per-request records and the wall duration."""
    if protocol == "openai":
        conn = http_client(http_target or target, security, load.concurrency or 64)
    else:
        conn, metadata = (security or ClientSecurity()).channel(
            target, options=[("grpc.max_receive_message_length", 64 << 20)], aio=True)
    async with conn as ch:
        proto = OpenAIProtocol(ch, model) if protocol == "openai" else PROTOCOLS[protocol](ch, model, metadata)
        records: list[RequestRecord] = []
        deadline = time.perf_counter() + load.duration_s if load.duration_s else None
        start = time.perf_counter()

        def record(rec):
            records.append(rec)
            if on_done:
                on_done(rec)

        async def run(req):
            if req.follow_ups is not None:
                await _session(proto, req, load.timeout_s, record)
            else:
                record(await _one(proto, req, load.timeout_s))

        if load.request_rate:
            times = arrival_times(len(requests), load.request_rate, load.burstiness, load.seed)
            tasks = []
            for t, req in zip(times, requests):
                if deadline and time.perf_counter() >= deadline:
                    break
                await asyncio.sleep(max(0.0, start + float(t) - time.perf_counter()))
                tasks.append(asyncio.create_task(run(req)))
            await asyncio.gather(*tasks)
        else:
            queue = list(reversed(requests))

            async def worker():
                while queue and not (deadline and time.perf_counter() >= deadline):
                    await run(queue.pop())

            await asyncio.gather(*(worker() for _ in range(max(1, load.concurrency or 1))))
        return records, time.perf_counter() - start


def harness_overhead_ms(samples: int = 2000) -> float:
    """The harness's own cost per timed chunk: a clock read and a list append, measured here."""
    rec = RequestRecord()
    t = time.perf_counter()
    last = t
    for _ in range(samples):
        now = time.perf_counter()
        rec.itl.append(now - last)
        last = now
    return (time.perf_counter() - t) / samples * 1e3
