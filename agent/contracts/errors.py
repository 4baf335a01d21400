"""The one error the contract modules raise: a payload, topic or identifier that breaks a shared
contract. Each side translates it into its own error tree where it calls a contract function
(the agent into ``AgentError`` subclasses, the control plane into HTTP answers or counters)."""

from __future__ import annotations

__all__ = ["ContractError"]


class ContractError(ValueError):
    """A value does not satisfy a contract shared by the agent and the control plane."""
