"""edge-agent: the device daemon of edgefleet.

It owns local inference (backends, the inference loop, model slots), the on-device model store,
the update client and telemetry. It never imports ``control_plane``; the control plane imports
this package's contract modules (``agent.contracts``), which pull in nothing heavy.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
