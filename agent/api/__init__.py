"""The agent's local inference API: the Open Inference Protocol (KServe v2) over HTTP and gRPC.

Other processes on the robot (and existing Triton/KServe clients, unchanged) call the agent's models
through it instead of loading their own copies. It serves whatever a
``agent.models.serving.ModelRepository`` holds; loading, version policy and swaps belong to the
model slots. Start it with ``start_api(repository, config.api, metrics_registry)``.

    codec        wire formats (JSON, binary tensor extension, raw tensors), pure
    batching     dynamic batching: the pure plan and the per-model worker
    service      transport-independent core: lookup, checks, batching, metrics
    http_server  HTTP/REST binding (ASGI, served by uvicorn), /metrics
    grpc_server  gRPC binding (inference.GRPCInferenceService)
    shm          shared-memory extensions: system (/dev/shm) and CUDA IPC regions
    metrics      Triton-named Prometheus counters
    server       start_api / ApiServer
"""

from agent.api.batching import Batcher, BatchPolicy, plan_batch
from agent.api.codec import InferRequest, InferResponse, RequestedOutput, RequestError
from agent.api.metrics import InferenceMetrics
from agent.api.server import ApiServer, start_api
from agent.api.service import ApiStartError, InferenceService, ModelNotReadyError

__all__ = [
    "ApiServer",
    "ApiStartError",
    "BatchPolicy",
    "Batcher",
    "InferRequest",
    "InferResponse",
    "InferenceMetrics",
    "InferenceService",
    "ModelNotReadyError",
    "RequestError",
    "RequestedOutput",
    "plan_batch",
    "start_api",
]
