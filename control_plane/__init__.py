"""edgefleet control plane: model registry and variant builds, device registry, desired state,
signed artifact metadata, telemetry ingestion and staged rollouts, plus the ``edgectl`` CLI.

It may import the agent's contract modules (``agent.contracts``) and nothing else of the agent.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
