"""Device telemetry over MQTT: the link to the broker, the on-disk spool, system metrics.

``TelemetryClient`` is the thin I/O driver; ``Spool`` stores what waits for delivery;
``SystemMetricsCollector`` and ``InferenceWindow`` produce what goes into a telemetry message.
Payload shapes and topics are contracts in ``agent.contracts.telemetry``.
"""

from agent.telemetry.client import CommandHandler, TelemetryClient, TelemetryCounters
from agent.telemetry.spool import Spool, SpoolCounters, SpooledMessage
from agent.telemetry.system import SystemMetricsCollector
from agent.telemetry.window import InferenceWindow

__all__ = [
    "CommandHandler",
    "InferenceWindow",
    "Spool",
    "SpoolCounters",
    "SpooledMessage",
    "SystemMetricsCollector",
    "TelemetryClient",
    "TelemetryCounters",
]
