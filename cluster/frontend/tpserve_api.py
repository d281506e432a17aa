"""The tpserve.v1 servicer: parse and check, call the shared request path, build replies."""
from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor


from cluster.api.tpserve.v1 import tpserve_pb2 as pb
from cluster.api.tpserve.v1 import tpserve_pb2_grpc as pb_grpc
from cluster.frontend.core import Frontend, abort_on_error, deadline_of, status_of
from cluster.frontend.request import FrontendRequest
from cluster.frontend.tokenize import PromptInput
from cluster.frontend.validate import InvalidArgument, build_params, check_model, check_request_id
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams
from workers.engine.structured import StructuredSpec, check_spec

FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
STATE = {"starting": pb.REPLICA_STATE_STARTING, "ready": pb.REPLICA_STATE_READY,
         "unhealthy": pb.REPLICA_STATE_UNHEALTHY, "stopping": pb.REPLICA_STATE_STOPPING}


OPTIONAL = ("max_tokens", "top_k", "seed", "logprobs", "temperature", "top_p", "min_p", "repetition_penalty",
            "presence_penalty", "frequency_penalty")  # proto3 `optional`: unset means the default


def sampling_params(sp: pb.SamplingParameters, limits, cache_salt: str = "") -> SamplingParams:
    values = {name: getattr(sp, name) for name in OPTIONAL if sp.HasField(name)}
    values.update(stop=sp.stop, stop_token_ids=sp.stop_token_ids, ignore_eos=sp.ignore_eos, cache_salt=cache_salt or None)
    params = build_params(values, limits, "sampling.", {"cache_salt": "cache_salt"})
    if sp.HasField("structured"):
        params.structured = structured_of(sp.structured)
    return params


def structured_of(so: pb.StructuredOutput) -> StructuredSpec:
    """The proto's oneof as a spec, parsed here (a schema is milliseconds; a bad one is
    INVALID_ARGUMENT naming sampling.structured before admission)."""
    kind = so.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("sampling.structured", "set one of json_schema, json_object, regex, choice, grammar")
    value = json.dumps(list(so.choice.choices)) if kind == "choice" else "" if kind == "json_object" else \
        getattr(so, kind)
    spec = StructuredSpec(kind, value)
    check_spec(spec, "sampling.structured")
    return spec


def messages_of(m: pb.ChatMessages) -> list[tuple[str, str]]:
    return [(x.role, x.content) for x in m.messages]


def logprobs_of(out_logprobs) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp["token_id"], logprob=lp["logprob"],
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp["top"]])
            for lp in (out_logprobs or [])]


STATUS_TTL_S = 1.0  # GetClusterStatus asks every replica; callers within this share one answer


class TpserveServicer(pb_grpc.TpserveServiceServicer):
    def __init__(self, frontend: Frontend, expose_topology: bool = False):
        self.fe = frontend
        self.expose_topology = expose_topology  # pids, node ids and IPs in GetClusterStatus
        self._status_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpserve-status")
        self._status_lock = asyncio.Lock()
        self._status: tuple[float, pb.ClusterStatus] | None = None

    def _prompt(self, request, text_field: str) -> PromptInput:
        """The request's input, checked for size (no tokenizing here: that runs after admission)."""
        kind = request.WhichOneof("input")
        if kind == text_field:
            prompt = PromptInput(kind, text=getattr(request, kind))
        elif kind == "messages":
            prompt = PromptInput(kind, messages=messages_of(request.messages))
        elif kind == "prompt_token_ids":
            n = len(request.prompt_token_ids.ids)
            if n >= self.fe.limits.max_model_len:  # before copying millions of ids out of the message
                raise InvalidArgument(kind, f"{n} tokens; the context holds {self.fe.limits.max_model_len}")
            prompt = PromptInput(kind, token_ids=list(request.prompt_token_ids.ids))
        else:
            raise InvalidArgument("input", f"give one of {text_field}, messages"
                                           f"{' or prompt_token_ids' if text_field == 'prompt' else ''}")
        context = self.fe.limits.max_model_len if text_field == "prompt" else None
        self.fe.encoder.check(prompt, context)
        return prompt

    def _prepare(self, request: pb.GenerateRequest, context) -> FrontendRequest:
        check_model(request.model, self.fe.limits.name, required=False)
        params = sampling_params(request.sampling, self.fe.limits, request.cache_salt)
        return FrontendRequest(self._prompt(request, "prompt"), params, check_request_id(request.request_id),
                               deadline_of(context))

    async def Generate(self, request, context):
        try:
            async for out in self.fe.stream(self._prepare(request, context)):
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
        reply = pb.CompleteResponse()
        async for out in self.fe.stream(self._prepare(request, context)):
            self._add(reply, out)
        return reply

    @abort_on_error
    async def Tokenize(self, request, context):
        check_model(request.model, self.fe.limits.name, required=False)
        return pb.TokenizeResponse(token_ids=await self.fe.encoder.encode(self._prompt(request, "text")))

    async def GetModelInfo(self, request, context):
        i = self.fe.model_info
        return pb.ModelInfo(name=i["name"], architecture=i["architecture"], max_model_len=i["max_model_len"],
                            tp_size=i["tp_size"], vocab_size=i["vocab_size"], dtype=i["dtype"], device=i["device"],
                            has_chat_template=i["has_chat_template"], quantization=i.get("quantization", "none"))

    async def GetClusterStatus(self, request, context):
        async with self._status_lock:  # one query of the replicas at a time, shared by its waiters
            if self._status is None or time.monotonic() - self._status[0] > STATUS_TTL_S:
                self._status = (time.monotonic(), await self._cluster_status())
        reply = pb.ClusterStatus()
        reply.CopyFrom(self._status[1])
        # This frontend's own counters cost nothing to read: they are live, not cached.
        router = self.fe.router
        reply.requests_in_flight, reply.requests_refused = router.in_flight, router.refused
        reply.requests_resumed = self.fe.resumed
        for r in reply.replicas:
            h = router.replicas.get(r.replica_id)
            if h is not None:
                r.requests_routed = h.book.routed
        return reply

    async def _cluster_status(self) -> pb.ClusterStatus:
        loop = asyncio.get_running_loop()
        statuses = await loop.run_in_executor(self._status_pool, self.fe.router.status)
        controller = await loop.run_in_executor(self._status_pool, self.fe.router.controller_info)
        reply = pb.ClusterStatus(model=self.fe.limits.name, replica_restarts=controller.get("restarts", 0),
                                 target_replicas=controller.get("target_replicas", 0))
        for s in statuses:
            st = s["stats"]
            reply.replicas.append(pb.ReplicaStatus(
                replica_id=s["replica_id"], state=STATE.get(s["state"], pb.REPLICA_STATE_UNSPECIFIED),
                tp_size=s["tp_size"], running=st.running, waiting=st.waiting, kv_blocks_total=st.num_blocks,
                kv_blocks_free=st.free_blocks, prefix_cache_hit_tokens=st.prefix_hit_tokens,
                requests_routed=s["routed"], steps=st.steps, spec_decode_num_drafts=st.spec_drafts,
                spec_decode_num_draft_tokens=st.spec_draft_tokens,
                spec_decode_num_accepted_tokens=st.spec_accepted_tokens,
                workers=[pb.WorkerStatus(rank=w["rank"], pid=w["pid"], node_id=w["node_id"], node_ip=w["node_ip"])
                         for w in s["workers"]] if self.expose_topology else []))
        return reply
