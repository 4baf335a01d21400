"""The update client: enrollment, desired-state polling, and carrying each update to the swap.

Owns the conversation with the control plane (enroll once with the bootstrap token and the hardware
profile, keep the device credential in ``<state_dir>/enrollment.json`` with mode 0600, poll ``GET
/v1/devices/{id}/desired-state`` with ``If-None-Match``, ``PUT .../reported-state``) and the order
of an update: signed metadata first (``agent.updates.signed``: the desired state's length and sha256
must match what the fleet's keys signed), then the resumable download into
``<state_dir>/downloads/`` (``agent.updates.download``), the install (``agent.models.store``) and
the swap with probation (``agent.models.activation``). Each phase is reported over HTTP and emitted
on the ``EventBus``. What to do next is decided by the pure ``agent.updates.plan``.

Every answer of the control plane is read against a size bound (``ResponseLimits``) and dropped
past it (``ResponseTooLargeError``); a desired state is checked entry by entry, so an entry that
breaks the contract is refused alone and reported while the valid ones still apply.

It never stops serving: the swap loads the new version beside the old one, and any failure leaves
the active version as it was. While the control plane is unreachable it backs off (doubling up to
``max_backoff_s``) and catches up when it answers again. Time (``monotonic``, ``sleep``) and
randomness (``rng``) are parameters.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as PydanticValidationError

from agent import __version__
from agent._fs import write_file_atomic
from agent.config import ControlPlaneConfig
from agent.contracts.enrollment import EnrollmentRequest, EnrollmentResponse
from agent.contracts.errors import ContractError
from agent.contracts.events import UpdateEvent
from agent.contracts.manifest import NAME_RE
from agent.contracts.profile import HardwareProfile
from agent.contracts.state import (
    DesiredModel,
    DesiredState,
    DesiredVariant,
    Phase,
    RefusedEntry,
    ReportedModel,
    ReportedState,
    bounded_text,
    parse_desired_state,
)
from agent.errors import (
    BundleError,
    ConfigError,
    DownloadError,
    ModelError,
    ResponseTooLargeError,
    StoreError,
    UpdateError,
    VerificationError,
)
from agent.events import EventBus
from agent.logs import get_logger
from agent.models.activation import ModelActivator
from agent.models.bundle import merge_bundles
from agent.models.probation import in_flight
from agent.models.store import InstalledVersion, ModelStore
from agent.updates.download import DownloadConfig, Downloader
from agent.updates.plan import (
    Attempt,
    PollSchedule,
    check_against_signed,
    plan,
    record_failure,
    target_key,
)
from agent.updates.signed import SignedMetadata

__all__ = ["Activators", "DeviceCredential", "ResponseLimits", "UpdateClient"]

log = get_logger(__name__)

CREDENTIAL_FILE = "enrollment.json"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class ResponseLimits:
    """How many bytes each answer of the control plane may hold; past it, the rest is not read."""

    desired_state: int = 1024 * 1024  # bytes
    enrollment: int = 64 * 1024  # bytes
    other: int = 1024 * 1024  # bytes: reported-state acknowledgements, error bodies


@dataclass(frozen=True)
class _Answer:
    """An HTTP answer read whole, within its bound."""

    status_code: int
    headers: httpx.Headers
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class DeviceCredential(BaseModel):
    """``<state_dir>/enrollment.json``: who this device is to the control plane (mode 0600)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    control_plane_url: str
    device_id: str
    credential: str
    enrolled_at: datetime


class Activators(Protocol):
    """The served models: one ``ModelActivator`` per model name, created on first use."""

    def get(self, name: str) -> ModelActivator: ...

    def names(self) -> Sequence[str]: ...


class _UnreachableError(Exception):
    """The control plane did not answer usefully; back off and try again."""


