"""The shared-memory extensions of the Open Inference Protocol, as Triton defines them.

Owns the registered regions, system (a POSIX shared-memory object, ``/dev/shm/<key>``, mapped
into the agent) and CUDA (device memory opened from a client's CUDA IPC handle), and everything
that checks them: which client owns a region, the bounds on how many and how large, and that every
tensor read or written through a region lies inside it. Inputs in a system region are read in
place (a numpy view on the mapping); outputs are written into the region. Wire formats are left to
``agent.api.codec``, transports to ``http_server`` / ``grpc_server``, client identity to
``agent.api._peer``.

Ownership: a region belongs to the uid of the process that registered it (the Unix-socket peer's
``SO_PEERCRED`` uid, or for TCP the uid that owns the client's end of the connection on this
host). Only that uid sees it in a status, uses it in a request, or unregisters it; for any other
client it does not exist (404). Processes of one uid are one client: they can read each other's
``/dev/shm`` objects anyway. A client from another host cannot use shared memory at all. The
object behind a key must be a regular file in ``/dev/shm`` owned by the registering uid (root
may register any).

The extension's parameters on the wire (taking shared-memory tensors out of an HTTP body before
``agent.api.codec`` decodes the rest, and the response entries of outputs written to a region)
are here too, shared by both transports.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import itertools
import json
import mmap
import os
import re
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from pydantic import ValidationError as PydanticValidationError

from agent.api._peer import Peer
from agent.api.codec import (
    InferRequest,
    InferResponse,
    RequestError,
    decode_raw_tensor,
    encode_raw_tensor,
    is_bytes_array,
)
from agent.contracts.tensors import datatype_of
from agent.errors import AgentError
from agent.logs import get_logger

__all__ = [
    "SHM_DIR",
    "SHM_PARAMETERS",
    "CudaRegisterBody",
    "Kind",
    "SharedMemoryRegistry",
    "ShmPlan",
    "SystemRegisterBody",
    "TensorRef",
    "attach_inputs",
    "check_span",
    "cuda_unusable",
    "grpc_params",
    "merge_http_response",
    "parse_body",
    "place_outputs",
    "split_http_request",
    "tensor_ref",
]

log = get_logger(__name__)

Array = np.ndarray[Any, Any]
Kind = Literal["system", "cuda"]
SHM_DIR = Path("/dev/shm")  # noqa: S108 - where shm_open() objects live, not a temp file
SHM_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
CUDA_IPC_HANDLE_BYTES = 64
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_KEY = re.compile(r"^/?([A-Za-z0-9_.-]{1,255})$")
_U64 = 2**64 - 1


class TensorRef(NamedTuple):
    """Where a tensor lies: ``byte_size`` bytes at ``offset`` in region ``region``."""

    region: str
    offset: int
    byte_size: int


class SystemRegisterBody(BaseModel):
    """``POST /v2/systemsharedmemory/region/{name}/register``."""

    model_config = ConfigDict(extra="forbid")

    key: StrictStr
    offset: StrictInt = Field(default=0, ge=0, le=_U64)
    byte_size: StrictInt = Field(ge=1, le=_U64)


class _B64(BaseModel):
    model_config = ConfigDict(extra="forbid")

    b64: StrictStr


class CudaRegisterBody(BaseModel):
    """``POST /v2/cudasharedmemory/region/{name}/register``."""

    model_config = ConfigDict(extra="forbid")

    raw_handle: _B64
    device_id: StrictInt = Field(ge=0, le=1024)
    byte_size: StrictInt = Field(ge=1, le=_U64)

    def handle(self) -> bytes:
        try:
            return base64.b64decode(self.raw_handle.b64, validate=True)
        except ValueError:
            raise RequestError("raw_handle.b64 is not base64") from None


def parse_body(model: type[BaseModel], body: bytes) -> Any:
    """A register request's JSON body, or a 400 naming the first problem."""
    try:
        return model.model_validate_json(body or b"{}")
    except PydanticValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        raise RequestError(f"malformed register request: {where}: {err['msg']}") from None


