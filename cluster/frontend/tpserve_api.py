"""The tpserve.v1 servicer: parse and check, call the shared request path, build replies."""
from __future__ import annotations

import grpc

from cluster.api.tpserve.v1 import tpserve_pb2 as pb
from cluster.api.tpserve.v1 import tpserve_pb2_grpc as pb_grpc
from cluster.frontend.core import Frontend, abort_on_error, deadline_of, status_of
from cluster.frontend.validate import (InvalidArgument, check_model, check_prompt_ids, check_request_id, check_text,
                                       checked_params, finite)
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams

FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
STATE = {"starting": pb.REPLICA_STATE_STARTING, "ready": pb.REPLICA_STATE_READY,
         "unhealthy": pb.REPLICA_STATE_UNHEALTHY, "stopping": pb.REPLICA_STATE_STOPPING}


def sampling_params(sp: pb.SamplingParameters, limits) -> SamplingParams:
    p = SamplingParams()
    for name in ("max_tokens", "top_k", "seed", "logprobs"):
        if sp.HasField(name):
            setattr(p, name, int(getattr(sp, name)))
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if sp.HasField(name):
            setattr(p, name, finite(f"sampling.{name}", float(getattr(sp, name))))
    p.stop = list(sp.stop)
    p.stop_token_ids = list(sp.stop_token_ids)
    p.ignore_eos = sp.ignore_eos
    return checked_params(p, "sampling.", limits)


def messages_of(m: pb.ChatMessages) -> list[tuple[str, str]]:
    return [(x.role, x.content) for x in m.messages]


def logprobs_of(out_logprobs) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp["token_id"], logprob=lp["logprob"],
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp["top"]])
            for lp in (out_logprobs or [])]


class TpserveServicer(pb_grpc.TpserveServiceServicer):
    def __init__(self, frontend: Frontend):
        self.fe = frontend

    def _prepare(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
        fe = self.fe
        check_model(request.model, fe.limits.name)
        params = sampling_params(request.sampling, fe.limits)
        kind = request.WhichOneof("input")
        if kind == "prompt":
            ids = fe.encoder.encode(check_text("prompt", request.prompt))
        elif kind == "messages":
            ids = fe.encoder.encode_chat(messages_of(request.messages))
        elif kind == "prompt_token_ids":
            ids = list(request.prompt_token_ids.ids)
        else:
            raise InvalidArgument("input", "give one of prompt, messages or prompt_token_ids")
        return check_prompt_ids(ids, params.max_tokens, fe.limits, field=kind or "prompt"), params

    async def Generate(self, request, context):
        try:
            ids, params = self._prepare(request)
            async for out in self.fe.stream(ids, params, check_request_id(request.request_id), deadline_of(context)):
                yield self._response(out)
        except Exception as e:
            status = status_of(e)
            if status is None:
                raise
            await context.abort(*status)

    @staticmethod
    def _add(reply, out: RequestOutput):
        """Append a delta to a GenerateResponse or CompleteResponse (same field names); the final
        delta also sets the finish reason and counts."""
        reply.request_id = out.request_id
        reply.text += out.new_text
        reply.token_ids.extend(out.new_token_ids)
        reply.logprobs.extend(logprobs_of(out.logprobs))
        if out.finished:
            reply.finish_reason = FINISH.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
            reply.prompt_tokens, reply.completion_tokens = out.prompt_tokens, out.output_tokens
            reply.cached_prompt_tokens = out.cached_prompt_tokens
            if isinstance(out.stop_reason, str):
                reply.stop_reason = out.stop_reason
        return reply

    def _response(self, out: RequestOutput) -> pb.GenerateResponse:
        return self._add(pb.GenerateResponse(), out)

    @abort_on_error
    async def Complete(self, request, context):
        ids, params = self._prepare(request)
        reply = pb.CompleteResponse()
        async for out in self.fe.stream(ids, params, check_request_id(request.request_id), deadline_of(context)):
            self._add(reply, out)
        return reply

    @abort_on_error
    async def Tokenize(self, request, context):
        check_model(request.model, self.fe.limits.name)
        kind = request.WhichOneof("input")
        if kind == "text":
            ids = self.fe.encoder.encode(check_text("text", request.text))
        elif kind == "messages":
            ids = self.fe.encoder.encode_chat(messages_of(request.messages))
        else:
            raise InvalidArgument("input", "give text or messages")
        return pb.TokenizeResponse(token_ids=ids)

    async def GetModelInfo(self, request, context):
        i = self.fe.model_info
        return pb.ModelInfo(name=i["name"], architecture=i["architecture"], max_model_len=i["max_model_len"],
                            tp_size=i["tp_size"], vocab_size=i["vocab_size"], dtype=i["dtype"], device=i["device"],
                            has_chat_template=i["has_chat_template"])

    async def GetClusterStatus(self, request, context):
        import asyncio

        loop = asyncio.get_running_loop()
        statuses = await loop.run_in_executor(None, self.fe.router.status)
        controller = await loop.run_in_executor(None, self.fe.router.controller_info)
        self.fe.metrics.update_replicas(statuses)
        reply = pb.ClusterStatus(model=self.fe.limits.name, requests_in_flight=self.fe.router.in_flight,
                                 requests_refused=self.fe.router.refused, requests_resumed=self.fe.resumed,
                                 replica_restarts=controller.get("restarts", 0),
                                 target_replicas=controller.get("target_replicas", 0))
        for s in statuses:
            st = s["stats"]
            reply.replicas.append(pb.ReplicaStatus(
                replica_id=s["replica_id"], state=STATE.get(s["state"], pb.REPLICA_STATE_UNSPECIFIED),
                tp_size=s["tp_size"], running=st.running, waiting=st.waiting, kv_blocks_total=st.num_blocks,
                kv_blocks_free=st.free_blocks, prefix_cache_hit_tokens=st.prefix_hit_tokens,
                requests_routed=s["routed"], steps=st.steps,
                workers=[pb.WorkerStatus(rank=w["rank"], pid=w["pid"], node_id=w["node_id"], node_ip=w["node_ip"])
                         for w in s["workers"]]))
        return reply