class UpdateClient:
    """Keeps this device on its desired state. ``run(stop)`` in a thread, or ``tick()`` by hand."""

    def __init__(
        self,
        *,
        state_dir: Path,
        config: ControlPlaneConfig,
        store: ModelStore,
        activators: Activators,
        bus: EventBus,
        device_name: str,
        profile: Callable[[], HardwareProfile],
        http: httpx.Client | None = None,
        download_config: DownloadConfig | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        disk_free: Callable[[Path], int] | None = None,
        max_backoff_s: float = 600.0,
        retry_base_s: float | None = None,
        probation_check_s: float = 1.0,
        request_timeout_s: float = 10.0,
        response_limits: ResponseLimits | None = None,
        max_variants: int = 1,
    ) -> None:
        if not config.url:
            raise ConfigError("control_plane.url is not set: the update client needs it")
        self._url = config.url.rstrip("/")
        self._config = config
        self._state_dir = state_dir
        self._downloads = state_dir / "downloads"
        self._max_variants = max_variants
        self._store = store
        self._activators = activators
        self._bus = bus
        self._device_name = _safe_name(device_name)
        self._profile = profile
        self._labels = dict(config.labels)
        self._own_http = http is None
        self._http = http or httpx.Client(timeout=request_timeout_s)
        self._monotonic = monotonic
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._schedule = PollSchedule(
            config.poll_interval_s, config.poll_jitter, max_backoff_s, self._rng
        )
        self._retry_base_s = retry_base_s if retry_base_s is not None else config.poll_interval_s
        self._max_backoff_s = max_backoff_s
        self._probation_check_s = probation_check_s
        self._limits = response_limits or ResponseLimits()
        dl_config = download_config or DownloadConfig()
        if config.bandwidth_limit_bps and dl_config.bandwidth_limit_bps is None:
            dl_config = DownloadConfig(
                **{**dl_config.__dict__, "bandwidth_limit_bps": config.bandwidth_limit_bps}
            )
        kwargs: dict[str, Any] = {"disk_free": disk_free} if disk_free is not None else {}
        self._downloader = Downloader(
            self._http, dl_config, sleep=sleep, monotonic=monotonic, rng=self._rng, **kwargs
        )
        self._signed = SignedMetadata(
            state_dir / "tuf",
            f"{self._url}/tuf/",
            self._http,
            provisioned_root=config.tuf_root_path,
        )
        self._credential: DeviceCredential | None = None
        self._etag: str | None = None
        self._desired: DesiredState | None = None
        self._refused: tuple[RefusedEntry, ...] = ()
        self._online = False
        self._attempts: dict[str, Attempt] = {}
        self._rejected: dict[str, str] = {}
        self._reported: dict[str, ReportedModel] = {}
        self._updating: dict[str, str] = {}  # model -> version being carried through
        self._report_pending = False
        self._nudge = threading.Event()
        self._lock = threading.RLock()  # one cycle at a time
        # Reported state: also updated from the slot's loader thread (bus events) mid-swap.
        self._report_lock = threading.RLock()
        self._unsubscribe = bus.subscribe(self._on_event)

    # --- public ------------------------------------------------------------------------------

    @property
    def credential(self) -> DeviceCredential | None:
        return self._credential

    @property
    def desired(self) -> DesiredState | None:
        return self._desired

    def reported(self) -> ReportedState:
        """What this device would report now."""
        with self._report_lock:
            return self._reported_state()

    def check_now(self) -> None:
        """Poll at once instead of waiting for the interval (the MQTT ``check-update`` nudge)."""
        self._nudge.set()

    def run(self, stop: threading.Event) -> None:
        """Tick until ``stop`` is set; sleeps between ticks wake early on ``check_now()``."""
        while not stop.is_set():
            try:
                delay = self.tick()
            except Exception:  # the update thread must outlive any bug in one cycle
                log.exception("update_cycle_crashed")
                delay = self._schedule.failed()
            self._nudge.wait(delay)
            self._nudge.clear()

    def close(self) -> None:
        self._unsubscribe()
        if self._own_http:
            self._http.close()

    def tick(self) -> float:
        """One cycle: enroll if needed, poll, apply, judge probation, report. Returns the
        seconds until the next cycle."""
        with self._lock:
            try:
                self._ensure_enrolled()
                desired = self._poll()
            except ResponseTooLargeError as exc:
                delay = self._schedule.failed()
                log.warning(
                    "control_plane_answer_too_large",
                    answer=exc.what,
                    limit=exc.limit,
                    reason=str(exc),
                    retry_in_s=round(delay, 1),
                )
                self._judge_probation()
                return self._next(delay)
            except _UnreachableError as exc:
                delay = self._schedule.failed()
                if self._online or self._schedule.failures == 1:
                    log.warning(
                        "control_plane_unreachable",
                        reason=str(exc),
                        failures=self._schedule.failures,
                        retry_in_s=round(delay, 1),
                    )
                self._online = False
                self._judge_probation()
                return self._next(delay)
            self._online = True
            delay = self._schedule.succeeded()
            if desired is not None:
                self._apply(desired)
            self._judge_probation()
            with self._report_lock:
                self._refresh_reported()
            if self._report_pending:
                self._send_report()
            return self._next(delay)

    # --- enrollment ----------------------------------------------------------------------------

    def _credential_path(self) -> Path:
        return self._state_dir / CREDENTIAL_FILE

    def _ensure_enrolled(self) -> None:
        if self._credential is None:
            self._credential = self._load_credential() or self._enroll()
            self._http.headers["Authorization"] = f"Bearer {self._credential.credential}"

    def _load_credential(self) -> DeviceCredential | None:
        path = self._credential_path()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UpdateError(f"cannot read the device credential {path}: {exc}") from exc
        try:
            cred = DeviceCredential.model_validate_json(data)
        except PydanticValidationError as exc:
            raise UpdateError(f"the device credential {path} is corrupt: {exc}") from exc
        if cred.control_plane_url != self._url:
            log.warning(
                "credential_for_other_control_plane",
                enrolled_with=cred.control_plane_url,
                configured=self._url,
            )
        return cred

    def _enroll(self) -> DeviceCredential:
        token = self._config.bootstrap_token
        if not token:
            raise ConfigError(
                "not enrolled and control_plane.bootstrap_token is not set: the device cannot "
                "join the fleet"
            )
        body = EnrollmentRequest(
            bootstrap_token=token,
            name=self._device_name,
            profile=self._profile(),
            labels=self._labels,
        )
        response = self._request(
            "POST",
            "/v1/devices/enroll",
            what="enrollment",
            limit=self._limits.enrollment,
            json=body.model_dump(mode="json"),
        )
        if response.status_code != 201:
            raise _UnreachableError(
                f"enrollment answered HTTP {response.status_code}: {_brief(response)}"
            )
        try:
            answer = EnrollmentResponse.model_validate_json(response.content)
        except PydanticValidationError as exc:
            raise _UnreachableError(f"enrollment answer does not parse: {exc}") from exc
        cred = DeviceCredential(
            control_plane_url=self._url,
            device_id=answer.device_id,
            credential=answer.credential,
            enrolled_at=datetime.now(timezone.utc),
        )
        self._state_dir.mkdir(parents=True, exist_ok=True)
        path = self._credential_path()
        # Written 0600 from the start: the credential never exists world-readable.
        write_file_atomic(path, cred.model_dump_json().encode(), mode=0o600)
        log.info("device_enrolled", device_id=cred.device_id, control_plane=self._url)
        return cred

    # --- desired state -------------------------------------------------------------------------

    def _poll(self) -> DesiredState | None:
        assert self._credential is not None
        headers = {"If-None-Match": self._etag} if self._etag else {}
        response = self._request(
            "GET",
            f"/v1/devices/{self._credential.device_id}/desired-state",
            what="desired state",
            limit=self._limits.desired_state,
            headers=headers,
        )
        if response.status_code == 304:
            return self._desired
        if response.status_code != 200:
            raise _UnreachableError(
                f"desired state answered HTTP {response.status_code}: {_brief(response)}"
            )
        try:
            parsed = parse_desired_state(response.content)
        except ContractError as exc:
            raise _UnreachableError(str(exc)) from exc
        desired = parsed.state
        self._note_refused(parsed.refused)
        self._etag = response.headers.get("ETag")
        if self._desired is None or desired.generation != self._desired.generation:
            log.info(
                "desired_state_changed",
                generation=desired.generation,
                models={m.name: m.version for m in desired.models},
            )
        self._desired = desired
        return desired

    def _note_refused(self, refused: tuple[RefusedEntry, ...]) -> None:
        """Entries of the desired state that break the contract: each is logged once, emitted
        when its name is usable, and reported until the desired state no longer holds it."""
        known = {(r.index, r.name, r.reason) for r in self._refused}
        for entry in refused:
            if (entry.index, entry.name, entry.reason) in known:
                continue
            log.warning(
                "desired_entry_refused", index=entry.index, model=entry.name, reason=entry.reason
            )
            if _NAME_CHARS.issuperset(entry.name) and entry.name[:1].isalnum():
                self._bus.emit("refused", model=entry.name, reason=entry.reason)
        if refused != self._refused:
            with self._report_lock:
                self._refused = refused
                self._report_pending = True

    def _request(self, method: str, path: str, *, what: str, limit: int, **kwargs: Any) -> _Answer:
        """One request; the answer is read up to ``limit`` bytes and refused past it."""
        url = f"{self._url}{path}"
        try:
            with self._http.stream(method, url, **kwargs) as response:
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise ResponseTooLargeError(
                        f"{what} answer of {declared} bytes is over the {limit}-byte bound",
                        what=what,
                        limit=limit,
                    )
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise ResponseTooLargeError(
                            f"{what} answer is over the {limit}-byte bound; the rest was not read",
                            what=what,
                            limit=limit,
                        )
                return _Answer(response.status_code, response.headers, bytes(body))
        except httpx.HTTPError as exc:
            raise _UnreachableError(f"{type(exc).__name__}: {exc}") from exc

    # --- applying ------------------------------------------------------------------------------

    def _serving(self, name: str) -> str | None:
        if name in self._activators.names():
            version = self._activators.get(name).slot.version
            if version:
                return version
        return None

    def _apply(self, desired: DesiredState) -> None:
        for name in self._activators.names():
            record = self._activators.get(name).record()
            if (
                record is not None
                and record.phase in ("failed", "rolled_back")
                and record.to_version
                and name not in self._rejected
            ):
                self._rejected[name] = record.to_version
        decisions = plan(
            desired,
            serving={m.name: self._serving(m.name) for m in desired.models},
            rejected=self._rejected,
            attempts=self._attempts,
            now=self._monotonic(),
        )
        self._prune_downloads(desired.models)
        for decision in decisions:
            model = decision.model
            if decision.action != "update":
                continue
            if model.name in self._activators.names() and in_flight(
                self._activators.get(model.name).record()
            ):
                continue  # a verdict on the version on probation comes first
            try:
                self._update(model)
            except Exception as exc:  # one entry failing must not skip the entries after it
                log.exception("update_crashed", model=model.name, version=model.version)
                self._fail(model, target_key(model), f"{type(exc).__name__}: {exc}", step="failed")

    def _download_path(self, model: DesiredModel | DesiredVariant) -> Path:
        """One file directly under ``downloads/``: the contract's artifact paths have no empty,
        ``.`` or ``..`` segment, and this refuses anything that would still land elsewhere."""
        path = self._downloads / model.artifact_path.replace("/", "_")
        if path.parent != self._downloads or path.name.startswith("."):
            raise _RefusedError(f"artifact path {model.artifact_path!r} leaves downloads/")
        return path

    def _prune_downloads(self, wanted: Sequence[DesiredModel]) -> None:
        """Partial downloads of targets no longer desired would only take space."""
        if not self._downloads.is_dir():
            return
        keep: set[str] = set()
        for model in wanted:
            for offered in self._variants_to_fetch(model):
                with contextlib.suppress(_RefusedError):
                    keep.add(self._download_path(offered).name)
        keep |= {f"{n}.part" for n in keep}
        for path in self._downloads.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)
                log.info("download_discarded", path=str(path), reason="no longer desired")

    def _update(self, model: DesiredModel) -> None:
        name, version = model.name, model.version
        key = target_key(model)
        dest = self._download_path(model)
        from_version = self._serving(name)
        self._updating[name] = version
        log.info("update_started", model=name, version=version, from_version=from_version)
        self._phase(name, "downloading", target=version, error=None)
        self._bus.emit(
            "download_started",
            model=name,
            version=version,
            from_version=from_version,
            variant_id=model.variant_id,
            size=model.size,
        )
        extras: list[Path] = []
        try:
            self._fetch_variant(model, model, dest)
            # The other fitting variants the device measures before it serves one. One that
            # cannot be fetched or verified is left out (logged); the first is required.
            for offered in self._variants_to_fetch(model)[1:]:
                extra = self._download_path(offered)
                try:
                    self._fetch_variant(model, offered, extra)
                except (_RefusedError, DownloadError) as exc:
                    log.warning(
                        "variant_not_fetched",
                        model=name,
                        version=version,
                        variant_id=offered.variant_id,
                        reason=str(exc),
                    )
                    continue
                extras.append(extra)
            self._phase(name, "installing")
            try:
                installed = self._install(dest, extras)
            except BundleError as exc:
                raise _RefusedError(f"bundle refused at install: {exc}") from exc
            if (installed.name, installed.version) != (name, version):
                if not installed.already_present:
                    with contextlib.suppress(StoreError):
                        self._store.remove(installed.name, installed.version, reason="unexpected")
                raise _RefusedError(
                    f"{model.artifact_path} holds {installed.name} {installed.version}, "
                    f"not {name} {version}"
                )
            self._phase(name, "loading")
            self._activators.get(name).update(version)
        except _RefusedError as exc:
            for path in (dest, dest.with_name(dest.name + ".part")):
                path.unlink(missing_ok=True)
            self._fail(model, key, f"refused: {exc}", step="refused")
        except DownloadError as exc:
            # Partial bytes stay on disk: the next attempt resumes where this one stopped.
            self._fail(model, key, str(exc), step="download_failed")
        except StoreError as exc:
            self._fail(model, key, str(exc), step="failed")
        except ModelError as exc:
            # The version does not load or validate here: the activator removed it and the old
            # version kept serving. Not retried until the desired version changes.
            self._rejected[name] = version
            self._updating.pop(name, None)
            self._phase(name, "failed", error=str(exc))
            self._send_report()
            dest.unlink(missing_ok=True)
        else:
            dest.unlink(missing_ok=True)
            for path in extras:
                path.unlink(missing_ok=True)
            self._attempts.pop(key, None)
            self._phase(name, "probation")
            log.info("update_swapped", model=name, version=version, from_version=from_version)
            self._judge_probation()

    def _variants_to_fetch(self, model: DesiredModel) -> tuple[DesiredVariant, ...]:
        """The offered variants this device fetches: the first alone when it does not measure,
        else the first ``max_variants`` (best first by the variant contract)."""
        offered = model.offered()
        return offered[: self._max_variants] if self._max_variants > 1 else offered[:1]

    def _fetch_variant(
        self, model: DesiredModel, offered: DesiredVariant | DesiredModel, dest: Path
    ) -> None:
        """Download one variant's archive to ``dest`` once the signed metadata agrees with the
        desired state; ``_RefusedError`` on any disagreement, ``DownloadError`` to retry."""
        name, version = model.name, model.version
        try:
            signed = self._signed.target(offered.artifact_path)
        except VerificationError as exc:
            raise _RefusedError(f"signed metadata refused: {exc}") from exc
        refusal = check_against_signed(offered, signed.length, signed.sha256)
        if refusal is not None:
            raise _RefusedError(refusal.reason)
        try:
            result = self._downloader.fetch(
                f"{self._url}/v1/artifacts/{offered.artifact_path}",
                dest,
                length=signed.length,
                sha256=signed.sha256,
            )
        except VerificationError as exc:
            raise _RefusedError(str(exc)) from exc
        self._bus.emit(
            "download_finished",
            model=name,
            version=version,
            variant_id=offered.variant_id,
            bytes=result.size,
            transferred=result.bytes_transferred,
            resumed_from=result.resumed_from,
            attempts=result.attempts,
        )
        self._phase(name, "verifying")
        self._bus.emit(
            "verified",
            model=name,
            version=version,
            variant_id=offered.variant_id,
            sha256=signed.sha256,
        )

    def _install(self, primary: Path, extras: Sequence[Path]) -> InstalledVersion:
        """Install the primary archive, or every fetched variant merged into one version."""
        if not extras:
            return self._store.install(primary)
        merged = self._downloads / f".merged-{primary.name}"
        shutil.rmtree(merged, ignore_errors=True)
        try:
            merge_bundles([primary, *extras], merged)
            return self._store.install(merged)
        finally:
            shutil.rmtree(merged, ignore_errors=True)

    def _fail(
        self,
        model: DesiredModel,
        key: str,
        reason: str,
        *,
        step: Literal["refused", "download_failed", "failed"],
    ) -> None:
        attempt = record_failure(
            self._attempts.get(key),
            key,
            reason,
            now=self._monotonic(),
            base_s=self._retry_base_s,
            max_s=self._max_backoff_s,
            rng=self._rng,
        )
        self._attempts[key] = attempt
        self._updating.pop(model.name, None)
        log.warning(
            "update_not_applied",
            model=model.name,
            version=model.version,
            step=step,
            reason=reason,
            failures=attempt.failures,
        )
        self._bus.emit(
            step, model=model.name, version=model.version, reason=reason, failures=attempt.failures
        )
        self._phase(model.name, "failed", error=reason)
        self._send_report()

    # --- probation -----------------------------------------------------------------------------

    def _in_probation(self) -> list[str]:
        out = []
        for name in self._activators.names():
            record = self._activators.get(name).record()
            if record is not None and record.phase == "probation":
                out.append(name)
        return out

    def _judge_probation(self) -> None:
        for name in self._in_probation():
            activator = self._activators.get(name)
            record = activator.record()
            verdict = activator.check()
            if verdict is None or verdict.action == "wait":
                continue
            self._updating.pop(name, None)
            if verdict.action == "commit":
                self._phase(name, "committed", error=None)
            else:
                if record is not None and record.to_version:
                    self._rejected[name] = record.to_version
                self._phase(name, "rolled_back", error=verdict.reason)
            self._send_report()

    def _next(self, delay: float) -> float:
        if self._in_probation():
            return min(delay, self._probation_check_s)
        return delay

    # --- reporting -----------------------------------------------------------------------------

    def _on_event(self, event: UpdateEvent) -> None:
        if self._updating.get(event.model) != event.version:
            return
        if event.step == "loaded":
            self._phase(event.model, "validating")
        elif event.step == "validated":
            self._phase(event.model, "swapping")

    def _phase(
        self,
        name: str,
        phase: Phase,
        *,
        target: str | Literal[False] | None = False,
        error: str | Literal[False] | None = False,
    ) -> None:
        with self._report_lock:
            current = self._reported.get(name) or ReportedModel(name=name)
            update: dict[str, Any] = {"phase": phase}
            if target is not False:
                update["target_version"] = target
            if error is not False:
                update["last_error"] = None if error is None else bounded_text(error)
            self._reported[name] = current.model_copy(update=update)
            self._refresh_reported()
            self._report_pending = True
            if self._online:
                self._send_report()

    def _refresh_reported(self) -> None:
        for name in self._activators.names():
            slot = self._activators.get(name).slot
            current = self._reported.get(name) or ReportedModel(name=name)
            serving = slot.current
            self._reported[name] = current.model_copy(
                update={
                    "active_version": slot.version or None,
                    "variant_id": serving.variant_id if serving else None,
                    "backend": serving.backend if serving else None,
                    "device": bounded_text(serving.device, 64) if serving else None,
                    "choice": bounded_text(serving.choice) if serving and serving.choice else None,
                }
            )

    def _reported_state(self) -> ReportedState:
        return ReportedState(
            device_id=self._credential.device_id if self._credential else "",
            agent_version=__version__,
            generation_seen=self._desired.generation if self._desired else None,
            models=tuple(self._reported[n] for n in sorted(self._reported)),
            refused=self._refused,
            updated_at=datetime.now(timezone.utc),
        )

    def _send_report(self) -> None:
        with self._report_lock:
            self._send_report_locked()

    def _send_report_locked(self) -> None:
        if self._credential is None:
            return
        body = self._reported_state().model_dump(mode="json")
        try:
            response = self._request(
                "PUT",
                f"/v1/devices/{self._credential.device_id}/reported-state",
                what="reported state",
                limit=self._limits.other,
                json=body,
            )
        except (_UnreachableError, ResponseTooLargeError) as exc:
            self._online = False
            self._report_pending = True
            log.info("report_deferred", reason=str(exc))
            return
        if response.status_code >= 400:
            self._report_pending = True
            log.warning("report_refused", status=response.status_code, body=_brief(response))
            return
        self._report_pending = False


class _RefusedError(Exception):
    """A target, its metadata or its bundle was refused for security or integrity reasons."""


def _brief(response: _Answer) -> str:
    return response.text[:200]


def _safe_name(name: str) -> str:
    import re

    cleaned = "".join(c if c in _NAME_CHARS else "-" for c in name).lstrip("._-") or "device"
    cleaned = cleaned[:64]
    if not re.match(NAME_RE, cleaned):
        raise ConfigError(f"device name {name!r} cannot be made into a valid name")
    return cleaned
