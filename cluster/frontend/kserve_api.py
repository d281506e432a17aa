"""The Open Inference Protocol v2 (KServe / Triton `inference.GRPCInferenceService`) on
tritonclient's generated stubs, so existing Triton clients work unchanged.

Inputs: text_input (BYTES, shape [1] or [1, 1]), max_tokens (INT32/UINT32), and optionally
stream (BOOL), temperature, top_p (FP32/FP64), top_k (INT32/INT64), random_seed (UINT64/INT64),
stop_words (BYTES), sampling_parameters (BYTES, a JSON object). Output: text_output (BYTES),
never including the prompt. ModelInfer answers once; ModelStreamInfer sends one response per
engine step, each echoing the request id, the last with triton_final_response=true, the finish
reason and output_tokens. Errors inside a stream travel in error_message ("INVALID_ARGUMENT: ...")
and the stream stays open.
"""
from __future__ import annotations

import asyncio
import json
import logging
import struct

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from cluster.frontend.interceptors import Undecodable
from cluster.frontend.core import Frontend, abort_on_error, deadline_of, status_of
from cluster.frontend.request import FrontendRequest
from cluster.frontend.tokenize import PromptInput
from cluster.frontend.openai_structured import structured_fields
from cluster.frontend.validate import SAMPLING_FIELDS, InvalidArgument, NotFound, build_params, check_model, check_request_id
from workers.engine.sampling_params import SamplingParams
from workers.engine.structured import check_spec

log = logging.getLogger(__name__)

SERVER_NAME, SERVER_VERSION = "tpserve", "0.1.0"
_READ_DONE, _TASK_DONE = object(), object()  # ModelStreamInfer's queue sentinels
# One ModelStreamInfer stream: responses waiting for a client that does not read, and requests
# running at once. Past either bound the stream stops reading requests (gRPC flow control then
# holds the client back), so a stream's memory stays bounded.
STREAM_QUEUE_LEN = 256
STREAM_MAX_ACTIVE = 64
MAX_SAMPLING_JSON_BYTES = 64 << 10
# name -> (accepted datatypes, numpy dtype per datatype)
NUMERIC = {"INT32": np.int32, "UINT32": np.uint32, "INT64": np.int64, "UINT64": np.uint64,
           "FP32": np.float32, "FP64": np.float64, "BOOL": np.bool_}
INPUTS = {"text_input": ("BYTES",), "max_tokens": ("INT32", "UINT32", "INT64", "UINT64"), "stream": ("BOOL",),
          "temperature": ("FP32", "FP64"), "top_p": ("FP32", "FP64"), "top_k": ("INT32", "INT64", "UINT32"),
          "random_seed": ("UINT64", "INT64", "INT32", "UINT32"), "stop_words": ("BYTES",),
          "sampling_parameters": ("BYTES",)}
# Scalar input tensors that set a sampling field (Triton's TensorRT-LLM names), by field.
TENSOR_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "random_seed": "seed"}


def _bytes_elements(field: str, raw: bytes) -> list[bytes]:
    """Length-prefixed BYTES elements (4-byte little-endian length, then the bytes)."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InvalidArgument(field, "truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise InvalidArgument(field, f"BYTES element of {n} bytes runs past the end of the tensor")
        out.append(raw[i:i + n])
        i += n
    return out


def read_inputs(request: pb.ModelInferRequest) -> dict[str, list]:
    """name -> list of elements, from `contents` or `raw_input_contents`, checked for dtype and shape."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidArgument("raw_input_contents", f"{len(request.raw_input_contents)} buffers for "
                                                    f"{len(request.inputs)} inputs")
    values: dict[str, list] = {}
    for idx, t in enumerate(request.inputs):
        if t.name not in INPUTS:
            raise InvalidArgument(t.name or "inputs", f"unknown input; accepted: {', '.join(INPUTS)}")
        if t.datatype not in INPUTS[t.name]:
            raise InvalidArgument(t.name, f"datatype {t.datatype!r}; expected {' or '.join(INPUTS[t.name])}")
        shape = list(t.shape)
        if t.name != "stop_words" and shape not in ([1], [1, 1]):
            raise InvalidArgument(t.name, f"shape {shape}; expected [1] or [1, 1]")
        count = int(np.prod(shape)) if shape else 1
        if request.raw_input_contents:
            raw = request.raw_input_contents[idx]
            if t.datatype == "BYTES":
                elems = [b for b in _bytes_elements(t.name, raw)]
            else:
                dt = np.dtype(NUMERIC[t.datatype])
                if len(raw) != dt.itemsize * count:
                    raise InvalidArgument(t.name, f"{len(raw)} raw bytes for {count} {t.datatype} element(s)")
                elems = np.frombuffer(raw, dtype=dt).tolist()
        else:
            c = t.contents
            elems = {"BYTES": list(c.bytes_contents), "BOOL": list(c.bool_contents), "INT32": list(c.int_contents),
                     "INT64": list(c.int64_contents), "UINT32": list(c.uint_contents),
                     "UINT64": list(c.uint64_contents), "FP32": list(c.fp32_contents),
                     "FP64": list(c.fp64_contents)}[t.datatype]
        if len(elems) != count:
            raise InvalidArgument(t.name, f"{len(elems)} element(s) for shape {shape}")
        values[t.name] = elems
    return values


