"""The agent's configuration: one pydantic-settings object, read from a TOML file and
``EDGE_AGENT__SECTION__FIELD`` environment variables (the environment wins).

It owns the schema and its defaults; each subsystem reads its own section. Sizes and times carry
their unit in the field name.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent.contracts.profile import Pins
from agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

__all__ = [
    "AgentSettings",
    "ApiConfig",
    "BackendConfig",
    "BatchingConfig",
    "CallbackSourceConfig",
    "ControlPlaneConfig",
    "DbBoxesPostprocessConfig",
    "GstreamerSourceConfig",
    "HardwareConfig",
    "ImagesSourceConfig",
    "JsonlSinkConfig",
    "LoopConfig",
    "ModelConfig",
    "MqttConfig",
    "MqttSinkConfig",
    "PluginPostprocessConfig",
    "PostprocessConfig",
    "RawPostprocessConfig",
    "Ros2SinkConfig",
    "Ros2SourceConfig",
    "RosbagSourceConfig",
    "SinkConfig",
    "SourceConfig",
    "SwapConfig",
    "SyntheticSourceConfig",
    "TopkPostprocessConfig",
    "UrlSourceConfig",
    "V4l2SourceConfig",
    "VideoSourceConfig",
    "load_settings",
]

BackendName = Literal["onnxruntime", "openvino", "tensorrt"]
_ROS_TOPIC = r"^/?[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$"  # a ROS 2 topic name
DEFAULT_STATE_DIR = Path(os.environ.get("STATE_DIRECTORY", "/var/lib/edge-agent"))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendConfig(_Section):
    """Which runtimes to try and how; an empty ``order`` means every installed one."""

    order: tuple[BackendName, ...] = ("tensorrt", "onnxruntime", "openvino")
    pin_backend: BackendName | None = None
    pin_precision: Literal["fp32", "fp16", "int8", "int4"] | None = None
    intra_op_threads: int | None = Field(default=None, ge=1)
    openvino_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"
    openvino_device: str = "AUTO"
    # "gated": an fp16/int4 OpenVINO variant computes in the CPU's reduced float type (bf16, f16)
    # only where its accuracy gate accepted that type, else in f32; "device": always in the
    # CPU's own type (for a fleet whose build host cannot measure it: f16 on ARM robots).
    openvino_reduced_float: Literal["gated", "device"] = "gated"
    # ONNX Runtime provider options by provider name, e.g. {"CUDAExecutionProvider": {...}}.
    ort_provider_options: dict[str, dict[str, str]] = Field(default_factory=dict)
    ort_disable_providers: tuple[str, ...] = ()
    spin_wait: bool = False  # idle runtime threads spin between runs (see LoadOptions)
    # ONNX Runtime sessions in worker processes: "gpu" (sessions on a device provider),
    # "always" or "never" (see LoadOptions.ort_process and docs/gpu.md).
    ort_process: Literal["gpu", "always", "never"] = "gpu"
    # Keep one retired worker (and its CUDA context) for the next load (see docs/gpu.md).
    ort_spare_worker: bool = True
    # A retired worker releases its model this long after the switch (see docs/gpu.md).
    ort_release_delay_s: float = Field(default=0.3, ge=0, le=10)
    choice_budget_s: float = Field(default=20.0, gt=0)
    choice_tolerance: float = Field(default=0.10, ge=0)  # fastest within 10% wins ties by accuracy
    # The daemon measures the fitting variants of a new version (at most ``max_candidates``, best
    # first by the variant contract) before it serves one; off: the contract's first serves.
    measure: bool = True
    max_candidates: int = Field(default=4, ge=1, le=8)

    def pins(self) -> Pins:
        """The pins as the variant contract takes them (and the control plane is told)."""
        return Pins(backend=self.pin_backend, precision=self.pin_precision)


class _SourceSection(_Section):
    """Fields every ``[loop.source]`` kind shares (none yet beyond ``kind``)."""


class SyntheticSourceConfig(_SourceSection):
    """The same random tensors every read, shaped from the model's inputs."""

    kind: Literal["synthetic"] = "synthetic"


