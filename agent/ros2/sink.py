"""The ROS 2 result publisher: loop results as standard ROS 2 messages, and the agent's health
on ``/diagnostics`` once a second.

It owns the mapping of results onto messages a ROS 2 graph reads without extra packages:

- a classification (top-k) -> ``vision_msgs/Classification`` on ``<prefix>/<model>/
  classification``: one ``ObjectHypothesis`` per class, best first, ``class_id`` the label or
  else the class index, ``score`` the score;
- a detection (boxes) -> ``vision_msgs/Detection2DArray`` on ``<prefix>/<model>/detections``:
  one ``Detection2D`` per box, ``bbox`` centre and size in the pixels the model's output refers
  to, one hypothesis (``class_id`` label or index, score) with the default pose, ``id`` the
  box's index;
- health -> ``diagnostic_msgs/DiagnosticArray`` on ``/diagnostics``: one ``DiagnosticStatus``
  per model (``edge_agent: <model>``; OK while results flow, WARN after a period without one)
  with ``rate_hz``, ``latency_p50_ms``, ``latency_max_ms``, ``model_version``, counts.

Each result carries the header (stamp, ``frame_id``) of the image it was computed from when the
loop reads a ROS 2 source (``agent.ros2.source.current_header``), else the result time and the
configured ``frame_id``. Topics use ROS 2's default QoS (reliable, keep last 10). ``<model>`` is
the model name with characters a ROS 2 name cannot hold replaced by ``_``.

``Ros2Publisher`` holds the DDS participant and writers; ``Ros2Sink`` is the ``[[loop.sinks]]
kind = "ros2"`` sink over postprocessed results (``classification`` and ``detection`` bodies;
``raw`` and ``custom`` ones have no standard message and are counted, not sent);
``Ros2ResultSink`` is the loop's ``ResultSink`` over raw outputs (library use: top-k of one
output, or detector rows ``[x1, y1, x2, y2, score, class]``). Transport is
``agent.ros2.transport``.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from agent.errors import ConfigError, InputError
from agent.logs import get_logger
from agent.ros2.source import current_header

if TYPE_CHECKING:
    from agent.config import Ros2SinkConfig

__all__ = [
    "DIAGNOSTICS_TOPIC",
    "Box",
    "Ros2Publisher",
    "Ros2ResultSink",
    "Ros2Sink",
    "Scored",
    "build_ros2_sink",
    "results_topic",
]

log = get_logger(__name__)

DIAGNOSTICS_TOPIC = "/diagnostics"
CLASSIFICATION = "vision_msgs/msg/Classification"
DETECTIONS = "vision_msgs/msg/Detection2DArray"
DIAGNOSTICS = "diagnostic_msgs/msg/DiagnosticArray"
_MAX_RESULTS = 1000  # hypotheses or boxes in one message
_LATENCIES_KEPT = 4096  # per model and diagnostics period
_OK, _WARN = 0, 1  # diagnostic_msgs/DiagnosticStatus levels

Outputs = Mapping[str, np.ndarray[Any, Any]]


@dataclass(frozen=True)
class Scored:
    """One class of a classification."""

    index: int
    score: float
    label: str | None = None


@dataclass(frozen=True)
class Box:
    """One detection: corners in pixels, score, class."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    class_id: int = 0
    label: str | None = None


