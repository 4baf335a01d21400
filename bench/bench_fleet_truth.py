"""Does the operator's view match what the fleet serves? 50 simulated agents (in-process update
clients, each with its own store, slot, journal and HTTP client, each on its own thread as in the
daemon) against the real control plane on loopback, one update v1 -> v2, with 10% of the devices
made to fail at a random point of it:

- ``download``: the connection drops while the archive downloads (retried later);
- ``load``: the version cannot load on the device (no variant fits its pins): rejected;
- ``rollback``: the control plane's rollback command lands right after the swap (as over MQTT:
  ``ModelActivator.rollback`` from another thread);
- ``report``: the reported-state PUTs are lost for a while (retried);
- ``restart``: the process dies right after the swap, before a verdict, and starts again
  (store recovery, boot from the journal).

Prints, after the run, the share of devices whose reported ``active_version`` (what the control
plane shows the operator) equals the version their slot serves, and the time from the
device-side commanded rollback to the operator's view.

    python bench/bench_fleet_truth.py [--devices 50] [--failing 0.1] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.logs import configure_logging
from agent.samples import digits_cnn, digits_data
from tests.agent.store.models import shifted
from tests.agent.updates.fleet import ControlPlane, Device

KINDS = ("download", "load", "rollback", "report", "restart")


class Flaky(httpx.BaseTransport):
    """Drops the next ``times`` requests whose path contains ``part``."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.part = ""
        self.times = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.times > 0 and self.part and self.part in request.url.path:
            self.times -= 1
            raise httpx.ReadError("connection dropped (injected)", request=request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


class Agent:
    """One simulated device: a ``Device`` whose update client runs on its own thread."""

    def __init__(self, cp: ControlPlane, root: Path, state_dir: Path, name: str) -> None:
        self.cp, self.root, self.state_dir, self.name = cp, root, state_dir, name
        self.kind: str | None = None
        self.rolled_back_at: float | None = None
        self.restart_due = False
        self._start()

    def _start(self, *, boot: bool = False) -> None:
        self.transport = Flaky()
        self.http = httpx.Client(transport=self.transport, timeout=10)
        min_inferences = 1 if self.kind == "restart" else 0
        self.device = Device(
            self.cp,
            self.state_dir,
            name=self.name,
            root=self.root,
            http=self.http,
            poll_interval_s=1.0,
            min_inferences=min_inferences,
        )
        if boot:
            self.device.store.recover()
            self.device.served.boot()
        self.device.bus.subscribe(self._on_event)
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self.device.client.run, args=(self.stop,), daemon=True
        )
        self.thread.start()

    def restart(self) -> None:
        self.stop.set()
        self.device.client.check_now()
        self.thread.join(timeout=30)
        self.device.close()
        self.http.close()
        self.restart_due = False
        self._start(boot=True)

    def close(self) -> None:
        self.stop.set()
        self.device.client.check_now()
        self.thread.join(timeout=30)
        self.device.close()
        self.http.close()

    def _on_event(self, event: Any) -> None:
        if event.step != "swapped" or event.version != "2.0.0":
            return
        if self.kind == "rollback" and self.rolled_back_at is None:
            activator = self.device.served.get("digits")

            def command() -> None:
                time.sleep(0.05)  # lands once the swap returned, as a command would
                activator.rollback("requested by the control plane")
                self.rolled_back_at = time.monotonic()

            threading.Thread(target=command, daemon=True).start()
        elif self.kind == "restart":
            self.restart_due = True
            self.kind = "restarted"

    def serving(self) -> str | None:
        slot = self.device.served.get("digits").slot if self.device.served.names() else None
        return slot.version or None if slot is not None else None


