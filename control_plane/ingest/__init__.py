"""Telemetry ingestion: device state, telemetry and update events from MQTT into the database.

``TelemetryIngester`` (``ingester``) subscribes and runs the writer thread; ``decode`` says what
is accepted, ``fleet`` keeps the in-memory view and time buckets, ``writer`` owns the SQL,
``tables`` the rows. The rollout runner reads the ``device_links`` rows this package writes.
"""

from control_plane.ingest.decode import MessageRejectedError, decode_message
from control_plane.ingest.fleet import FleetLimits, FleetState
from control_plane.ingest.ingester import (
    IngestCounters,
    IngestOptions,
    MqttLink,
    TelemetryIngester,
)
from control_plane.ingest.tables import (
    DeviceEventRow,
    DeviceLink,
    LatencySketchBin,
    TelemetryBucket,
)
from control_plane.ingest.writer import Retention, TelemetryWriter

__all__ = [
    "DeviceEventRow",
    "DeviceLink",
    "FleetLimits",
    "FleetState",
    "IngestCounters",
    "IngestOptions",
    "LatencySketchBin",
    "MessageRejectedError",
    "MqttLink",
    "Retention",
    "TelemetryBucket",
    "TelemetryIngester",
    "TelemetryWriter",
    "decode_message",
]