class _StreamSection(_SourceSection):
    """A live stream read by a grab thread that keeps only the newest frame; a dropped stream
    is reopened with exponential backoff from ``reconnect_min_s`` to ``reconnect_max_s``."""

    reconnect_min_s: float = Field(default=0.5, gt=0, le=60)
    reconnect_max_s: float = Field(default=10.0, gt=0, le=600)
    # A stream that delivers no new frame for this long is treated as dropped and reopened.
    stall_timeout_s: float = Field(default=5.0, gt=0, le=600)

    @model_validator(mode="after")
    def _backoff_order(self) -> _StreamSection:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self


class V4l2SourceConfig(_StreamSection):
    """A V4L2 camera by device path (``/dev/video0``) or index, with optional capture format."""

    kind: Literal["v4l2"]
    device: int | str = 0
    width: int | None = Field(default=None, ge=1, le=16384)
    height: int | None = Field(default=None, ge=1, le=16384)
    fps: float | None = Field(default=None, gt=0, le=1000)
    fourcc: str | None = Field(default=None, pattern=r"^[A-Za-z0-9 ]{4}$")  # MJPG, YUYV, ...

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 0:
                raise ValueError("device index must be >= 0")
            return value
        if not re.fullmatch(r"/dev/[A-Za-z0-9._/-]{1,200}", value):
            raise ValueError("device must be an index or a path under /dev, e.g. /dev/video0")
        return value


class GstreamerSourceConfig(_StreamSection):
    """A GStreamer pipeline string ending in an ``appsink`` (needs OpenCV built with GStreamer,
    as on JetPack)."""

    kind: Literal["gstreamer"]
    pipeline: str = Field(min_length=1, max_length=4096)

    @field_validator("pipeline")
    @classmethod
    def _ends_in_appsink(cls, value: str) -> str:
        if "appsink" not in value:
            raise ValueError("a GStreamer pipeline for the loop must end in an appsink element")
        return value


class UrlSourceConfig(_StreamSection):
    """A network stream: ``rtsp://``, ``rtsps://``, ``http://`` or ``https://`` (MJPEG, HLS,
    ...), opened through OpenCV's FFmpeg backend."""

    kind: Literal["url"]
    url: str = Field(max_length=2048, pattern=r"^(rtsp|rtsps|http|https)://[^\s]+$")


class VideoSourceConfig(_SourceSection):
    """A video file; ``repeat`` unset: the daemon rewinds at the end, ``edge-agent run`` stops."""

    kind: Literal["video"]
    path: Path
    repeat: bool | None = None


class ImagesSourceConfig(_SourceSection):
    """Every image of a folder in name order; ``repeat`` as for video files."""

    kind: Literal["images"]
    path: Path
    repeat: bool | None = None


class Ros2SourceConfig(_SourceSection):
    """A ROS 2 image topic over DDS (``agent.ros2``): ``sensor_msgs/Image`` or
    ``CompressedImage``, read with ROS 2's sensor-data QoS keeping the newest ``qos_depth``;
    ``domain_id`` unset: ``ROS_DOMAIN_ID`` from the environment, else 0."""

    kind: Literal["ros2"]
    topic: str = Field(max_length=200, pattern=_ROS_TOPIC)
    message: Literal["Image", "CompressedImage"] = "Image"
    domain_id: int | None = Field(default=None, ge=0, le=232)
    qos_depth: int = Field(default=5, ge=1, le=1000)
    # How long a read waits for a new image before it counts as a failed frame.
    wait_s: float = Field(default=0.5, gt=0, le=60)


class RosbagSourceConfig(_SourceSection):
    """The images of one topic of a rosbag2 (directory or file), replayed at the recorded pace
    (gaps cut to ``max_gap_s``) or as fast as the loop reads; ``repeat`` as for video files."""

    kind: Literal["rosbag"]
    path: Path
    topic: str = Field(max_length=200, pattern=_ROS_TOPIC)
    rate: Literal["recorded", "max"] = "recorded"
    max_gap_s: float = Field(default=1.0, gt=0, le=3600)
    repeat: bool | None = None


