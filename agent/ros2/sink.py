"""The ROS 2 result publisher: each loop result as a ROS 2 message, and the agent's health on
``/diagnostics``.

It owns the mapping of a model's outputs onto standard messages a ROS 2 graph reads without
extra packages, and the once-a-second ``diagnostic_msgs/DiagnosticArray``:

- ``message = "classification"``: ``vision_msgs/Classification``, the ``top_k`` largest scores
  of one output (its batch of one flattened), ``class_id`` the index or its label.
- ``message = "detections"``: ``vision_msgs/Detection2DArray`` from one output of rows
  ``[x1, y1, x2, y2, score, class]`` (``[N, 6+]`` or ``[1, N, 6+]``, pixels of the model's
  input, as end-to-end exported detectors emit), rows under ``min_score`` dropped, at most
  ``max_detections``; ``id`` is the row index, the hypothesis pose is left at its default.

Each result's header is the source image's (stamp and ``frame_id``) when the source is a ROS 2
one, else the result time and ``frame_id``. Results use ROS 2's default QoS (reliable, keep
last 10). A result that cannot be mapped raises ``InputError`` (the loop counts it as failed).
It implements ``agent.loop.ResultSink``; transport is ``agent.ros2.transport``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from typing import Any, Literal

import numpy as np

from agent.errors import ConfigError, InputError
from agent.logs import get_logger

__all__ = ["DIAGNOSTICS_TOPIC", "Ros2ResultSink"]

log = get_logger(__name__)

DIAGNOSTICS_TOPIC = "/diagnostics"
_CLASSIFICATION = "vision_msgs/msg/Classification"
_DETECTIONS = "vision_msgs/msg/Detection2DArray"
_DIAGNOSTICS = "diagnostic_msgs/msg/DiagnosticArray"
_MAX_TOP_K = 1000
_MAX_DETECTIONS = 10000
_LATENCIES_KEPT = 4096  # per diagnostics period

Outputs = Mapping[str, np.ndarray[Any, Any]]


class Ros2ResultSink:
    """Publishes each result on ``topic`` and, every ``diagnostics_period_s``, the loop's health
    on ``/diagnostics`` (``None``: no diagnostics).

    ``header_from`` is the loop's source: when it has a ``header`` (the ROS 2 sources), each
    result carries that image's header. ``version`` returns the model version served now.
    """

    def __init__(
        self,
        topic: str,
        *,
        model: str,
        domain_id: int = 0,
        message: Literal["classification", "detections"] = "classification",
        output: str | None = None,
        top_k: int = 5,
        min_score: float = 0.0,
        max_detections: int = 300,
        labels: Sequence[str] = (),
        frame_id: str = "",
        depth: int = 10,
        header_from: Any = None,
        version: Callable[[], str] | None = None,
        hardware_id: str = "",
        diagnostics_period_s: float | None = 1.0,
    ) -> None:
        from agent.ros2.transport import dds_topic_name

        dds_topic_name(topic)
        if message not in ("classification", "detections"):
            raise ConfigError(f"ROS 2 result message {message!r}: classification or detections")
        if not 1 <= top_k <= _MAX_TOP_K:
            raise ConfigError(f"top_k must be 1-{_MAX_TOP_K}, got {top_k}")
        if not 1 <= max_detections <= _MAX_DETECTIONS:
            raise ConfigError(f"max_detections must be 1-{_MAX_DETECTIONS}, got {max_detections}")
        if diagnostics_period_s is not None and diagnostics_period_s <= 0:
            raise ConfigError("diagnostics_period_s must be positive")
        self.topic = topic
        self.model = model
        self.domain_id = domain_id
        self.message = message
        self._msgtype = _CLASSIFICATION if message == "classification" else _DETECTIONS
        self._output = output
        self._top_k = top_k
        self._min_score = min_score
        self._max_detections = max_detections
        self._labels = tuple(labels)
        self._frame_id = frame_id
        self._depth = depth
        self._header_from = header_from
        self._version = version
        self._hardware_id = hardware_id
        self._period_s = diagnostics_period_s
        self._node: Any = None
        self._writer: Any = None
        self._diag_writer: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._latencies: deque[int] = deque(maxlen=_LATENCIES_KEPT)
        self._period_count = 0
        self._period_start = time.monotonic()
        self.published = 0
        self.failed = 0
        self._types: Any = None
        self._pose: Any = None

    # -- set-up --------------------------------------------------------------------------

    def _open(self) -> None:
        """Join the domain at the first result (the loop builds sinks before it runs)."""
        from agent.ros2.transport import Node

        node = Node(self.domain_id)
        try:
            self._writer = node.writer(self.topic, self._msgtype, depth=self._depth)
            if self._period_s is not None:
                self._diag_writer = node.writer(DIAGNOSTICS_TOPIC, _DIAGNOSTICS, depth=10)
        except Exception:
            node.close()
            raise
        self._node = node
        types = self._types = node.store.types
        self._pose = types["geometry_msgs/msg/PoseWithCovariance"](
            pose=types["geometry_msgs/msg/Pose"](
                position=types["geometry_msgs/msg/Point"](x=0.0, y=0.0, z=0.0),
                orientation=types["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0),
            ),
            covariance=np.zeros(36, dtype=np.float64),
        )
        if self._diag_writer is not None:
            self._thread = threading.Thread(target=self._diagnose, name="ros2-diag", daemon=True)
            self._thread.start()

    def open(self) -> None:
        """Join the domain now (otherwise the first result does)."""
        if self._node is None:
            self._open()

    def _header(self, ts: float) -> Any:
        types = self._types
        source_header = getattr(self._header_from, "header", None)
        if source_header is not None:
            return source_header
        ns = round(ts * 1e9)
        return types["std_msgs/msg/Header"](
            stamp=types["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9),
            frame_id=self._frame_id,
        )

    # -- results -------------------------------------------------------------------------

    def _pick(self, outputs: Outputs) -> np.ndarray[Any, Any]:
        if self._output is None:
            return next(iter(outputs.values()))
        try:
            return outputs[self._output]
        except KeyError:
            raise InputError(
                f"model has no output {self._output!r} (it has {', '.join(outputs)})"
            ) from None

    def _classification(self, header: Any, arr: np.ndarray[Any, Any]) -> Any:
        types = self._types
        if arr.dtype.kind not in "fiu" or arr.size == 0:
            raise InputError(f"classification needs numeric scores, got {arr.dtype} {arr.shape}")
        if arr.ndim > 1 and arr.shape[0] != 1:
            raise InputError(f"classification takes a batch of one, got shape {arr.shape}")
        scores = arr.reshape(-1)
        k = min(self._top_k, scores.size)
        top = np.argpartition(scores, -k)[-k:]
        top = top[np.argsort(scores[top])[::-1]]
        hypothesis = types["vision_msgs/msg/ObjectHypothesis"]
        results = [hypothesis(class_id=self._label(int(i)), score=float(scores[i])) for i in top]
        return types[_CLASSIFICATION](header=header, results=results)

    def _detections(self, header: Any, arr: np.ndarray[Any, Any]) -> Any:
        types = self._types
        rows = arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr
        if rows.ndim != 2 or rows.shape[1] < 6 or rows.dtype.kind not in "fiu":
            raise InputError(
                f"detections need rows [x1, y1, x2, y2, score, class] ([N, 6] or [1, N, 6]), "
                f"got {arr.dtype} {arr.shape}"
            )
        rows = rows[rows[:, 4] >= self._min_score][: self._max_detections].astype(np.float64)
        detection = types["vision_msgs/msg/Detection2D"]
        with_pose = types["vision_msgs/msg/ObjectHypothesisWithPose"]
        hypothesis = types["vision_msgs/msg/ObjectHypothesis"]
        box = types["vision_msgs/msg/BoundingBox2D"]
        pose2d = types["vision_msgs/msg/Pose2D"]
        point2d = types["vision_msgs/msg/Point2D"]
        found = []
        for index, (x1, y1, x2, y2, score, cls) in enumerate(rows[:, :6].tolist()):
            found.append(
                detection(
                    header=header,
                    results=[
                        with_pose(
                            hypothesis=hypothesis(class_id=self._label(int(cls)), score=score),
                            pose=self._pose,
                        )
                    ],
                    bbox=box(
                        center=pose2d(
                            position=point2d(x=(x1 + x2) / 2, y=(y1 + y2) / 2), theta=0.0
                        ),
                        size_x=abs(x2 - x1),
                        size_y=abs(y2 - y1),
                    ),
                    id=str(index),
                )
            )
        return types[_DETECTIONS](header=header, detections=found)

    def _label(self, index: int) -> str:
        labels = self._labels
        return labels[index] if 0 <= index < len(labels) else str(index)

    def __call__(self, seq: int, ts: float, latency_ns: int, outputs: Outputs) -> None:
        if self._node is None:
            self._open()
        header = self._header(ts)
        arr = self._pick(outputs)
        if self.message == "classification":
            msg = self._classification(header, arr)
        else:
            msg = self._detections(header, arr)
        try:
            self._writer.write(msg)
        except Exception as exc:
            self.failed += 1
            raise InputError(f"cannot publish the result on {self.topic}: {exc}") from exc
        self.published += 1
        with self._lock:
            self._period_count += 1
            self._latencies.append(latency_ns)

    def flush(self) -> None:
        pass  # every result is written as it comes

    # -- diagnostics ---------------------------------------------------------------------

    def diagnostics(self) -> Any:
        """The ``DiagnosticArray`` for the period since the last one (and starts the next)."""
        types = self._types
        now = time.monotonic()
        with self._lock:
            count, lat = self._period_count, np.asarray(self._latencies, dtype=np.float64)
            span = max(now - self._period_start, 1e-9)
            self._period_count = 0
            self._latencies.clear()
            self._period_start = now
        version = ""
        if self._version is not None:
            with suppress(Exception):
                version = self._version()
        ok, warn = 0, 1
        level, text = (ok, "running") if count else (warn, "no result in the last period")
        values = {
            "model": self.model,
            "model_version": version,
            "rate_hz": f"{count / span:.3f}",
            "latency_p50_ms": f"{np.percentile(lat, 50) / 1e6:.3f}" if lat.size else "",
            "latency_max_ms": f"{lat.max() / 1e6:.3f}" if lat.size else "",
            "results_published": str(self.published),
            "results_failed": str(self.failed),
            "results_topic": self.topic,
        }
        key_value = types["diagnostic_msgs/msg/KeyValue"]
        wall = time.time_ns()
        header = types["std_msgs/msg/Header"](
            stamp=types["builtin_interfaces/msg/Time"](sec=wall // 10**9, nanosec=wall % 10**9),
            frame_id="",
        )
        status = types["diagnostic_msgs/msg/DiagnosticStatus"](
            level=level,
            name=f"edge_agent: {self.model}",
            message=text,
            hardware_id=self._hardware_id,
            values=[key_value(key=k, value=v) for k, v in values.items()],
        )
        return types[_DIAGNOSTICS](header=header, status=[status])

    def _diagnose(self) -> None:
        period = self._period_s or 1.0
        while not self._stop.wait(period):
            try:
                self._diag_writer.write(self.diagnostics())
            except Exception as exc:  # the next period tries again
                with suppress(Exception):
                    log.warning("ros2_diagnostics_failed", error=str(exc))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._node is not None:
            self._node.close()
            self._node = None