def _int_param(tensor: str, key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > _U64:
        raise RequestError(f"{tensor!r}: {key} must be a non-negative integer")
    return value


def tensor_ref(tensor: str, params: Mapping[str, Any]) -> TensorRef | None:
    """The shared-memory placement a tensor's parameters ask for, or None when they name none.
    ``shared_memory_region`` and ``shared_memory_byte_size`` go together; the offset defaults
    to 0."""
    region = params.get("shared_memory_region")
    size = params.get("shared_memory_byte_size")
    offset = params.get("shared_memory_offset")
    if region is None and size is None:
        if offset is not None:
            raise RequestError(f"{tensor!r}: shared_memory_offset without shared_memory_region")
        return None
    if region is None or size is None:
        raise RequestError(
            f"{tensor!r}: shared_memory_region and shared_memory_byte_size must both be given"
        )
    if not isinstance(region, str) or not region:
        raise RequestError(f"{tensor!r}: shared_memory_region must be a region name")
    return TensorRef(
        region,
        _int_param(tensor, "shared_memory_offset", 0 if offset is None else offset),
        _int_param(tensor, "shared_memory_byte_size", size),
    )


def check_span(tensor: str, ref: TensorRef, region_bytes: int) -> None:
    """Raise a 400 unless ``ref``'s bytes lie inside a region of ``region_bytes`` bytes."""
    if ref.offset < 0 or ref.byte_size < 0:
        raise RequestError(f"{tensor!r}: negative offset or size in region {ref.region!r}")
    if ref.offset > region_bytes:
        raise RequestError(
            f"{tensor!r}: offset {ref.offset} is past the end of region {ref.region!r} "
            f"({region_bytes} bytes)"
        )
    if ref.byte_size > region_bytes - ref.offset:
        raise RequestError(
            f"{tensor!r}: {ref.byte_size} bytes at offset {ref.offset} run past the end of "
            f"region {ref.region!r} ({region_bytes} bytes)"
        )


def _region_name(name: str) -> str:
    if not _NAME.match(name):
        raise RequestError(
            f"region name {name[:64]!r} must be 1-128 letters, digits or '_.:-'", status_code=400
        )
    return name


# --- regions ---------------------------------------------------------------------------------


@dataclass(eq=False)
class _SystemRegion:
    name: str
    owner: str
    key: str
    offset: int  # where the region starts in the object
    byte_size: int
    writable: bool
    mapping: mmap.mmap
    delta: int  # where the region starts in the mapping (the mapping starts page-aligned)
    kind: Kind = "system"

    def span(self, tensor: str, ref: TensorRef, nbytes: int) -> memoryview:
        check_span(tensor, ref._replace(byte_size=nbytes), self.byte_size)
        # A client can shrink its object after registering; touching a page past its end would
        # kill the agent with SIGBUS, so every use checks the object's size first.
        if self.mapping.size() < self.offset + self.byte_size:
            raise RequestError(
                f"{tensor!r}: the memory object {self.key!r} behind region {self.name!r} has "
                f"shrunk below the registered {self.offset + self.byte_size} bytes"
            )
        start = self.delta + ref.offset
        return memoryview(self.mapping)[start : start + nbytes]

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }

    def close(self) -> None:
        # Arrays of requests still running keep the mapping alive; it is unmapped when the last
        # of them is gone.
        with contextlib.suppress(BufferError):
            self.mapping.close()


@dataclass(eq=False)
class _CudaRegion:
    name: str
    owner: str
    device_id: int
    byte_size: int
    ptr: int  # the device address cudaIpcOpenMemHandle gave
    kind: Kind = "cuda"
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "device_id": self.device_id, "byte_size": self.byte_size}

    def read(self, tensor: str, ref: TensorRef, datatype: str, shape: list[int]) -> Array:
        check_span(tensor, ref, self.byte_size)
        host = np.empty(ref.byte_size, dtype=np.uint8)
        if ref.byte_size:
            with self.lock:
                self._live(tensor)
                _cuda_copy(
                    int(host.ctypes.data),
                    self.ptr + ref.offset,
                    ref.byte_size,
                    "cudaMemcpyDeviceToHost",
                    self.device_id,
                )
        return decode_raw_tensor(tensor, datatype, shape, host.data)

    def write(self, tensor: str, ref: TensorRef, data: Array) -> None:
        check_span(tensor, ref._replace(byte_size=data.nbytes), self.byte_size)
        if data.nbytes:
            with self.lock:
                self._live(tensor)
                _cuda_copy(
                    self.ptr + ref.offset,
                    int(data.ctypes.data),
                    data.nbytes,
                    "cudaMemcpyHostToDevice",
                    self.device_id,
                )

    def _live(self, tensor: str) -> None:
        if self.closed:
            raise RequestError(
                f"{tensor!r}: region {self.name!r} was unregistered", status_code=404
            )

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                _cuda_close(self.ptr, self.device_id)