class CallbackSourceConfig(_SourceSection):
    """Frames from an in-process function (``agent.loop.CallbackSource``): library use only."""

    kind: Literal["callback"]


SourceConfig = Annotated[
    SyntheticSourceConfig
    | V4l2SourceConfig
    | GstreamerSourceConfig
    | UrlSourceConfig
    | VideoSourceConfig
    | ImagesSourceConfig
    | Ros2SourceConfig
    | RosbagSourceConfig
    | CallbackSourceConfig,
    Field(discriminator="kind"),
]


class RawPostprocessConfig(_Section):
    """Every output as a digest (shape, argmax, max): the default, and the older sink lines."""

    kind: Literal["raw"] = "raw"


class TopkPostprocessConfig(_Section):
    """Classification: the ``k`` best classes of ``output`` (default: the first output) with
    probabilities; ``softmax = "auto"`` applies it unless the scores already sum to 1.
    ``labels`` name the classes by index (its length must match the output's class count)."""

    kind: Literal["topk"]
    k: int = Field(default=5, ge=1, le=1000)
    labels: tuple[Annotated[str, Field(max_length=256)], ...] | None = Field(
        default=None, min_length=1, max_length=100_000
    )
    output: str | None = Field(default=None, max_length=256)
    softmax: Literal["auto", "always", "never"] = "auto"


class DbBoxesPostprocessConfig(_Section):
    """Detection: DB decoding (PP-OCR's text detector head) of the probability map ``output``
    into boxes, ``agent.contracts.accuracy.db_boxes`` with these settings; ``label`` names the
    one class."""

    kind: Literal["db_boxes"]
    output: str | None = Field(default=None, max_length=256)
    threshold: float = Field(default=0.3, gt=0.0, lt=1.0)
    box_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    unclip_ratio: float = Field(default=1.6, ge=0.0, le=10.0)
    min_size: int = Field(default=3, ge=0, le=10_000)
    max_boxes: int = Field(default=100, ge=1, le=1000)
    label: str | None = Field(default="text", max_length=256)


class PluginPostprocessConfig(_Section):
    """A postprocessor from another distribution: the entry point ``name`` of the group
    ``edgefleet.postprocessors`` (``name = "pkg.module:factory"``), called with ``options``."""

    kind: Literal["plugin"]
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    options: dict[str, Any] = Field(default_factory=dict)


PostprocessConfig = Annotated[
    RawPostprocessConfig
    | TopkPostprocessConfig
    | DbBoxesPostprocessConfig
    | PluginPostprocessConfig,
    Field(discriminator="kind"),
]


class _SinkSection(_Section):
    """Fields every ``[[loop.sinks]]`` kind shares: ``every = N`` keeps one result in N."""

    every: int = Field(default=1, ge=1, le=1_000_000)


class JsonlSinkConfig(_SinkSection):
    """One JSON object per result appended to ``path`` (``loop.sink_path`` is the older form)."""

    kind: Literal["jsonl"] = "jsonl"
    path: Path


class MqttSinkConfig(_SinkSection):
    """Results on ``<prefix>/<device_id>/results`` at QoS 0 over the daemon's MQTT connection
    (``edge-agent run``: a connection of its own to ``[mqtt]``). Bounded: at most
    ``max_rate_hz`` messages a second and ``max_bytes`` a message (others are dropped and
    counted), and a queue of ``queue_size`` that drops its oldest when the broker is slow or
    away; the loop never waits on it."""

    kind: Literal["mqtt"]
    max_rate_hz: float = Field(default=30.0, gt=0, le=10_000)
    max_bytes: int = Field(default=64 * 1024, ge=256, le=1024 * 1024)
    queue_size: int = Field(default=64, ge=1, le=100_000)