def _views(cp: ControlPlane) -> dict[str, dict[str, Any]]:
    with cp.admin() as c:
        devices = c.get("/v1/devices").json()
    out = {}
    for d in devices:
        models = (d.get("reported") or {}).get("models", [])
        out[d["name"]] = next((m for m in models if m["name"] == "digits"), {})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--failing", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    configure_logging("error")
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fleet-truth-"))
    digits = digits_cnn()
    cal = work / "cal.npz"
    np.savez(cal, input=digits_data().x_train[:64])
    cp = ControlPlane(work / "cp").start()
    agents: list[Agent] = []
    try:
        cp.push(digits, cal, name="digits", version="1.0.0")
        cp.push(shifted(digits, work / "v2.onnx", 5.0), cal, name="digits", version="2.0.0")
        root = cp.root_json(work / "root.json")
        agents = [
            Agent(cp, root, work / f"robot-{i:02d}", f"robot-{i:02d}") for i in range(args.devices)
        ]
        _until(lambda: all(a.device.client.credential for a in agents), 60)
        ids = {a.name: a.device.device_id for a in agents}
        for a in agents:
            cp.deploy("digits", "1.0.0", ids[a.name])
        _until(lambda: all(a.serving() == "1.0.0" for a in agents), 120)

        failing = rng.sample(agents, max(1, round(args.failing * len(agents))))
        kinds = rng.sample(KINDS, len(KINDS))  # every kind once before any twice
        for i, a in enumerate(failing):
            a.kind = kinds[i % len(kinds)]
            if a.kind == "download":
                a.transport.part, a.transport.times = "/v1/artifacts/", 2
            elif a.kind == "report":
                a.transport.part, a.transport.times = "/reported-state", 4
            elif a.kind == "restart":
                a.restart()  # the same device, now with a probation that waits for traffic
            elif a.kind == "load":
                from agent.config import BackendConfig

                a.device.served.get("digits").slot.backend_config = BackendConfig(
                    pin_backend="openvino"
                )
        started = time.monotonic()
        for a in agents:
            cp.deploy("digits", "2.0.0", ids[a.name])

        def settled() -> bool:
            for a in agents:
                a.device.clock.advance(2.0)  # backoffs run on each device's clock
                if a.restart_due:
                    a.restart()
            views = _views(cp)
            return all(
                views.get(a.name, {}).get("active_version") == a.serving()
                and views.get(a.name, {}).get("phase")
                in ("committed", "rolled_back", "failed", "probation")
                for a in agents
            ) and all(a.kind != "restart" for a in agents)

        _until(settled, 240, every_s=0.5)
        took = time.monotonic() - started
        # The view after the run, read once more: every device against what its slot serves.
        views = _views(cp)
        match = sum(views[a.name].get("active_version") == a.serving() for a in agents)
        commanded = [a for a in agents if a.kind == "rollback"]
        lag = []
        for a in commanded:
            assert a.rolled_back_at is not None
            lag.append(_lag_to_view(cp, a))
        print(f"devices {len(agents)}, made to fail {len(failing)}: ", end="")
        print(", ".join(f"{a.name} {a.kind}" for a in failing))
        for a in failing:
            v = views[a.name]
            print(
                f"  {a.name}: serves {a.serving()}, view {v.get('active_version')} "
                f"{v.get('phase')} {v.get('last_error') or v.get('detail') or ''}"
            )
        print(f"settled in {took:.1f} s")
        print(
            f"operator's view == serving version: {match}/{len(agents)} "
            f"({100 * match / len(agents):.0f}%)"
        )
        if lag:
            print("commanded rollback -> operator's view: " + ", ".join(f"{s:.2f} s" for s in lag))
    finally:
        for a in agents:
            a.close()
        cp.stop()
        shutil.rmtree(work, ignore_errors=True)


def _lag_to_view(cp: ControlPlane, agent: Agent) -> float:
    """When the control plane recorded the report after the rollback, against when it happened
    (both on this machine's clock): ``reported_at`` minus the rollback's wall time."""
    shown = cp.device(agent.device.device_id)
    reported_at = shown.get("reported_at")
    assert agent.rolled_back_at is not None
    from datetime import datetime

    at = datetime.fromisoformat(str(reported_at).replace("Z", "+00:00")).timestamp()
    return at - (time.time() - (time.monotonic() - agent.rolled_back_at))


def _until(probe: Any, timeout_s: float, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise SystemExit(f"not settled within {timeout_s} s")
        time.sleep(every_s)


if __name__ == "__main__":
    main()
