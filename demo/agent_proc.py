"""One demo agent: ``edge-agent daemon --config FILE`` that also stops with the demo.

``python -m demo.agent_proc --config FILE`` is the agent's own command (the daemon:
store, slots, update client, inference loop, MQTT telemetry) plus ``exit_with_parent``: if the
demo that started it is killed outright, the agent gets SIGTERM and stops as under systemd.
Its last stdout line is the daemon's JSON summary of what each inference loop did.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a demo agent: edge-agent daemon")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    from agent.cli import main as edge_agent
    from demo.procs import exit_with_parent

    exit_with_parent()
    return edge_agent(["--log-level", "warning", "daemon", "--config", args.config])


if __name__ == "__main__":
    sys.exit(main())