def _text(field: str, b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(field, "is not valid UTF-8") from None


def sampling_params(values: dict[str, list], limits) -> SamplingParams:
    """The request's sampling fields: the max_tokens tensor, the `sampling_parameters` JSON object
    over it, then the other named input tensors over both (the order this API always had),
    checked by the frontend's one `build_params`."""
    if "max_tokens" not in values:
        raise InvalidArgument("max_tokens", "is required")
    fields: dict[str, object] = {"max_tokens": int(values["max_tokens"][0])}  # the JSON object may override it
    structured = None
    if "sampling_parameters" in values:
        blob = values["sampling_parameters"][0]
        if len(blob) > MAX_SAMPLING_JSON_BYTES:
            raise InvalidArgument("sampling_parameters", f"{len(blob)} bytes; at most {MAX_SAMPLING_JSON_BYTES}")
        raw = _text("sampling_parameters", blob)
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InvalidArgument("sampling_parameters", f"not valid JSON ({e.msg})") from None
        except RecursionError:
            raise InvalidArgument("sampling_parameters", "nested too deeply") from None
        except ValueError as e:  # an integer past Python's digit limit
            raise InvalidArgument("sampling_parameters", f"not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise InvalidArgument("sampling_parameters", "must be a JSON object")
        structured = structured_fields(obj, "sampling_parameters.")
        for k, v in obj.items():
            if k not in SAMPLING_FIELDS:
                raise InvalidArgument(f"sampling_parameters.{k}", f"unknown; accepted: {', '.join(SAMPLING_FIELDS)}")
            kind = SAMPLING_FIELDS[k]
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
                raise InvalidArgument(f"sampling_parameters.{k}", f"must be {kind.__name__}, got {v!r}")
            fields[k] = v
    for tensor, name in TENSOR_FIELDS.items():
        if tensor in values:
            fields[name] = values[tensor][0]
    if "stop_words" in values:
        fields["stop"] = [_text("stop_words", b) for b in values["stop_words"]]
    params = build_params(fields, limits)
    if structured is not None:
        check_spec(*structured)  # parsed here: a bad one is INVALID_ARGUMENT before admission
        params.structured = structured[0]
    return params


def _bytes_tensor(name: str, text: str) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    data = text.encode("utf-8")
    return (pb.ModelInferResponse.InferOutputTensor(name=name, datatype="BYTES", shape=[1]),
            struct.pack("<I", len(data)) + data)


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, frontend: Frontend, is_ready):
        self.fe, self.is_ready = frontend, is_ready

    @property
    def name(self) -> str:
        return self.fe.limits.name

    def _check_model(self, name: str, version: str = "") -> None:
        check_model(name, self.name, required=True)
        if version not in ("", "1"):
            raise NotFound(f"model {name!r} has no version {version!r}; it has version 1")

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.is_ready())

    @abort_on_error
    async def ModelReady(self, request, context):
        self._check_model(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.is_ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=["model_configuration"])

    @abort_on_error
    async def ModelMetadata(self, request, context):
        self._check_model(request.name, request.version)
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.name, versions=["1"], platform="tpserve",
            inputs=[T(name="text_input", datatype="BYTES", shape=[1]),
                    T(name="max_tokens", datatype="INT32", shape=[1]),
                    T(name="stream", datatype="BOOL", shape=[1]),
                    T(name="temperature", datatype="FP32", shape=[1]),
                    T(name="top_p", datatype="FP32", shape=[1]),
                    T(name="top_k", datatype="INT32", shape=[1]),
                    T(name="random_seed", datatype="UINT64", shape=[1]),
                    T(name="stop_words", datatype="BYTES", shape=[-1]),
                    T(name="sampling_parameters", datatype="BYTES", shape=[1])],
            outputs=[T(name="text_output", datatype="BYTES", shape=[1])])

    @abort_on_error
    async def ModelConfig(self, request, context):
        self._check_model(request.name, request.version)
        cfg = mc.ModelConfig(
            name=self.name, platform="tpserve", backend="tpserve", max_batch_size=0,
            model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
            input=[mc.ModelInput(name="text_input", data_type=mc.TYPE_STRING, dims=[1]),
                   mc.ModelInput(name="max_tokens", data_type=mc.TYPE_INT32, dims=[1]),
                   mc.ModelInput(name="stream", data_type=mc.TYPE_BOOL, dims=[1], optional=True),
                   mc.ModelInput(name="temperature", data_type=mc.TYPE_FP32, dims=[1], optional=True),
                   mc.ModelInput(name="top_p", data_type=mc.TYPE_FP32, dims=[1], optional=True),
                   mc.ModelInput(name="top_k", data_type=mc.TYPE_INT32, dims=[1], optional=True),
                   mc.ModelInput(name="random_seed", data_type=mc.TYPE_UINT64, dims=[1], optional=True),
                   mc.ModelInput(name="stop_words", data_type=mc.TYPE_STRING, dims=[-1], optional=True),
                   mc.ModelInput(name="sampling_parameters", data_type=mc.TYPE_STRING, dims=[1],
                                 optional=True)],
            output=[mc.ModelOutput(name="text_output", data_type=mc.TYPE_STRING, dims=[1])])
        return pb.ModelConfigResponse(config=cfg)

    def _prepare(self, request: pb.ModelInferRequest, streaming: bool, deadline: float | None) -> FrontendRequest:
        if isinstance(request, Undecodable):  # a bad message inside ModelStreamInfer: answered in-stream
            raise InvalidArgument(request.field, request.reason)
        self._check_model(request.model_name, request.model_version)
        check_request_id(request.id, "id")  # echoed in every response
        values = read_inputs(request)
        if "text_input" not in values:
            raise InvalidArgument("text_input", "is required")
        prompt = PromptInput("text_input", text=_text("text_input", values["text_input"][0]))
        self.fe.encoder.check(prompt, self.fe.limits.max_model_len)
        params = sampling_params(values, self.fe.limits)
        stream = bool(values.get("stream", [False])[0])
        if stream and not streaming:
            raise InvalidArgument("stream", "stream=true needs ModelStreamInfer; ModelInfer returns the whole text")
        # The id is the client's correlation tag, echoed; not the engine's id (clients may reuse one).
        return FrontendRequest(prompt, params, deadline=deadline)

    def _response(self, request, text: str, final: bool, finish_reason: str | None,
                  output_tokens: int) -> pb.ModelInferResponse:
        tensor, raw = _bytes_tensor("text_output", text)
        r = pb.ModelInferResponse(model_name=self.name, model_version="1", id=request.id, outputs=[tensor],
                                  raw_output_contents=[raw])
        if final:
            r.parameters["triton_final_response"].bool_param = True
            r.parameters["finish_reason"].string_param = finish_reason or ""
            r.parameters["output_tokens"].int64_param = output_tokens
        return r

    @abort_on_error
    async def ModelInfer(self, request, context):
        text, reason, n = "", None, 0
        async for out in self.fe.stream(self._prepare(request, streaming=False, deadline=deadline_of(context))):
            text += out.new_text
            n = out.output_tokens
            reason = out.finish_reason
        return self._response(request, text, True, reason, n)

    async def _stream_one(self, request, out_q: asyncio.Queue, deadline: float | None) -> None:
        try:
            async for out in self.fe.stream(self._prepare(request, streaming=True, deadline=deadline)):
                if out.new_text or out.finished:
                    await out_q.put(pb.ModelStreamInferResponse(infer_response=self._response(
                        request, out.new_text, out.finished, out.finish_reason, out.output_tokens)))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # answered in-stream, whatever it is: a decoupled client waits for it
            status = status_of(e)
            if status is None:
                log.exception("ModelStreamInfer request failed")
                status = (grpc.StatusCode.INTERNAL, f"{type(e).__name__} (see the server log)")
            code, message = status
            rid = getattr(request, "id", "")
            await out_q.put(pb.ModelStreamInferResponse(
                error_message=f"{code.name}: {message}",
                infer_response=pb.ModelInferResponse(id=rid if len(rid) <= 256 and rid.isprintable() else "")))
        finally:
            await out_q.put(_TASK_DONE)

    async def ModelStreamInfer(self, request_iterator, context):
        """Requests on one stream run concurrently (decoupled); their responses interleave as they come."""
        out_q: asyncio.Queue = asyncio.Queue(maxsize=STREAM_QUEUE_LEN)
        tasks: set[asyncio.Task] = set()
        slots = asyncio.Semaphore(STREAM_MAX_ACTIVE)
        active = 0

        async def read():
            nonlocal active
            try:
                async for request in request_iterator:
                    await slots.acquire()  # released as the task's _TASK_DONE is taken below
                    active += 1
                    t = asyncio.create_task(self._stream_one(request, out_q, deadline_of(context)))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
            finally:
                await out_q.put(_READ_DONE)

        reader = asyncio.create_task(read())
        reading = True
        try:
            while reading or active:
                item = await out_q.get()
                if item is _READ_DONE:
                    reading = False
                elif item is _TASK_DONE:
                    active -= 1
                    slots.release()
                else:
                    yield item
        finally:
            reader.cancel()
            for t in list(tasks):
                t.cancel()