def results_topic(prefix: str, model: str, kind: str) -> str:
    """``/edge_agent`` + ``digits-cnn.v2`` + ``classification`` ->
    ``/edge_agent/digits_cnn_v2/classification``."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", model) or "model"
    if name[0].isdigit():
        name = "m" + name
    name = re.sub(r"__+", "_", name)
    return f"{prefix.rstrip('/')}/{name}/{kind}"


@dataclass
class _ModelHealth:
    count: int = 0
    published: int = 0
    failed: int = 0
    latencies: deque[int] = field(default_factory=lambda: deque(maxlen=_LATENCIES_KEPT))


class Ros2Publisher:
    """One DDS participant in ``domain_id`` publishing results of any number of models, and
    (``diagnostics_period_s`` not None) their health on ``/diagnostics``.

    Writers are created at a model's first result of a kind; the participant at the first
    result (or ``open``). ``version(model)`` names the version served now, for diagnostics.
    Safe to call from several loops' threads.
    """

    def __init__(
        self,
        *,
        domain_id: int = 0,
        prefix: str = "/edge_agent",
        frame_id: str = "",
        depth: int = 10,
        hardware_id: str = "",
        version: Callable[[str], str | None] | None = None,
        diagnostics_period_s: float | None = 1.0,
    ) -> None:
        from agent.ros2.transport import dds_topic_name

        dds_topic_name(results_topic(prefix, "m", "classification"))
        if diagnostics_period_s is not None and not 0 < diagnostics_period_s <= 3600:
            raise ConfigError("diagnostics_period_s must be in (0, 3600]")
        self.domain_id = domain_id
        self.prefix = prefix
        self._frame_id = frame_id
        self._depth = depth
        self._hardware_id = hardware_id
        self._version = version
        self._period_s = diagnostics_period_s
        self._lock = threading.Lock()
        self._node: Any = None
        self._types: Any = None
        self._pose: Any = None
        self._writers: dict[str, Any] = {}
        self._health: dict[str, _ModelHealth] = {}
        self._period_start = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- set-up --------------------------------------------------------------------------

    def open(self) -> None:
        """Join the domain now (otherwise the first result does)."""
        with self._lock:
            self._open_locked()

    def _open_locked(self) -> None:
        if self._node is not None:
            return
        if self._closed:
            raise InputError("the ROS 2 result publisher is closed")
        from agent.ros2.transport import Node

        node = Node(self.domain_id)
        types = node.store.types
        self._types = types
        self._pose = types["geometry_msgs/msg/PoseWithCovariance"](
            pose=types["geometry_msgs/msg/Pose"](
                position=types["geometry_msgs/msg/Point"](x=0.0, y=0.0, z=0.0),
                orientation=types["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0),
            ),
            covariance=np.zeros(36, dtype=np.float64),
        )
        if self._period_s is not None:
            try:
                self._writers[DIAGNOSTICS_TOPIC] = node.writer(
                    DIAGNOSTICS_TOPIC, DIAGNOSTICS, depth=10
                )
            except Exception:
                node.close()
                raise
            self._thread = threading.Thread(target=self._diagnose, name="ros2-diag", daemon=True)
            self._thread.start()
        self._node = node

    def prepare(self, model: str, kind: Literal["classification", "detections"]) -> None:
        """Create ``model``'s results writer of ``kind`` now, so subscribers can match it
        before the first result (topics are volatile: a result nobody matched is gone)."""
        msgtype = CLASSIFICATION if kind == "classification" else DETECTIONS
        self._writer(results_topic(self.prefix, model, kind), msgtype)

    def _writer(self, topic: str, msgtype: str) -> Any:
        writer = self._writers.get(topic)
        if writer is None:
            with self._lock:
                self._open_locked()
                writer = self._writers.get(topic)
                if writer is None:
                    writer = self._writers[topic] = self._node.writer(
                        topic, msgtype, depth=self._depth
                    )
        return writer

    def _header(self, ts: float) -> Any:
        header = current_header()
        if header is not None:
            return header
        types = self._types
        ns = round(ts * 1e9)
        return types["std_msgs/msg/Header"](
            stamp=types["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9),
            frame_id=self._frame_id,
        )

    # -- results -------------------------------------------------------------------------

    def classification(
        self, model: str, ts: float, latency_ns: int, classes: Sequence[Scored]
    ) -> None:
        """Publish a top-k as ``vision_msgs/Classification``."""
        writer = self._writer(results_topic(self.prefix, model, "classification"), CLASSIFICATION)
        types = self._types
        hypothesis = types["vision_msgs/msg/ObjectHypothesis"]
        results = [
            hypothesis(class_id=c.label or str(c.index), score=float(c.score))
            for c in classes[:_MAX_RESULTS]
        ]
        msg = types[CLASSIFICATION](header=self._header(ts), results=results)
        self._send(model, writer, msg, latency_ns)

    def detections(self, model: str, ts: float, latency_ns: int, boxes: Sequence[Box]) -> None:
        """Publish boxes as ``vision_msgs/Detection2DArray``."""
        writer = self._writer(results_topic(self.prefix, model, "detections"), DETECTIONS)
        types = self._types
        header = self._header(ts)
        detection = types["vision_msgs/msg/Detection2D"]
        with_pose = types["vision_msgs/msg/ObjectHypothesisWithPose"]
        hypothesis = types["vision_msgs/msg/ObjectHypothesis"]
        bbox = types["vision_msgs/msg/BoundingBox2D"]
        pose2d = types["vision_msgs/msg/Pose2D"]
        point2d = types["vision_msgs/msg/Point2D"]
        found = [
            detection(
                header=header,
                results=[
                    with_pose(
                        hypothesis=hypothesis(
                            class_id=b.label or str(b.class_id), score=float(b.score)
                        ),
                        pose=self._pose,
                    )
                ],
                bbox=bbox(
                    center=pose2d(
                        position=point2d(x=(b.x0 + b.x1) / 2, y=(b.y0 + b.y1) / 2), theta=0.0
                    ),
                    size_x=abs(b.x1 - b.x0),
                    size_y=abs(b.y1 - b.y0),
                ),
                id=str(i),
            )
            for i, b in enumerate(boxes[:_MAX_RESULTS])
        ]
        self._send(model, writer, types[DETECTIONS](header=header, detections=found), latency_ns)

    def _send(self, model: str, writer: Any, msg: Any, latency_ns: int) -> None:
        health = self._health.get(model)
        if health is None:
            with self._lock:
                health = self._health.setdefault(model, _ModelHealth())
        try:
            writer.write(msg)
        except Exception as exc:
            health.failed += 1
            raise InputError(f"cannot publish the result on {writer.topic}: {exc}") from exc
        with self._lock:
            health.published += 1
            health.count += 1
            health.latencies.append(latency_ns)

    # -- diagnostics ---------------------------------------------------------------------

    def diagnostics(self) -> Any:
        """The ``DiagnosticArray`` for the period since the last one (and starts the next)."""
        types = self._types
        now = time.monotonic()
        with self._lock:
            span = max(now - self._period_start, 1e-9)
            self._period_start = now
            period = []
            for model, h in sorted(self._health.items()):
                lat = np.asarray(h.latencies, dtype=np.float64)
                period.append((model, h.count, lat, h.published, h.failed))
                h.count = 0
                h.latencies.clear()
        key_value = types["diagnostic_msgs/msg/KeyValue"]
        statuses = []
        for model, count, lat, published, failed in period:
            version = None
            if self._version is not None:
                with suppress(Exception):
                    version = self._version(model)
            values = {
                "model": model,
                "model_version": version or "",
                "rate_hz": f"{count / span:.3f}",
                "latency_p50_ms": f"{np.percentile(lat, 50) / 1e6:.3f}" if lat.size else "",
                "latency_max_ms": f"{lat.max() / 1e6:.3f}" if lat.size else "",
                "results_published": str(published),
                "results_failed": str(failed),
            }
            statuses.append(
                types["diagnostic_msgs/msg/DiagnosticStatus"](
                    level=_OK if count else _WARN,
                    name=f"edge_agent: {model}",
                    message="running" if count else "no result in the last period",
                    hardware_id=self._hardware_id,
                    values=[key_value(key=k, value=v) for k, v in values.items()],
                )
            )
        wall = time.time_ns()
        header = types["std_msgs/msg/Header"](
            stamp=types["builtin_interfaces/msg/Time"](sec=wall // 10**9, nanosec=wall % 10**9),
            frame_id="",
        )
        return types[DIAGNOSTICS](header=header, status=statuses)

    def _diagnose(self) -> None:
        period = self._period_s or 1.0
        writer = self._writers[DIAGNOSTICS_TOPIC]
        while not self._stop.wait(period):
            try:
                writer.write(self.diagnostics())
            except Exception as exc:  # the next period tries again
                with suppress(Exception):
                    log.warning("ros2_diagnostics_failed", error=str(exc))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            self._closed = True
            node, self._node = self._node, None
            self._writers.clear()
        if node is not None:
            node.close()


class Ros2ResultSink:
    """``agent.loop.ResultSink`` publishing one model's raw outputs through a ``Ros2Publisher``
    (owned: closed with the sink).

    ``message="classification"``: the ``top_k`` largest scores of ``output`` (default: the
    first; a batch of one, flattened), labelled from ``labels``. ``message="detections"``: rows
    ``[x1, y1, x2, y2, score, class, ...]`` of ``output`` (``[N, 6+]`` or ``[1, N, 6+]``),
    those under ``min_score`` dropped, at most ``max_detections``. An output that does not fit
    raises ``InputError`` (the loop counts the frame as failed).
    """

    def __init__(
        self,
        publisher: Ros2Publisher,
        *,
        model: str,
        message: Literal["classification", "detections"] = "classification",
        output: str | None = None,
        top_k: int = 5,
        min_score: float = 0.0,
        max_detections: int = 300,
        labels: Sequence[str] = (),
    ) -> None:
        if message not in ("classification", "detections"):
            raise ConfigError(f"ROS 2 result message {message!r}: classification or detections")
        if not 1 <= top_k <= _MAX_RESULTS:
            raise ConfigError(f"top_k must be 1-{_MAX_RESULTS}, got {top_k}")
        if not 1 <= max_detections <= _MAX_RESULTS:
            raise ConfigError(f"max_detections must be 1-{_MAX_RESULTS}, got {max_detections}")
        self.publisher = publisher
        self.model = model
        self.message = message
        self._output = output
        self._top_k = top_k
        self._min_score = min_score
        self._max_detections = max_detections
        self._labels = tuple(labels)

    def _pick(self, outputs: Outputs) -> np.ndarray[Any, Any]:
        if self._output is None:
            return next(iter(outputs.values()))
        try:
            return outputs[self._output]
        except KeyError:
            raise InputError(
                f"model has no output {self._output!r} (it has {', '.join(outputs)})"
            ) from None

    def _label(self, index: int) -> str | None:
        return self._labels[index] if 0 <= index < len(self._labels) else None

    def __call__(self, seq: int, ts: float, latency_ns: int, outputs: Outputs) -> None:
        arr = self._pick(outputs)
        if arr.dtype.kind not in "fiu" or arr.size == 0:
            raise InputError(f"{self.message} needs numbers, got {arr.dtype} {arr.shape}")
        if self.message == "classification":
            if arr.ndim > 1 and arr.shape[0] != 1:
                raise InputError(f"classification takes a batch of one, got shape {arr.shape}")
            scores = arr.reshape(-1)
            k = min(self._top_k, scores.size)
            if k == 1:  # argpartition slows down on many equal scores (a probability map)
                top = np.array([int(scores.argmax())])
            else:
                top = np.argpartition(scores, -k)[-k:]
                top = top[np.argsort(scores[top])[::-1]]
            classes = [Scored(int(i), float(scores[i]), self._label(int(i))) for i in top]
            self.publisher.classification(self.model, ts, latency_ns, classes)
            return
        rows = arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr
        if rows.ndim != 2 or rows.shape[1] < 6:
            raise InputError(
                "detections need rows [x1, y1, x2, y2, score, class] ([N, 6] or [1, N, 6]), "
                f"got shape {arr.shape}"
            )
        rows = rows[rows[:, 4] >= self._min_score][: self._max_detections]
        boxes = [
            Box(x0, y0, x1, y1, score, int(cls), self._label(int(cls)))
            for x0, y0, x1, y1, score, cls in rows[:, :6].astype(np.float64).tolist()
        ]
        self.publisher.detections(self.model, ts, latency_ns, boxes)

    def flush(self) -> None:
        pass  # every result is written as it comes

    def close(self) -> None:
        self.publisher.close()


class Ros2Sink:
    """The ``[[loop.sinks]] kind = "ros2"`` sink: each postprocessed result of any loop of the
    process through one ``Ros2Publisher`` (owned). ``publish`` runs in a loop's thread and does
    not hold it up: a reliable write waits at most 20 ms for a subscriber that does not keep up,
    then the result is dropped; drops are counted in ``dropped`` and logged once a window
    (``ros2_results_dropped``). Bodies without a ROS 2 message (``raw``, ``custom``) are
    counted in ``unmapped`` and logged once per model."""

    kind = "ros2"

    def __init__(self, publisher: Ros2Publisher, *, every: int = 1) -> None:
        if every < 1:
            raise ConfigError(f"sink every must be >= 1, got {every}")
        self.publisher = publisher
        self.every = every
        self.unmapped = 0
        self.dropped = 0
        self._reported = 0
        self._last_error = ""
        self._warned: set[str] = set()

    def publish(self, result: Any) -> None:
        body = result.body
        kind = getattr(body, "kind", None)
        latency_ns = round(result.latency_ms * 1e6)
        try:
            if kind == "classification":
                classes = [Scored(c.index, c.score, c.label) for c in body.classes]
                self.publisher.classification(result.model, result.ts, latency_ns, classes)
                return
            if kind == "detection":
                boxes = [
                    Box(b.x0, b.y0, b.x1, b.y1, b.score, b.class_id, b.label) for b in body.boxes
                ]
                self.publisher.detections(result.model, result.ts, latency_ns, boxes)
                return
        except InputError as exc:  # the write timed out or failed: drop, count, log per window
            self.dropped += 1
            self._last_error = str(exc)
            return
        self.unmapped += 1
        if result.model not in self._warned:
            self._warned.add(result.model)
            log.warning(
                "ros2_result_not_published",
                model=result.model,
                kind=kind,
                why="only classification and detection results have a ROS 2 message; "
                "set [loop.postprocess] kind = topk or db_boxes",
            )

    def flush(self) -> None:
        """At a window end: log the drops of the window, if any (never per result)."""
        if self.dropped != self._reported:
            log.warning(
                "ros2_results_dropped",
                dropped=self.dropped - self._reported,
                total_dropped=self.dropped,
                error=self._last_error,
            )
            self._reported = self.dropped

    def close(self) -> None:
        self.flush()
        self.publisher.close()


def build_ros2_sink(
    config: Ros2SinkConfig,
    *,
    device_id: str,
    version: Callable[[str], str | None] | None = None,
) -> Ros2Sink:
    """The ``[[loop.sinks]] kind = "ros2"`` sink of ``config``; ``ConfigError`` when the
    bridge cannot be used here (the ``ros2`` extra is missing or does not load)."""
    from agent.ros2 import bridge_status
    from agent.ros2.transport import default_domain_id

    usable, detail = bridge_status()["ros2"]
    if not usable:
        raise ConfigError(f'[[loop.sinks]] kind = "ros2" cannot be used here: {detail}')
    domain = config.domain_id if config.domain_id is not None else default_domain_id()
    publisher = Ros2Publisher(
        domain_id=domain,
        prefix=config.topic_prefix,
        frame_id=config.frame_id,
        depth=config.qos_depth,
        hardware_id=device_id,
        version=version,
        diagnostics_period_s=config.diagnostics_period_s or None,
    )
    return Ros2Sink(publisher, every=config.every)