_Region = _SystemRegion | _CudaRegion


# --- CUDA ------------------------------------------------------------------------------------


def cuda_unusable() -> str | None:
    """Why CUDA shared memory cannot be served here, or None when it can."""
    try:
        from agent import cuda

        if cuda.device_count() < 1:
            return "no CUDA device"
        _driver()
    except AgentError as exc:
        return str(exc)
    except ImportError as exc:
        return f"cuda-python's driver bindings are missing: {exc}"
    return None


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError:
        from cuda import cuda as driver  # cuda-python < 12.6
    return driver


def _cuda_open(handle: bytes, device_id: int, byte_size: int) -> int:
    from agent import cuda

    rt = cuda.cudart()
    if device_id >= cuda.device_count():
        raise RequestError(f"no CUDA device {device_id} here ({cuda.device_count()} found)")
    ipc = rt.cudaIpcMemHandle_t()
    ctypes.memmove(ipc.getPtr(), handle, CUDA_IPC_HANDLE_BYTES)
    with cuda.CAPTURE_GATE.shared():
        cuda.call("cudaSetDevice", device_id)
        try:
            ptr = int(cuda.call("cudaIpcOpenMemHandle", ipc, rt.cudaIpcMemLazyEnablePeerAccess))
        except AgentError as exc:
            raise RequestError(f"cannot open the CUDA IPC handle: {exc}") from None
        # The handle names a whole allocation: its true size bounds the region, so a client
        # cannot make the agent touch device memory past its allocation.
        driver = _driver()
        err, base, size = driver.cuMemGetAddressRange(ptr)
        if err != driver.CUresult.CUDA_SUCCESS:
            cuda.call("cudaIpcCloseMemHandle", ptr)
            raise RequestError(f"cannot read the size of the CUDA allocation: {err}")
        available = int(size) - (ptr - int(base))
        if byte_size > available:
            cuda.call("cudaIpcCloseMemHandle", ptr)
            raise RequestError(
                f"byte_size {byte_size} is larger than the CUDA allocation ({available} bytes)"
            )
    return ptr


def _cuda_close(ptr: int, device_id: int) -> None:
    from agent import cuda

    with cuda.CAPTURE_GATE.shared(), contextlib.suppress(AgentError):
        cuda.call("cudaSetDevice", device_id)
        cuda.call("cudaIpcCloseMemHandle", ptr)


def _cuda_copy(dst: int, src: int, nbytes: int, kind: str, device_id: int) -> None:
    from agent import cuda

    rt = cuda.cudart()
    with cuda.CAPTURE_GATE.shared():
        cuda.call("cudaSetDevice", device_id)
        cuda.call("cudaMemcpy", dst, src, nbytes, getattr(rt.cudaMemcpyKind, kind))


# --- the registry ----------------------------------------------------------------------------