class Ros2SinkConfig(_SinkSection):
    """Results as ROS 2 messages over DDS (``agent.ros2.sink``): classifications as
    ``vision_msgs/Classification`` on ``<topic_prefix>/<model>/classification``, detections as
    ``vision_msgs/Detection2DArray`` on ``<topic_prefix>/<model>/detections``, and the agent's
    health as ``diagnostic_msgs/DiagnosticArray`` on ``/diagnostics`` every
    ``diagnostics_period_s`` (0: none). ``domain_id`` unset: ``ROS_DOMAIN_ID``, else 0."""

    kind: Literal["ros2"]
    domain_id: int | None = Field(default=None, ge=0, le=232)
    topic_prefix: str = Field(default="/edge_agent", max_length=100, pattern=_ROS_TOPIC)
    # The header's frame_id when the image did not come from ROS 2 (a camera, a file).
    frame_id: str = Field(default="", max_length=256)
    qos_depth: int = Field(default=10, ge=1, le=1000)
    diagnostics_period_s: float = Field(default=1.0, ge=0, le=3600)


# One class per kind; a new kind is a class here, a member of this union and a builder in
# ``agent.sinks``.
SinkConfig = Annotated[
    JsonlSinkConfig | MqttSinkConfig | Ros2SinkConfig, Field(discriminator="kind")
]


# The string form of ``loop.source`` used before ``[loop.source]`` existed.
_LEGACY_SOURCES = ("synthetic", "images", "video", "camera", "callback")


class LoopConfig(_Section):
    """The local inference loop."""

    source: SourceConfig = SyntheticSourceConfig()
    rate_hz: float = Field(default=30.0, gt=0)
    drop_policy: Literal["skip", "catch_up"] = "skip"
    window_s: float = Field(default=10.0, gt=0)
    sink_path: Path | None = None  # the older form of one [[loop.sinks]] kind = "jsonl"
    postprocess: PostprocessConfig = RawPostprocessConfig()
    sinks: tuple[SinkConfig, ...] = Field(default=(), max_length=16)

    @model_validator(mode="before")
    @classmethod
    def _migrate_string_source(cls, data: Any) -> Any:
        """``source = "camera"`` with ``camera_index`` / ``source_path`` (the older form) maps
        onto ``[loop.source]``; mixing the two forms is an error that names the new one."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        legacy = {k: data.pop(k) for k in ("source_path", "camera_index") if k in data}
        source = data.get("source")
        if isinstance(source, str):
            if source not in _LEGACY_SOURCES:
                raise ValueError(
                    f"loop.source = {source!r} is not a source; use a [loop.source] table with "
                    "kind = synthetic, v4l2, gstreamer, url, video, images, ros2, rosbag or "
                    "callback"
                )
            if source == "camera":
                data["source"] = {"kind": "v4l2", "device": legacy.get("camera_index", 0)}
            elif source in ("images", "video"):
                if legacy.get("source_path") is None:
                    raise ValueError(f"loop.source = {source!r} needs loop.source_path")
                data["source"] = {"kind": source, "path": legacy["source_path"]}
            else:
                data["source"] = {"kind": source}
        elif legacy:
            raise ValueError(
                f"loop.{' and loop.'.join(sorted(legacy))} belong to the string form of "
                "loop.source; under [loop.source] write device = ... or path = ..."
            )
        return data


class ModelConfig(_Section):
    """A model served from a file or from the store by name."""

    name: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")
    path: Path | None = None


class SwapConfig(_Section):
    """Hot swap and probation."""

    policy: Literal["auto", "availability", "resources"] = "auto"
    keep_versions: int = Field(default=3, ge=1)
    probation_s: float = Field(default=60.0, ge=0)
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    max_p99_ratio: float = Field(default=1.5, ge=1)
    boot_attempts: int = Field(default=3, ge=1)
    # Inferences (API or loop) a version must serve on probation before it may commit.
    probation_min_inferences: int = Field(default=20, ge=0)
    warmup_runs: int = Field(default=5, ge=0)
    loader_threads: int = Field(default=1, ge=1)


class ControlPlaneConfig(_Section):
    """Where the agent enrolls and asks for its desired state."""

    url: str | None = None
    bootstrap_token: str | None = None
    poll_interval_s: float = Field(default=30.0, gt=0)
    poll_jitter: float = Field(default=0.2, ge=0, le=1)
    bandwidth_limit_bps: int | None = Field(default=None, gt=0)
    tuf_root_path: Path | None = None
    labels: dict[str, str] = Field(default_factory=dict)  # sent once, at enrollment


class MqttConfig(_Section):
    """Telemetry broker; ``host=None`` disables MQTT."""

    host: str | None = None
    port: int = 1883
    topic_prefix: str = "edgefleet/v1"
    telemetry_interval_s: float = Field(default=10.0, gt=0)
    # With a control plane: an event stays spooled until the control plane confirms it stored
    # it (on the desired-state poll), and is sent again when that takes longer than this.
    event_resend_s: float = Field(default=120.0, gt=0)
    spool_max_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    username: str | None = None
    password: str | None = None


class BatchingConfig(_Section):
    """Dynamic batching of one model's API requests; applies only to models with a batch
    dimension (``max_batch_size > 0``). ``max_queue_delay_us=0``: run what is queued at once."""

    enabled: bool = True
    max_batch_size: int = Field(default=0, ge=0)  # 0: the model's own max_batch_size
    max_queue_delay_us: int = Field(default=0, ge=0)
    preferred_batch_sizes: tuple[int, ...] = ()


class ApiConfig(_Section):
    """The local Open Inference Protocol server."""

    enabled: bool = True
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int | None = 8001
    unix_socket: Path | None = None
    token: str | None = None
    max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    infer_threads: int = Field(default=4, ge=1)  # runs for models that are not batched
    batching: BatchingConfig = BatchingConfig()  # the default for every model
    model_batching: dict[str, BatchingConfig] = Field(default_factory=dict)  # by model name
    # Shared-memory extensions (system /dev/shm and CUDA IPC regions); bounds over all clients.
    shared_memory: bool = True
    shm_max_regions: int = Field(default=64, ge=0)
    shm_max_bytes: int = Field(default=1024 * 1024 * 1024, ge=0)  # registered, system + CUDA


class HardwareConfig(_Section):
    """Where the hardware profile's board files are read: ``/`` on a device. Another root (a
    recorded board's /proc, /sys and /etc) describes that board while this machine's installed
    runtimes still run the models: for tests and for dry runs of a fleet's variant choice."""

    root: Path = Path("/")


