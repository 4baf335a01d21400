"""A real agent process for the fault-injection tests: store, slot and update driver, booted from
a state directory exactly as the daemon boots, then doing one job until it ends or is killed.

    python -m tests.agent.store.agent_proc STATE_DIR run ARCHIVE...
        install and update to each archive, probation to a verdict
    python -m tests.agent.store.agent_proc STATE_DIR update ARCHIVE
        install and update, then serve on probation
    python -m tests.agent.store.agent_proc STATE_DIR serve
        boot, then serve
    python -m tests.agent.store.agent_proc zygote
        read job lines on stdin, fork one process per job, print EXIT <status>

Lines on stdout say how far a job got (PID <pid>, SERVING <v>, READY, INSTALLED <v>,
PROBATION <v>, VERDICT <v> <action>, DONE). Options: ``--probation-s``, ``--boot-attempts``.
The zygote pays the interpreter start-up once; each job is still its own process, killed with
SIGKILL by the tests, with no runtime session or thread inherited across the fork.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from agent.config import SwapConfig
from agent.logs import configure_logging
from agent.models.activation import ModelActivator
from agent.models.bundle import golden_sets
from agent.models.probation import Limits, UpdateJournal
from agent.models.slots import ModelSlot
from agent.models.store import ModelStore

NAME = "digits"


def say(line: str) -> None:
    print(line, flush=True)


def job(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("mode", choices=["run", "update", "serve"])
    parser.add_argument("archives", nargs="*", type=Path)
    parser.add_argument("--probation-s", type=float, default=0.2)
    parser.add_argument("--boot-attempts", type=int, default=3)
    args = parser.parse_args(argv)
    configure_logging("warning", json=True)
    say(f"PID {os.getpid()}")

    # Latency is not what these runs judge: a lenient p99 bound keeps verdicts deterministic
    # (and a second of slack: one inference of a sub-millisecond model held up by a busy
    # machine is more than 100x its baseline).
    swap = SwapConfig(
        probation_s=args.probation_s,
        boot_attempts=args.boot_attempts,
        warmup_runs=2,
        max_p99_ratio=100,
    )
    store = ModelStore(args.state_dir, keep_versions=2)
    store.recover()
    slot = ModelSlot(NAME, store, swap_config=swap, latency_runs=3)
    activator = ModelActivator(
        slot,
        journal=UpdateJournal(args.state_dir),
        limits=Limits.from_config(swap, min_requests=5, p99_slack_s=1.0),
    )
    activator.boot(resume=True)
    say(f"SERVING {slot.version}")
    say("READY")

    def traffic(n: int) -> None:
        manifest = store.manifest(NAME, slot.version)
        feeds = golden_sets(store.path(NAME, slot.version), manifest)[0].inputs
        for _ in range(n):
            slot.infer(feeds)

    if args.mode == "serve":
        while True:
            traffic(10)
            time.sleep(0.01)
    for archive in args.archives:
        installed = store.install(archive)
        say(f"INSTALLED {installed.version}")
        activator.update(installed.version)
        say(f"PROBATION {installed.version}")
        if args.mode == "update":
            while True:
                traffic(10)
                time.sleep(0.01)
        while True:
            traffic(10)
            verdict = activator.check()
            if verdict is None or verdict.action != "wait":
                say(f"VERDICT {installed.version} {verdict.action if verdict else 'none'}")
                break
            time.sleep(0.02)
    say("DONE")
    return 0


def zygote() -> int:
    say("ZYGOTE")
    for line in sys.stdin:
        argv = shlex.split(line)
        if not argv:
            continue
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = job(argv)
            finally:
                sys.stdout.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        say(f"EXIT {os.waitstatus_to_exitcode(status)}")
    return 0


def main() -> int:
    if sys.argv[1:] == ["zygote"]:
        return zygote()
    return job(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