class SharedMemoryRegistry:
    """Every registered region, by name (one namespace for system and CUDA regions, as in
    Triton); thread-safe. Bounds are over all clients together."""

    def __init__(
        self,
        *,
        max_regions: int = 64,
        max_bytes: int = 1 << 30,
        shm_dir: Path = SHM_DIR,
        enabled: bool = True,
    ) -> None:
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.shm_dir = shm_dir
        self.enabled = enabled
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()
        self._cuda_reason: str | None = None
        self._cuda_probed = False

    # -- what is served ------------------------------------------------------------------

    def extensions(self) -> list[str]:
        if not self.enabled:
            return []
        return ["system_shared_memory"] + (["cuda_shared_memory"] if self.cuda_usable() else [])

    def cuda_usable(self) -> bool:
        if not self._cuda_probed:
            self._cuda_reason = cuda_unusable()
            self._cuda_probed = True
            if self._cuda_reason is not None:
                log.info("cuda_shared_memory_unavailable", reason=self._cuda_reason)
        return self._cuda_reason is None

    def _owner(self, peer: Peer) -> str:
        if not self.enabled:
            raise RequestError("the shared-memory extensions are disabled on this agent")
        owner = peer.owner
        if owner is None:
            raise RequestError(f"shared memory needs a client process on this host ({peer.how})")
        return owner

    # -- register, unregister, status ----------------------------------------------------

    def register_system(self, peer: Peer, name: str, key: str, offset: int, byte_size: int) -> None:
        owner = self._owner(peer)
        _region_name(name)
        match = _KEY.match(key)
        if match is None or match.group(1) in (".", ".."):
            raise RequestError(
                f"key {key[:64]!r} must name an object in {self.shm_dir} "
                "(an optional '/' then letters, digits, '_.-')"
            )
        if byte_size < 1 or offset < 0:
            raise RequestError(f"region {name!r}: byte_size must be >= 1 and offset >= 0")
        path = self.shm_dir / match.group(1)
        with self._lock:
            self._admit(name, byte_size)
            region = self._map(peer, name, key, path=path, offset=offset, byte_size=byte_size)
            self._regions[name] = region
        log.info(
            "shm_registered", region=name, kind="system", owner=owner, key=key, byte_size=byte_size
        )

    def register_cuda(
        self, peer: Peer, name: str, handle: bytes, device_id: int, byte_size: int
    ) -> None:
        owner = self._owner(peer)
        _region_name(name)
        if not self.cuda_usable():
            raise RequestError(f"CUDA shared memory is not available here: {self._cuda_reason}")
        if len(handle) != CUDA_IPC_HANDLE_BYTES:
            raise RequestError(
                f"raw_handle is {len(handle)} bytes; a CUDA IPC handle is {CUDA_IPC_HANDLE_BYTES}"
            )
        if byte_size < 1 or device_id < 0:
            raise RequestError(f"region {name!r}: byte_size must be >= 1, device_id >= 0")
        with self._lock:
            self._admit(name, byte_size)
            ptr = _cuda_open(handle, device_id, byte_size)
            self._regions[name] = _CudaRegion(name, owner, device_id, byte_size, ptr)
        log.info(
            "shm_registered",
            region=name,
            kind="cuda",
            owner=owner,
            device=device_id,
            byte_size=byte_size,
        )

    def _admit(self, name: str, byte_size: int) -> None:
        """Under the lock: the name is free and the bounds leave room."""
        if name in self._regions:
            raise RequestError(f"shared memory region {name!r} is already registered")
        if len(self._regions) >= self.max_regions:
            raise RequestError(
                f"{self.max_regions} shared memory regions are registered already (the limit)"
            )
        used = sum(r.byte_size for r in self._regions.values())
        if byte_size > self.max_bytes - used:
            raise RequestError(
                f"region {name!r}: {byte_size} bytes would take the registered total over the "
                f"{self.max_bytes}-byte limit ({used} in use)"
            )

    def _map(
        self, peer: Peer, name: str, key: str, *, path: Path, offset: int, byte_size: int
    ) -> _SystemRegion:
        writable = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except PermissionError:
            writable = False
            fd = _open_readonly(path, key)
        except FileNotFoundError:
            raise RequestError(f"no shared memory object {key!r} in {self.shm_dir}") from None
        except OSError as exc:
            raise RequestError(
                f"cannot open shared memory object {key!r}: {exc.strerror}"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise RequestError(f"{key!r} is not a shared memory object")
            if peer.uid not in (0, info.st_uid):
                raise RequestError(
                    f"shared memory object {key!r} belongs to uid {info.st_uid}, not to the "
                    f"client (uid {peer.uid})"
                )
            if offset > info.st_size or byte_size > info.st_size - offset:
                raise RequestError(
                    f"region {name!r}: {byte_size} bytes at offset {offset} run past the end of "
                    f"{key!r} ({info.st_size} bytes)"
                )
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mapping = mmap.mmap(
                fd, offset - start + byte_size, flags=mmap.MAP_SHARED, prot=prot, offset=start
            )
        except OSError as exc:
            raise RequestError(f"cannot map shared memory object {key!r}: {exc}") from None
        finally:
            os.close(fd)
        owner = self._owner(peer)
        return _SystemRegion(name, owner, key, offset, byte_size, writable, mapping, offset - start)

    def unregister(self, peer: Peer, kind: Kind, name: str | None = None) -> list[str]:
        """Unregister the caller's region ``name`` (404 if it has none), or all of its regions of
        ``kind``; returns the names."""
        owner = self._owner(peer)
        with self._lock:
            if name:
                gone = [self._own(owner, kind, name)]
            else:
                gone = [r for r in self._regions.values() if r.owner == owner and r.kind == kind]
            for region in gone:
                del self._regions[region.name]
        for region in gone:
            region.close()
        if gone:
            log.info("shm_unregistered", regions=[r.name for r in gone], kind=kind, owner=owner)
        return [r.name for r in gone]

    def status(self, peer: Peer, kind: Kind, name: str | None = None) -> list[dict[str, Any]]:
        owner = self._owner(peer)
        with self._lock:
            if name:
                return [self._own(owner, kind, name).status()]
            return [
                r.status() for r in self._regions.values() if r.owner == owner and r.kind == kind
            ]

    def _own(self, owner: str, kind: Kind | None, name: str, tensor: str | None = None) -> _Region:
        region = self._regions.get(name)
        # Another client's region does not exist for this one: the same 404 as an unknown name.
        if region is None or region.owner != owner or (kind is not None and region.kind != kind):
            what = f"{tensor!r}: " if tensor else ""
            kind_text = f"{kind} " if kind else ""
            raise RequestError(
                f"{what}no {kind_text}shared memory region {name!r} registered by this client",
                status_code=404,
            )
        return region

    # -- tensors -------------------------------------------------------------------------

    def read_input(
        self, peer: Peer, tensor: str, datatype: str, shape: list[int], ref: TensorRef
    ) -> Array:
        """Input ``tensor`` from its region: a view on the mapping for system regions (no copy),
        a host copy for CUDA ones. ``ref.byte_size`` must be exactly the tensor's size."""
        owner = self._owner(peer)
        with self._lock:
            region = self._own(owner, None, ref.region, tensor)
        if isinstance(region, _CudaRegion):
            return region.read(tensor, ref, datatype, shape)
        view = region.span(tensor, ref, ref.byte_size)
        return decode_raw_tensor(tensor, datatype, shape, view)

    def check_outputs(self, peer: Peer, refs: Mapping[str, TensorRef]) -> None:
        """Before a run: every output region is the caller's, writable, and the spans lie inside
        their regions without overlapping each other."""
        if not refs:
            return
        owner = self._owner(peer)
        spans: dict[str, list[tuple[int, int, str]]] = {}
        with self._lock:
            for tensor, ref in refs.items():
                region = self._own(owner, None, ref.region, tensor)
                check_span(tensor, ref, region.byte_size)
                if isinstance(region, _SystemRegion) and not region.writable:
                    raise RequestError(
                        f"{tensor!r}: region {ref.region!r} is read-only to the agent "
                        f"(it cannot open {region.key!r} for writing)"
                    )
                spans.setdefault(ref.region, []).append(
                    (ref.offset, ref.offset + ref.byte_size, tensor)
                )
        for region_name, items in spans.items():
            items.sort()
            for (_, end, first), (start, _, second) in itertools.pairwise(items):
                if start < end:
                    raise RequestError(
                        f"outputs {first!r} and {second!r} overlap in region {region_name!r}"
                    )

    def write_output(self, peer: Peer, tensor: str, ref: TensorRef, array: Array) -> int:
        """Write output ``tensor`` into its region; returns the bytes written (at most
        ``ref.byte_size``)."""
        owner = self._owner(peer)
        with self._lock:
            region = self._own(owner, None, ref.region, tensor)
        if is_bytes_array(array):
            data: Array = np.frombuffer(encode_raw_tensor(array), dtype=np.uint8)
        else:
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        if data.nbytes > ref.byte_size:
            raise RequestError(
                f"{tensor!r}: the output is {data.nbytes} bytes; shared_memory_byte_size gives "
                f"only {ref.byte_size}"
            )
        if isinstance(region, _CudaRegion):
            region.write(tensor, ref, data)
        else:
            view = region.span(tensor, ref, data.nbytes)
            np.frombuffer(view, dtype=np.uint8)[:] = data.reshape(-1).view(np.uint8)
        return int(data.nbytes)

    def close(self) -> None:
        with self._lock:
            regions = list(self._regions.values())
            self._regions.clear()
        for region in regions:
            region.close()


def _open_readonly(path: Path, key: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise RequestError(f"cannot open shared memory object {key!r}: {exc.strerror}") from None


# --- the extension on the wire ----------------------------------------------------------------


class _ShmTensor(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    datatype: StrictStr
    shape: list[StrictInt] = Field(max_length=16)


@dataclass(slots=True)
class ShmPlan:
    """The tensors of one request that live in shared memory."""

    inputs: list[tuple[str, str, list[int], TensorRef]] = field(default_factory=list)
    outputs: dict[str, TensorRef] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.inputs or self.outputs)


def split_http_request(
    body: bytes, header_length: str | None
) -> tuple[bytes, str | None, ShmPlan] | None:
    """Take the shared-memory tensors out of an HTTP inference body: the body and
    ``Inference-Header-Content-Length`` left for ``codec.decode_http_request`` (same binary
    tail), and the plan; None when the body names no shared memory (or is malformed: the codec
    reports that)."""
    try:
        json_len = int(header_length) if header_length is not None else len(body)
    except ValueError:
        return None
    if not 0 <= json_len <= len(body):
        return None
    head = body[:json_len]
    if b"shared_memory_" not in head:
        return None
    try:
        doc = json.loads(head)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    plan = ShmPlan()
    inputs = doc.get("inputs")
    if isinstance(inputs, list):
        kept = []
        for item in inputs:
            params = item.get("parameters") if isinstance(item, dict) else None
            if not isinstance(params, dict):
                kept.append(item)
                continue
            ref = tensor_ref(str(item.get("name")), params)
            if ref is None:
                kept.append(item)
                continue
            try:
                tensor = _ShmTensor.model_validate(item)
            except PydanticValidationError as exc:
                raise RequestError(
                    f"malformed shared-memory input: {exc.errors()[0]['msg']}"
                ) from None
            if item.get("data") is not None or "binary_data_size" in params:
                raise RequestError(f"input {tensor.name!r} has both shared memory and data")
            plan.inputs.append((tensor.name, tensor.datatype, tensor.shape, ref))
        doc["inputs"] = kept
    outputs = doc.get("outputs")
    if isinstance(outputs, list):
        for item in outputs:
            params = item.get("parameters") if isinstance(item, dict) else None
            ref = tensor_ref(str(item.get("name")), params) if isinstance(params, dict) else None
            if ref is not None and isinstance(params, dict):
                if str(item["name"]) in plan.outputs:
                    raise RequestError(f"output {item['name']!r} requested twice")
                plan.outputs[str(item["name"])] = ref
                for key in SHM_PARAMETERS:
                    params.pop(key, None)
                params.pop("binary_data", None)
    if not plan:
        return None
    new_head = json.dumps(doc, separators=(",", ":")).encode()
    if header_length is None:
        return new_head, None, plan
    return new_head + body[json_len:], str(len(new_head)), plan


def attach_inputs(
    registry: SharedMemoryRegistry, peer: Peer, request: InferRequest, plan: ShmPlan
) -> None:
    """Add the plan's inputs to ``request`` (read from their regions) and check its outputs'
    regions before anything runs."""
    for name, datatype, shape, ref in plan.inputs:
        if name in request.inputs:
            raise RequestError(f"input {name!r} given twice")
        request.inputs[name] = registry.read_input(peer, name, datatype, shape, ref)
    registry.check_outputs(peer, plan.outputs)


def place_outputs(
    registry: SharedMemoryRegistry, peer: Peer, response: InferResponse, plan: ShmPlan
) -> list[dict[str, Any]]:
    """Write the plan's outputs into their regions and take them out of ``response``; returns
    their response entries (name, datatype, shape and the shared-memory parameters)."""
    placed: list[dict[str, Any]] = []
    for name, ref in plan.outputs.items():
        array = response.outputs.pop(name, None)
        if array is None:
            continue
        response.binary.pop(name, None)
        written = registry.write_output(peer, name, ref, array)
        params: dict[str, Any] = {
            "shared_memory_region": ref.region,
            "shared_memory_byte_size": written,
        }
        if ref.offset:
            params["shared_memory_offset"] = ref.offset
        placed.append(
            {
                "name": name,
                "datatype": "BYTES" if is_bytes_array(array) else datatype_of(array.dtype),
                "shape": list(array.shape),
                "parameters": params,
            }
        )
    return placed


def merge_http_response(
    payload: bytes, json_len: int | None, placed: list[dict[str, Any]]
) -> tuple[bytes, int | None]:
    """An encoded HTTP response with the shared-memory outputs' entries added to its JSON."""
    if not placed:
        return payload, json_len
    end = len(payload) if json_len is None else json_len
    doc = json.loads(payload[:end])
    doc["outputs"] = [*doc.get("outputs", []), *placed]
    head = json.dumps(doc, separators=(",", ":")).encode()
    if json_len is None:
        return head, None
    return head + payload[end:], len(head)


def grpc_params(parameters: Any) -> dict[str, Any]:
    """A protobuf ``map<string, InferParameter>`` as plain values."""
    out: dict[str, Any] = {}
    for key, param in parameters.items():
        which = param.WhichOneof("parameter_choice")
        out[key] = None if which is None else getattr(param, which)
    return out
