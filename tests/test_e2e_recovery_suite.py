"""A seeded corruption and kill -9 suite over the agent's state directory, through real
``edge-agent daemon`` processes, a control plane on loopback and Mosquitto.

The baseline: a device enrolled, 1.0.0 committed, 3.0.0 rolled back by probation (rejected),
2.0.0 committed, a partial download on disk, the telemetry spool written. Each case copies it,
damages one file of it (truncated, bytes flipped or deleted, at seeded offsets) or kills the
daemon with SIGKILL at a seeded moment during an update, starts the daemon again and waits until
what it serves (local API) and what the control plane shows agree and no update is in flight.
It must come back serving, never on a rejected version while a good one is installed.

The CI form runs a handful of seeds; the ``slow`` form (``EDGEFLEET_SOAK=1`` or ``-m slow``)
runs many and prints the count of recoveries that ended on a rejected version (goal 0).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent.models.probation import UpdateJournal, rejected_versions
from agent.models.store import ModelStore
from agent.samples import DigitsData
from tests.agent.store import models
from tests.agent.updates.fleet import ControlPlane, free_port
from tests.test_e2e_fleet_truth import Agent, _wait
from tests.test_e2e_recovery import _committed, _device_ids, _reported, agent_config

pytestmark = pytest.mark.broker

SOAK = os.environ.get("EDGEFLEET_SOAK") == "1"
REJECTED = "3.0.0"  # rolled back by probation in the baseline
SETTLED = ("committed", "idle", "rolled_back", "failed")


@dataclass
class Fleet:
    cp: ControlPlane
    root: Path
    base: Path  # the baseline state directory (never run on directly after it is made)
    device_id: str
    broker: tuple[str, int]
    work: Path


@dataclass(frozen=True)
class Outcome:
    case: str
    served: str | None
    rejected: frozenset[str]
    installed: tuple[str, ...]
    crashed: bool
    phase: str  # as the control plane shows it

    @property
    def on_rejected(self) -> bool:
        good = [v for v in self.installed if v not in self.rejected]
        return self.served in self.rejected and bool(good)


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    digits_path: Path,
    digits: DigitsData,
    mqtt_broker: tuple[str, int],
) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("suite")
    cp = ControlPlane(work / "cp").start()
    try:
        cal = work / "cal.npz"
        np.savez(cal, input=digits.x_train[:64])
        dim = work / "cal-dim.npz"
        np.savez(dim, input=digits.x_train[:64] * 0.7)
        cp.push(digits_path, cal, name="digits", version="1.0.0")
        cp.push(
            models.shifted(digits_path, work / "v2.onnx", 5.0), cal, name="digits", version="2.0.0"
        )
        cp.push(models.erroring(digits_path, work / "v3.onnx"), dim, name="digits", version="3.0.0")
        cp.push(
            models.shifted(digits_path, work / "v4.onnx", 7.0), cal, name="digits", version="4.0.0"
        )
        root = cp.root_json(work / "root.json")
        base = work / "base"
        config = agent_config(work / "base.toml", base, cp, root, mqtt_broker, name="suite")
        agent = Agent(config, work / "base.log").start()
        try:
            device_id = _wait("enrollment", lambda: _device_ids(cp))[0]
            cp.deploy("digits", "1.0.0", device_id)
            _wait("1.0.0 committed", _committed(cp, device_id, "1.0.0"))
            cp.deploy("digits", REJECTED, device_id)
            _wait(
                "3.0.0 rolled back",
                lambda: _reported(cp, device_id).get("phase") == "rolled_back",
            )
            cp.deploy("digits", "2.0.0", device_id)
            _wait("2.0.0 committed", _committed(cp, device_id, "2.0.0"))
        finally:
            agent.stop()
        desired = cp.device(device_id)["desired"]["models"][0]
        artifact = cp.artifact_file("digits", "2.0.0").read_bytes()
        part = base / "downloads" / (desired["artifact_path"].replace("/", "_") + ".part")
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(artifact[: len(artifact) // 2])
        yield Fleet(cp, root, base, device_id, mqtt_broker, work)
    finally:
        cp.stop()


CATEGORIES = ("enrollment", "pointer", "journal", "spool", "partial", "model", "tuf")


def _targets(state: Path, category: str) -> list[Path]:
    """The files of one category of the state directory."""
    models_dir = state / "models" / "digits"
    found = {
        "enrollment": [state / "enrollment.json"],
        "pointer": [models_dir / "active.json"],
        "journal": [state / "updates" / "digits.json"],
        "spool": sorted((state / "spool").glob("spool.db*")),
        "partial": sorted((state / "downloads").glob("*.part")),
        # the versions that serve or served: damage forces a fall-back or a fetch again
        "model": sorted(p for v in ("1.0.0", "2.0.0") for p in (models_dir / v).rglob("*")),
        "tuf": sorted((state / "tuf").glob("*.json")),
    }[category]
    return [p for p in found if p.is_file()]


def _damage(path: Path, rng: random.Random) -> str:
    """Truncate, flip bytes or delete ``path`` (seeded); returns what was done."""
    size = path.stat().st_size
    how = rng.choice(("truncate", "flip", "delete"))
    if how == "delete":
        path.unlink()
        return "deleted"
    if how == "truncate" or size == 0:
        at = rng.randrange(size) if size else 0
        with path.open("r+b") as f:
            f.truncate(at)
        return f"truncated at {at} of {size}"
    data = bytearray(path.read_bytes())
    offsets = sorted(rng.randrange(size) for _ in range(rng.randint(1, 8)))
    for at in offsets:
        data[at] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return f"flipped bytes at {offsets}"


def _served(port: int) -> str | None:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/v2/models/digits", timeout=2)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    version: str | None = r.json()["parameters"]["version"]
    return version


def _settle(
    fleet: Fleet,
    state: Path,
    agent: Agent,
    port: int,
    *,
    since: datetime,
    target: str | None = None,
    timeout_s: float = 60,
) -> str:
    """Wait until the daemon serves a version and the control plane shows that same version
    with no update in flight, in a report made after ``since`` (and, with ``target``, once the
    update to it is over: serving it, or having given it up); returns the version."""

    def probe() -> str | None:
        assert agent.proc is not None
        assert agent.proc.poll() is None, "the daemon exited"
        served = _served(port)
        try:
            device_id = json.loads((state / "enrollment.json").read_bytes())["device_id"]
        except (OSError, ValueError, KeyError):
            return None
        device = fleet.cp.device(device_id)
        reported_at = device.get("reported_at")
        if not reported_at or datetime.fromisoformat(reported_at) < since:
            return None
        view = _reported(fleet.cp, device_id)
        if target is not None and target not in (served, view.get("target_version")):
            return None
        if served and view.get("active_version") == served and view.get("phase") in SETTLED:
            return served
        return None

    served: str = _wait("the daemon to settle", probe, timeout_s=timeout_s, every_s=0.1)
    return served


def _outcome(fleet: Fleet, case: str, state: Path, served: str | None, agent: Agent) -> Outcome:
    record = UpdateJournal(state).load("digits")
    device_id = json.loads((state / "enrollment.json").read_bytes())["device_id"]
    view = _reported(fleet.cp, device_id)
    return Outcome(
        case=case,
        served=served,
        rejected=rejected_versions(record) | {REJECTED},
        installed=tuple(ModelStore(state).versions("digits")),
        crashed=bool(agent.events("update_cycle_crashed") or agent.events("loop_check_crashed")),
        phase=f"{view.get('phase')}"
        + (f": {view['last_error']}" if view.get("last_error") else ""),
    )


def _start(fleet: Fleet, state: Path, name: str) -> tuple[Agent, int]:
    port = free_port()
    config = agent_config(
        fleet.work / f"{name}.toml",
        state,
        fleet.cp,
        fleet.root,
        fleet.broker,
        name="suite",
        api_port=port,
    )
    return Agent(config, fleet.work / f"{name}.log").start(), port


def corruption_case(fleet: Fleet, seed: int, category: str) -> Outcome:
    rng = random.Random(seed)
    state = fleet.work / f"corrupt-{seed}"
    shutil.copytree(fleet.base, state)
    target = rng.choice(_targets(state, category))
    what = f"seed {seed}: {target.relative_to(state)} {_damage(target, rng)}"
    since = datetime.now(timezone.utc)
    agent, port = _start(fleet, state, f"corrupt-{seed}")
    try:
        served = _settle(fleet, state, agent, port, since=since)
        return _outcome(fleet, what, state, served, agent)
    finally:
        agent.stop()
        shutil.rmtree(state, ignore_errors=True)


def kill_case(fleet: Fleet, seed: int) -> Outcome:
    """Kill -9 the daemon at a seeded moment of the update 2.0.0 -> 4.0.0, start it again."""
    rng = random.Random(seed)
    state = fleet.work / f"kill-{seed}"
    shutil.copytree(fleet.base, state)
    agent, port = _start(fleet, state, f"kill-{seed}")
    try:
        _wait("the update to start", lambda: agent.events("update_started"), every_s=0.02)
        delay = rng.uniform(0, 5)
        time.sleep(delay)
        agent.kill()
        what = f"seed {seed}: kill -9 {delay:.2f} s into the update to 4.0.0"
        since = datetime.now(timezone.utc)
        agent.start()
        served = _settle(fleet, state, agent, port, since=since, target="4.0.0")
        return _outcome(fleet, what, state, served, agent)
    finally:
        agent.stop()
        shutil.rmtree(state, ignore_errors=True)


def _check(outcomes: list[Outcome]) -> None:
    on_rejected = [o for o in outcomes if o.on_rejected]
    crashed = [o for o in outcomes if o.crashed]
    print(
        f"recovery suite: {len(outcomes)} cases, recoveries on a rejected version: "
        f"{len(on_rejected)}, update cycles that crashed: {len(crashed)}"
    )
    for o in outcomes:
        print(f"  {o.case} -> serving {o.served} ({o.phase}; installed {', '.join(o.installed)})")
    assert on_rejected == []
    assert crashed == []


SOAK_ROUNDS = 6  # seeds per category in the slow form


def test_damaged_state_files_recover_on_a_good_version(fleet: Fleet) -> None:
    _check([corruption_case(fleet, seed, c) for seed, c in enumerate(CATEGORIES, start=1)])


def test_kill_during_an_update_recovers_on_a_good_version(fleet: Fleet) -> None:
    fleet.cp.deploy("digits", "4.0.0", fleet.device_id)
    _check([kill_case(fleet, seed) for seed in (1, 2)])


@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="soak form: set EDGEFLEET_SOAK=1")
@pytest.mark.timeout(1800)
def test_recovery_soak(fleet: Fleet) -> None:
    outcomes = [
        corruption_case(fleet, 100 + i * len(CATEGORIES) + n, c)
        for i in range(SOAK_ROUNDS)
        for n, c in enumerate(CATEGORIES)
    ]
    fleet.cp.deploy("digits", "4.0.0", fleet.device_id)
    outcomes += [kill_case(fleet, seed) for seed in range(200, 212)]
    _check(outcomes)
