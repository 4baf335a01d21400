"""The gRPC binding of the Open Inference Protocol: ``inference.GRPCInferenceService``.

Owns the translation between protobuf messages (built from ``grpc_service.proto`` by
``agent.api._messages``) and the service's requests, bearer-token auth through the
``authorization`` metadata, and the mapping of the agent's errors to gRPC status codes.
Tensors travel as ``raw_input_contents`` / ``raw_output_contents``; typed ``contents`` are
accepted on input too (FP16 has no typed field and must come raw), and tensors whose parameters
name a shared-memory region are read from / written to it (``agent.api.shm``), with the
``{System,Cuda}SharedMemory{Register,Unregister,Status}`` calls that manage the regions.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import grpc
import numpy as np

from agent.api._messages import SERVICE_NAME, messages
from agent.api._peer import Peer, peer_of_grpc
from agent.api.codec import (
    InferRequest,
    RequestedOutput,
    RequestError,
    decode_raw_tensor,
    encode_raw_tensor,
    is_bytes_array,
    shape_size,
)
from agent.api.service import ApiStartError, InferenceService, ModelNotReadyError
from agent.api.shm import (
    Kind,
    ShmPlan,
    attach_inputs,
    grpc_params,
    place_outputs,
    tensor_ref,
)
from agent.config import ApiConfig
from agent.contracts.tensors import DTYPES, datatype_of
from agent.errors import InferenceError, InputError, ModelError
from agent.logs import get_logger

__all__ = ["GrpcInferenceServer", "grpc_status_of"]

log = get_logger(__name__)

_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def grpc_status_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, RequestError):
        return {
            401: grpc.StatusCode.UNAUTHENTICATED,
            404: grpc.StatusCode.NOT_FOUND,
            413: grpc.StatusCode.RESOURCE_EXHAUSTED,
        }.get(exc.status_code, grpc.StatusCode.INVALID_ARGUMENT)
    if isinstance(exc, ModelError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, ModelNotReadyError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, InputError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class _Handlers:
    def __init__(self, service: InferenceService, token: str | None) -> None:
        self.service = service
        self.m = messages()
        self._token = f"Bearer {token}" if token else None
        self.port = 0  # set once bound: a TCP peer is found by its connection to this port

    def wrap(
        self, fn: Callable[..., Any], *, with_context: bool = False
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            if self._token is not None:
                sent = dict(context.invocation_metadata()).get("authorization", "")
                if not hmac.compare_digest(str(sent).encode(), self._token.encode()):
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            try:
                return fn(request, context) if with_context else fn(request)
            except (InputError, InferenceError, ModelError) as exc:
                code = grpc_status_of(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.error("grpc_request_failed", error=str(exc))
                context.abort(code, str(exc))
            except Exception as exc:
                log.exception("grpc_handler_crashed")
                context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

        return handler

    def server_live(self, _: Any) -> Any:
        return self.m["ServerLiveResponse"](live=self.service.live())

    def server_ready(self, _: Any) -> Any:
        return self.m["ServerReadyResponse"](ready=self.service.ready())

    def model_ready(self, request: Any) -> Any:
        ready = self.service.model_ready(request.name, request.version or None)
        return self.m["ModelReadyResponse"](ready=ready)

    def server_metadata(self, _: Any) -> Any:
        return self.m["ServerMetadataResponse"](**self.service.server_metadata())

    def model_metadata(self, request: Any) -> Any:
        meta = self.service.model_metadata(request.name, request.version or None)
        tensor = self.m["ModelMetadataResponse"].TensorMetadata
        return self.m["ModelMetadataResponse"](
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    def model_infer(self, request: Any, context: grpc.ServicerContext) -> Any:
        plan = ShmPlan()
        decoded = _decode_infer(request, plan)
        registry = self.service.shared_memory
        peer = self._peer(context) if plan else None
        if peer is not None:
            attach_inputs(registry, peer, decoded, plan)
        response = self.service.infer(decoded)
        placed = place_outputs(registry, peer, response, plan) if peer is not None else []
        out = self.m["ModelInferResponse"](
            model_name=response.model, model_version=response.version, id=response.id or ""
        )
        if response.variant:
            out.parameters["variant"].string_param = response.variant
        for name, array in response.outputs.items():
            tensor = out.outputs.add()
            tensor.name = name
            tensor.datatype = "BYTES" if is_bytes_array(array) else datatype_of(array.dtype)
            tensor.shape.extend(array.shape)
            out.raw_output_contents.append(encode_raw_tensor(array))
        # Outputs in shared memory come after those with raw contents: clients pair
        # raw_output_contents with outputs by position.
        for entry in placed:
            tensor = out.outputs.add()
            tensor.name, tensor.datatype = entry["name"], entry["datatype"]
            tensor.shape.extend(entry["shape"])
            for key, value in entry["parameters"].items():
                if isinstance(value, str):
                    tensor.parameters[key].string_param = value
                else:
                    tensor.parameters[key].int64_param = value
        return out

    # -- shared memory ---------------------------------------------------------------------

    def _peer(self, context: grpc.ServicerContext) -> Peer:
        return peer_of_grpc(context.peer(), self.port)

    def shm_status(self, kind: Kind) -> Callable[[Any, grpc.ServicerContext], Any]:
        prefix = "System" if kind == "system" else "Cuda"
        response_cls = self.m[f"{prefix}SharedMemoryStatusResponse"]

        def status(request: Any, context: grpc.ServicerContext) -> Any:
            out = response_cls()
            for region in self.service.shared_memory.status(
                self._peer(context), kind, request.name or None
            ):
                out.regions[region["name"]].CopyFrom(response_cls.RegionStatus(**region))
            return out

        return status

    def shm_unregister(self, kind: Kind) -> Callable[[Any, grpc.ServicerContext], Any]:
        prefix = "System" if kind == "system" else "Cuda"
        response_cls = self.m[f"{prefix}SharedMemoryUnregisterResponse"]

        def unregister(request: Any, context: grpc.ServicerContext) -> Any:
            self.service.shared_memory.unregister(self._peer(context), kind, request.name or None)
            return response_cls()

        return unregister

    def system_shm_register(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.service.shared_memory.register_system(
            self._peer(context), request.name, request.key, request.offset, request.byte_size
        )
        return self.m["SystemSharedMemoryRegisterResponse"]()

    def cuda_shm_register(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.service.shared_memory.register_cuda(
            self._peer(context),
            request.name,
            bytes(request.raw_handle),
            request.device_id,
            request.byte_size,
        )
        return self.m["CudaSharedMemoryRegisterResponse"]()


def _decode_infer(request: Any, plan: ShmPlan) -> InferRequest:
    """The request, less its shared-memory tensors, which go into ``plan``."""
    raw = request.raw_input_contents
    in_place = [
        tensor_ref(t.name, grpc_params(t.parameters)) if t.parameters else None
        for t in request.inputs
    ]
    carried = sum(ref is None for ref in in_place)
    if raw and len(raw) != carried:
        raise RequestError(
            f"{len(raw)} raw_input_contents for {carried} inputs not in shared memory; "
            "give one per such input or none"
        )
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    index = 0
    for tensor, ref in zip(request.inputs, in_place, strict=True):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if name in inputs or any(name == n for n, *_ in plan.inputs):
            raise RequestError(f"input {name!r} given twice")
        if ref is not None:
            plan.inputs.append((name, datatype, shape, ref))
        elif raw:
            inputs[name] = decode_raw_tensor(name, datatype, shape, raw[index])
            index += 1
        else:
            inputs[name] = _decode_contents(name, datatype, shape, tensor)
    for out in request.outputs:
        ref = tensor_ref(out.name, grpc_params(out.parameters)) if out.parameters else None
        if ref is not None:
            plan.outputs[out.name] = ref
    outputs = tuple(RequestedOutput(o.name, True) for o in request.outputs) or None
    return InferRequest(
        model=request.model_name,
        version=request.model_version or None,
        inputs=inputs,
        outputs=outputs,
        binary_outputs=True,
        id=request.id or None,
    )


def _decode_contents(name: str, datatype: str, shape: list[int], tensor: Any) -> Any:
    if datatype not in DTYPES:
        raise RequestError(f"input {name!r}: unknown datatype {datatype!r}")
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise RequestError(f"input {name!r}: {datatype} must be sent in raw_input_contents")
    values = list(getattr(tensor.contents, field))
    count = shape_size(name, shape)
    if len(values) != count:
        raise RequestError(
            f"input {name!r}: {len(values)} elements where shape {shape} needs {count}"
        )
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = values
        return arr.reshape(shape)
    try:
        return np.asarray(values, dtype=DTYPES[datatype]).reshape(shape)
    except (ValueError, OverflowError) as exc:
        raise RequestError(f"input {name!r}: data does not fit {datatype}: {exc}") from None


class GrpcInferenceServer:
    """A ``grpc.server`` serving ``service`` on ``host:port`` (port 0: any free port)."""

    def __init__(
        self, service: InferenceService, config: ApiConfig, *, port: int, threads: int = 8
    ) -> None:
        limit = config.max_body_bytes
        self._server = grpc.server(
            ThreadPoolExecutor(threads, thread_name_prefix="grpc"),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ],
        )
        h = _Handlers(service, config.token)
        m = h.m

        def unary(
            fn: Callable[..., Any], req: str, resp: str, *, with_context: bool = False
        ) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                h.wrap(fn, with_context=with_context),
                request_deserializer=m[req].FromString,
                response_serializer=m[resp].SerializeToString,
            )

        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE_NAME,
                    {
                        "ServerLive": unary(
                            h.server_live, "ServerLiveRequest", "ServerLiveResponse"
                        ),
                        "ServerReady": unary(
                            h.server_ready, "ServerReadyRequest", "ServerReadyResponse"
                        ),
                        "ModelReady": unary(
                            h.model_ready, "ModelReadyRequest", "ModelReadyResponse"
                        ),
                        "ServerMetadata": unary(
                            h.server_metadata, "ServerMetadataRequest", "ServerMetadataResponse"
                        ),
                        "ModelMetadata": unary(
                            h.model_metadata, "ModelMetadataRequest", "ModelMetadataResponse"
                        ),
                        "ModelInfer": unary(
                            h.model_infer,
                            "ModelInferRequest",
                            "ModelInferResponse",
                            with_context=True,
                        ),
                        **{
                            f"{p}SharedMemory{call}": unary(
                                fn,
                                f"{p}SharedMemory{call}Request",
                                f"{p}SharedMemory{call}Response",
                                with_context=True,
                            )
                            for p, kind in (("System", "system"), ("Cuda", "cuda"))
                            for call, fn in (
                                ("Status", h.shm_status(cast(Kind, kind))),
                                ("Unregister", h.shm_unregister(cast(Kind, kind))),
                                (
                                    "Register",
                                    h.system_shm_register
                                    if kind == "system"
                                    else h.cuda_shm_register,
                                ),
                            )
                        },
                    },
                ),
            )
        )
        address = f"[{config.host}]:{port}" if ":" in config.host else f"{config.host}:{port}"
        try:
            bound = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ApiStartError(f"cannot listen for gRPC on {address}: {exc}") from exc
        if bound == 0:
            raise ApiStartError(f"cannot listen for gRPC on {address}")
        self.port = h.port = bound

    def start(self) -> None:
        self._server.start()

    def stop(self, grace_s: float = 2.0) -> None:
        self._server.stop(grace_s).wait()