class AgentSettings(BaseSettings):
    """The whole agent configuration."""

    model_config = SettingsConfigDict(
        env_prefix="EDGE_AGENT__", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    device_id: str = Field(default_factory=lambda: os.uname().nodename)
    state_dir: Path = DEFAULT_STATE_DIR
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool | None = None
    models: tuple[ModelConfig, ...] = ()
    backends: BackendConfig = BackendConfig()
    loop: LoopConfig = LoopConfig()
    swap: SwapConfig = SwapConfig()
    control_plane: ControlPlaneConfig = ControlPlaneConfig()
    mqtt: MqttConfig = MqttConfig()
    api: ApiConfig = ApiConfig()
    hardware: HardwareConfig = HardwareConfig()

    @field_validator("device_id")
    @classmethod
    def _device_id_safe(cls, value: str) -> str:
        if not value or any(c in value for c in "/#+ \0") or len(value) > 128:
            raise ValueError("device_id must be 1-128 chars without '/', '#', '+', spaces")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment variables override the TOML file, which arrives as init kwargs.
        return (env_settings, init_settings)


def load_settings(path: Path | None = None, **overrides: Any) -> AgentSettings:
    """Read the TOML file (if any), apply env vars and ``overrides``; raise ``ConfigError``."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
    data.update(overrides)
    try:
        return AgentSettings(**data)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        # One line per CLI error: "loop.rate_hz: Input should be greater than 0; ..."
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration{where}: {problems}") from exc
