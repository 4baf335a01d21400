"""The update client: enrollment, desired-state polling, and carrying each update to the swap.

Owns the conversation with the control plane (enroll once with the bootstrap token and the hardware
profile, keep the device credential in ``<state_dir>/enrollment.json`` with mode 0600, poll ``GET
/v1/devices/{id}/desired-state`` with ``If-None-Match``, ``PUT .../reported-state``) and the order
of an update: signed metadata first (``agent.updates.signed``: the desired state's length and sha256
must match what the fleet's keys signed), then the resumable download into
``<state_dir>/downloads/`` (``agent.updates.download``), the install (``agent.models.store``) and
the swap with probation (``agent.models.activation``). Each phase is reported over HTTP and emitted
on the ``EventBus``. What to do next is decided by the pure ``agent.updates.plan``; what to report
by the pure ``agent.updates.report``, from what serves, the update journal and what this client
knows (its step in progress, the versions it refuses and why). Reports go out from this client's
own thread only: event-bus subscribers (a swap's loader thread, a rollback commanded over MQTT)
record and wake it, and a swap runs on a helper thread while this thread reports its steps.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as PydanticValidationError

from agent import __version__
from agent._fs import write_file_atomic
from agent.config import ControlPlaneConfig
from agent.contracts.enrollment import (
    CREDENTIAL_HEADER,
    ROTATE,
    CredentialResponse,
    EnrollmentRequest,
    EnrollmentResponse,
)
from agent.contracts.errors import ContractError
from agent.contracts.events import (
    EVENTS_SINCE_HEADER,
    EVENTS_STORED_HEADER,
    UpdateEvent,
    parse_stored,
)
from agent.contracts.manifest import NAME_RE
from agent.contracts.profile import HardwareProfile
from agent.contracts.state import (
    DesiredModel,
    DesiredShadow,
    DesiredState,
    DesiredVariant,
    Phase,
    RefusedEntry,
    ReportedState,
    parse_desired_state,
)
from agent.errors import (
    BundleError,
    ConfigError,
    DownloadError,
    EnrollmentError,
    LocalIOError,
    ModelError,
    ResponseTooLargeError,
    StoreError,
    TransientError,
    VerificationError,
)
from agent.events import EventBus
from agent.logs import get_logger
from agent.models.activation import ModelActivator
from agent.models.bundle import merge_bundles
from agent.models.probation import UpdateRecord, in_flight
from agent.models.store import InstalledVersion, ModelStore
from agent.shadow import ShadowHost
from agent.updates.delta import BaseArchives, DeltaFetcher, DeltaUnusableError
from agent.updates.download import DownloadConfig, Downloader
from agent.updates.plan import (
    Attempt,
    PollSchedule,
    check_against_signed,
    plan,
    record_failure,
    target_key,
)
from agent.updates.report import (
    FailureClass,
    LoopStatus,
    ModelFacts,
    Progress,
    Rejection,
    Serving,
    reported_model,
)
from agent.updates.signed import SignedMetadata, SignedTarget

__all__ = ["Activators", "DeviceCredential", "EventAcks", "ResponseLimits", "UpdateClient"]

log = get_logger(__name__)

CREDENTIAL_FILE = "enrollment.json"
_T = TypeVar("_T")
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


class EventAcks(Protocol):
    """The spool's side of the end-to-end confirmation of events (the telemetry client)."""

    def pending_event_seq(self) -> int | None: ...

    def confirm_events(self, seqs: Sequence[int]) -> int: ...


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
        loop_health: Callable[[], Mapping[str, LoopStatus]] | None = None,
        shadows: ShadowHost | None = None,
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
        self._bases = BaseArchives(state_dir / "bases")
        self._deltas = DeltaFetcher(
            bases=self._bases,
            downloads=self._downloads,
            # A delta is an optimisation: a few quick attempts, then the full archive.
            downloader=Downloader(
                self._http,
                DownloadConfig(**{**dl_config.__dict__, "max_attempts": 3, "backoff_max_s": 5.0}),
                sleep=sleep,
                monotonic=monotonic,
                rng=self._rng,
                **kwargs,
            ),
            signed=lambda path: _length_sha(self._signed.target(path)),
            url_of=lambda path: f"{self._url}/v1/artifacts/{path}",
        )
        self._credential: DeviceCredential | None = None
        self._enrollment_problem: str | None = None
        # Set by the daemon once MQTT runs: each poll asks which spooled events were stored.
        self.event_acks: EventAcks | None = None
        self._etag: str | None = None
        self._desired: DesiredState | None = None
        self._refused: tuple[RefusedEntry, ...] = ()
        self._online = False
        self._attempts: dict[str, Attempt] = {}
        # model -> (version, generation of the desired entry it was rejected under), and why
        self._rejected: dict[str, tuple[str, int]] = {}
        self._rejected_why: dict[str, str] = {}
        self._refusals_logged: set[tuple[str, str, int]] = set()
        self._failures: dict[str, Rejection] = {}  # the last failed attempt, retried later
        self._journal_seen: dict[str, float] = {}  # journal records already turned into facts
        self._waiting: dict[str, str] = {}  # why a version on probation cannot commit yet
        self._loop_health = loop_health or dict
        self._shadows = shadows
        # Facts recorded from other threads (bus subscribers) under this lock; read by this one.
        self._report_lock = threading.RLock()
        self._progress: dict[str, Progress] = {}  # model -> the step carried out now
        self._last_sent: dict[str, Any] | None = None
        self._report_pending = False
        self._wake = threading.Event()
        self._poll_requested = False
        self._lock = threading.RLock()  # one cycle at a time
        self._unsubscribe = bus.subscribe(self._on_event)

    # --- public ------------------------------------------------------------------------------

    @property
    def credential(self) -> DeviceCredential | None:
        return self._credential

    @property
    def enrollment_problem(self) -> str | None:
        """Why this device is not on the fleet (no usable credential, cannot enroll), or None."""
        return self._enrollment_problem

    @property
    def desired(self) -> DesiredState | None:
        return self._desired

    def reported(self) -> ReportedState:
        """What this device would report now: ``agent.updates.report`` over the current facts."""
        return self._reported_state()

    def check_now(self) -> None:
        """Poll at once instead of waiting for the interval (the MQTT ``check-update`` nudge)."""
        self._poll_requested = True
        self._wake.set()

    def notify_changed(self) -> None:
        """Something a report depends on changed (what serves, a loop's health): report it
        from this client's thread soon. Safe from any thread; does no I/O."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Tick until ``stop`` is set. Between ticks it wakes early on ``check_now()`` (a poll)
        and on ``notify_changed()`` or a bus event that changes what serves (a report)."""
        while not stop.is_set():
            try:
                delay = self.tick()
            except Exception:  # the update thread must outlive any bug in one cycle
                log.exception("update_cycle_crashed")
                delay = self._schedule.failed()
            deadline = self._monotonic() + delay
            while not stop.is_set() and not self._poll_requested:
                left = deadline - self._monotonic()
                if left <= 0 or not self._wake.wait(left):
                    break
                self._wake.clear()
                if stop.is_set() or self._poll_requested:
                    break
                try:
                    with self._lock:
                        self._report()
                except Exception:
                    log.exception("report_crashed")
            self._poll_requested = False

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
            except EnrollmentError as exc:
                # Off the fleet until an operator acts: keep serving, say so once per cause,
                # and look again (a restored file or a new token) at the longest backoff.
                if self._enrollment_problem != str(exc):
                    log.error("device_not_enrolled", reason=str(exc), serving="unchanged")
                self._enrollment_problem = str(exc)
                self._judge_probation()
                return self._next(self._max_backoff_s)
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
            self._enrollment_problem = None
            delay = self._schedule.succeeded()
            if desired is not None:
                self._apply(desired)
            self._judge_probation()
            self._report()
            return self._next(delay)

    # --- enrollment ----------------------------------------------------------------------------

    def _credential_path(self) -> Path:
        return self._state_dir / CREDENTIAL_FILE

    def _ensure_enrolled(self) -> None:
        if self._credential is None:
            self._credential = self._load_credential() or self._enroll()
            self._http.headers["Authorization"] = f"Bearer {self._credential.credential}"

    def _load_credential(self) -> DeviceCredential | None:
        """The saved credential, or None when there is none to use. A file that does not parse
        (truncated, corrupt) is set aside as ``enrollment.json.corrupt`` when a bootstrap token
        can enroll the device again; without one it stays and ``EnrollmentError`` says why."""
        path = self._credential_path()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EnrollmentError(f"cannot read the device credential {path}: {exc}") from exc
        try:
            cred = DeviceCredential.model_validate_json(data)
        except PydanticValidationError as exc:
            problem = f"the device credential {path} is corrupt ({exc.error_count()} errors)"
            if not self._config.bootstrap_token:
                raise EnrollmentError(
                    f"{problem} and control_plane.bootstrap_token is not set: restore the "
                    "file or configure a bootstrap token to enroll again"
                ) from exc
            aside = path.with_name(path.name + ".corrupt")
            try:
                path.replace(aside)
            except OSError as move_exc:
                raise EnrollmentError(f"{problem}; cannot set it aside: {move_exc}") from exc
            log.error(
                "credential_corrupt",
                path=str(path),
                kept_as=str(aside),
                bytes=len(data),
                action="enrolling again with the bootstrap token",
            )
            return None
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
            raise EnrollmentError(
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
        self._save_credential(cred)
        log.info("device_enrolled", device_id=cred.device_id, control_plane=self._url)
        return cred

    def _save_credential(self, cred: DeviceCredential) -> None:
        self._state_dir.mkdir(parents=True, exist_ok=True)
        # Written 0600 from the start: the credential never exists world-readable.
        write_file_atomic(self._credential_path(), cred.model_dump_json().encode(), mode=0o600)

    def _rotate_credential(self) -> None:
        """The control plane asked for a new credential (``Edgefleet-Credential: rotate``):
        fetch it with the current one, keep it on disk, then use it. The old one stays valid
        on the control plane until the new one is first used, so a crash or a lost answer
        here is harmless: the next poll asks again and the old credential fetches again."""
        assert self._credential is not None
        old = self._credential
        response = self._request(
            "POST",
            f"/v1/devices/{old.device_id}/credential",
            what="credential",
            limit=self._limits.enrollment,
        )
        if response.status_code != 200:
            log.warning(
                "credential_rotation_failed",
                status=response.status_code,
                reason=_brief(response),
            )
            return
        try:
            answer = CredentialResponse.model_validate_json(response.content)
        except PydanticValidationError as exc:
            log.warning("credential_rotation_failed", reason=f"answer does not parse: {exc}")
            return
        if answer.device_id != old.device_id:
            log.warning("credential_rotation_failed", reason="answer names another device")
            return
        cred = old.model_copy(update={"credential": answer.credential})
        self._save_credential(cred)  # on disk before first use: never lose the new one
        self._credential = cred
        self._http.headers["Authorization"] = f"Bearer {cred.credential}"
        log.info("credential_rotated", device_id=cred.device_id)

    # --- desired state -------------------------------------------------------------------------

    def _poll(self) -> DesiredState | None:
        assert self._credential is not None
        headers = {"If-None-Match": self._etag} if self._etag else {}
        acks = self.event_acks
        since = acks.pending_event_seq() if acks is not None else None
        if since is not None:
            headers[EVENTS_SINCE_HEADER] = str(since)
        response = self._request(
            "GET",
            f"/v1/devices/{self._credential.device_id}/desired-state",
            what="desired state",
            limit=self._limits.desired_state,
            headers=headers,
        )
        if acks is not None and since is not None and response.status_code in (200, 304):
            stored = parse_stored(response.headers.get(EVENTS_STORED_HEADER))
            if stored:
                acks.confirm_events(stored)
        if response.status_code in (200, 304) and response.headers.get(CREDENTIAL_HEADER) == ROTATE:
            self._rotate_credential()
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
        self._refused = refused

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

    def _sync_journal(self) -> None:
        """A journal that says an update failed or was rolled back (by probation, a command,
        boot recovery, a technician, or before this process started) makes that version
        rejected under the desired entry as it is now."""
        if self._desired is None:
            return  # rejected under a generation only once the desired state is known
        for name in self._activators.names():
            record = self._activators.get(name).record()
            if (
                record is None
                or record.phase not in ("failed", "rolled_back")
                or not record.to_version
                or self._journal_seen.get(name) == record.updated_at
            ):
                continue
            self._journal_seen[name] = record.updated_at
            if record.to_version != self._serving(name):
                why = record.reason or record.phase
                if record.phase == "rolled_back":
                    why = f"rolled back: {why}"
                self._reject(name, record.to_version, self._desired, why)

    def _apply(self, desired: DesiredState) -> None:
        self._sync_journal()
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
            if decision.action == "rejected":
                self._log_refusal(model)
                continue
            if decision.action != "update":
                continue
            if model.name in self._activators.names():
                activator = self._activators.get(model.name)
                if in_flight(activator.record()) and not activator.awaiting_evidence():
                    continue  # a verdict on the version on probation comes first
            if self._rejected.get(model.name, ("",))[0] == model.version:
                log.info(
                    "rejected_version_offered_again",
                    model=model.name,
                    version=model.version,
                    generation=model.generation,
                )
                del self._rejected[model.name]
                self._rejected_why.pop(model.name, None)
            try:
                self._update(model)
            except Exception as exc:  # one entry failing must not skip the entries after it
                log.exception("update_crashed", model=model.name, version=model.version)
                self._fail(model, target_key(model), f"{type(exc).__name__}: {exc}", step="failed")
        self._sync_shadows(desired)

    # --- shadows -----------------------------------------------------------------------------

    def _sync_shadows(self, desired: DesiredState) -> None:
        """Start the shadows the desired state asks for (download, install, load beside the
        serving version) and stop the ones it no longer names. A shadow that failed or was
        refused is tried again only when the control plane offers it anew."""
        host = self._shadows
        if host is None:
            return
        wanted = {m.name: m.shadow for m in desired.models if m.shadow is not None}
        for name in host.names():
            if name not in wanted:
                host.stop(name)
                self._report_pending = True
        for name, shadow in wanted.items():
            if name not in self._activators.names() or not host.wanted(name, shadow):
                continue
            if self._serving(name) == shadow.version:
                continue  # it serves already: nothing to compare it with
            try:
                self._start_shadow(name, shadow)
            except Exception as exc:  # a shadow must never take the update client down
                log.exception("shadow_crashed", model=name, version=shadow.version)
                host.set_phase(name, shadow, "failed", f"{type(exc).__name__}: {exc}")
            self._report()

    def _start_shadow(self, name: str, shadow: DesiredShadow) -> None:
        host = self._shadows
        assert host is not None
        entry = DesiredModel(
            name=name,
            version=shadow.version,
            variant_id=shadow.variant_id,
            artifact_path=shadow.artifact_path,
            sha256=shadow.sha256,
            size=shadow.size,
            rollout_id=shadow.rollout_id,
        )
        host.set_phase(name, shadow, "downloading")
        self._report()
        dest = self._download_path(entry)
        try:
            if not self._store.has(name, shadow.version):
                self._fetch_variant(entry, entry, dest)
                installed = self._install(dest, ())
                if (installed.name, installed.version) != (name, shadow.version):
                    raise _RefusedError(
                        f"{shadow.artifact_path} holds {installed.name} {installed.version}"
                    )
        except TransientError as exc:
            host.forget(name)  # the network's fault: tried again at the next poll
            log.warning("shadow_download_retrying", model=name, reason=str(exc))
            return
        except (_RefusedError, DownloadError, LocalIOError, StoreError, BundleError) as exc:
            host.set_phase(name, shadow, "failed", str(exc))
            log.warning("shadow_failed", model=name, version=shadow.version, reason=str(exc))
            return
        finally:
            for path in (dest, dest.with_name(dest.name + ".part")):
                path.unlink(missing_ok=True)
        host.start(name, self._activators.get(name).slot, shadow)

    def _reject(self, name: str, version: str, desired: DesiredState | None, why: str) -> None:
        """Refuse ``version`` of ``name`` until its desired entry's generation changes."""
        entry = next((m for m in desired.models if m.name == name), None) if desired else None
        generation = entry.generation if entry is not None and entry.version == version else -1
        self._rejected[name] = (version, generation)
        self._rejected_why[name] = why if why.startswith("rejected: ") else f"rejected: {why}"

    def _log_refusal(self, model: DesiredModel) -> None:
        """Say once per (version, generation) that this version is refused and why; the report
        says it for as long as it is refused (``agent.updates.report``)."""
        key = (model.name, model.version, model.generation)
        if key in self._refusals_logged:
            return
        self._refusals_logged.add(key)
        log.warning(
            "rejected_version_refused",
            model=model.name,
            version=model.version,
            generation=model.generation,
            reason=self._rejected_why.get(model.name, "rejected on this device"),
            retry="edgectl devices retry, or a new rollout of this version",
        )

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
        keep |= {d.artifact_path.replace("/", "_") for m in wanted if (d := m.delta) is not None}
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
        log.info("update_started", model=name, version=version, from_version=from_version)
        self._step(name, version, "downloading")
        self._bus.emit(
            "download_started",
            model=name,
            version=version,
            from_version=from_version,
            variant_id=model.variant_id,
            size=model.size,
        )
        extras: list[Path] = []
        extra_ids: list[str] = []
        try:
            self._fetch_variant(model, model, dest)
            # The other fitting variants the device measures before it serves one. One that
            # cannot be fetched or verified is left out (logged); the first is required.
            for offered in self._variants_to_fetch(model)[1:]:
                extra = self._download_path(offered)
                try:
                    self._fetch_variant(model, offered, extra)
                except (_RefusedError, DownloadError, LocalIOError) as exc:
                    log.warning(
                        "variant_not_fetched",
                        model=name,
                        version=version,
                        variant_id=offered.variant_id,
                        reason=str(exc),
                    )
                    continue
                extras.append(extra)
                extra_ids.append(offered.variant_id)
            self._step(name, version, "installing")
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
            self._step(name, version, "loading")
            activator = self._activators.get(name)
            self._while_reporting(name, lambda: activator.update(version))
        except _RefusedError as exc:
            for path in (dest, dest.with_name(dest.name + ".part")):
                path.unlink(missing_ok=True)
            self._fail(model, key, f"refused: {exc}", step="refused")
        except TransientError as exc:
            # The network or the control plane away: not the version's fault. Partial bytes
            # stay on disk and the next attempt resumes where this one stopped.
            self._fail(model, key, str(exc), step="retrying", failure_class="transient")
        except LocalIOError as exc:
            # This device's disk (out of space, an I/O error): its own class, partial kept.
            self._fail(model, key, str(exc), step="retrying", failure_class="local_io")
        except DownloadError as exc:
            # Partial bytes stay on disk: the next attempt resumes where this one stopped.
            self._fail(model, key, str(exc), step="download_failed")
        except StoreError as exc:
            self._fail(model, key, str(exc), step="failed")
        except ModelError as exc:
            # The version does not load or validate here: the activator removed it and the old
            # version kept serving. Not retried until the entry is offered again on purpose.
            self._reject(name, version, self._desired, str(exc))
            self._clear_step(name)
            log.warning("update_rejected", model=name, version=version, reason=str(exc))
            self._report()
            dest.unlink(missing_ok=True)
        else:
            # Every fetched archive is kept as the base of the next update's delta: the control
            # plane builds it from whichever variant the device reports serving.
            self._bases.keep(name, version, model.variant_id, dest)
            for path, variant_id in zip(extras, extra_ids, strict=True):
                self._bases.keep(name, version, variant_id, path)
            self._bases.prune(name, self._store.versions(name))
            for path in (dest, *extras):
                path.unlink(missing_ok=True)  # whatever could not be kept
            self._attempts.pop(key, None)
            self._failures.pop(name, None)
            self._clear_step(name)
            log.info("update_swapped", model=name, version=version, from_version=from_version)
            self._report()
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
        if offered is model and model.delta is not None and self._fetch_delta(model, dest):
            self._step(name, version, "verifying")
            self._bus.emit("verified", model=name, version=version, sha256=signed.sha256)
            return
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
        self._step(name, version, "verifying")
        self._bus.emit(
            "verified",
            model=name,
            version=version,
            variant_id=offered.variant_id,
            sha256=signed.sha256,
        )

    def _fetch_delta(self, model: DesiredModel, dest: Path) -> bool:
        """Rebuild ``dest`` from the offered delta; False (and a ``delta_refused`` event) when
        the full archive must be downloaded instead."""
        assert model.delta is not None
        try:
            outcome = self._deltas.fetch(
                model.name, model.delta, full_length=model.size, full_sha256=model.sha256, dest=dest
            )
        except DeltaUnusableError as exc:
            log.warning("delta_refused", model=model.name, version=model.version, reason=str(exc))
            self._bus.emit(
                "delta_refused",
                model=model.name,
                version=model.version,
                reason=str(exc),
                from_version=model.delta.from_version,
            )
            return False
        self._bus.emit(
            "delta_applied",
            model=model.name,
            version=model.version,
            from_version=outcome.from_version,
            variant_id=model.variant_id,
            summary=outcome.summary,
            delta_bytes=outcome.delta_bytes,
            full_bytes=outcome.full_bytes,
            transferred=outcome.transferred,
        )
        return True

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
        step: Literal["refused", "download_failed", "failed", "retrying"],
        failure_class: FailureClass = "version",
    ) -> None:
        """An attempt at ``model`` ended without a swap: retried after a backoff. ``step`` is the
        event; ``failure_class`` says whose fault it was (``version``: counted against the version
        by a rollout; ``transient`` and ``local_io``: the network or this device's disk, not)."""
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
        self._clear_step(model.name)
        self._failures[model.name] = Rejection(
            model.version, reason, retried=True, failure_class=failure_class
        )
        log.warning(
            "update_not_applied",
            model=model.name,
            version=model.version,
            step=step,
            failure_class=failure_class,
            reason=reason,
            failures=attempt.failures,
        )
        self._bus.emit(
            step,
            model=model.name,
            version=model.version,
            reason=reason,
            failures=attempt.failures,
            failure_class=failure_class,
        )
        self._report()

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
            verdict = activator.check()
            if verdict is None:
                continue
            if verdict.action == "wait":
                if verdict.reason and self._waiting.get(name) != verdict.reason:
                    if name not in self._waiting:
                        log.warning("probation_waiting", model=name, reason=verdict.reason)
                    self._waiting[name] = verdict.reason
                continue
            self._waiting.pop(name, None)
            self._sync_journal()  # a rollback rejects the version it left
            self._report()

    def _next(self, delay: float) -> float:
        if self._in_probation():
            return min(delay, self._probation_check_s)
        return delay

    # --- reporting -----------------------------------------------------------------------------

    def _on_event(self, event: UpdateEvent) -> None:
        """Record what a bus event says and wake this client's thread; never any I/O here (it
        runs on the emitter's thread: a swap's loader, a rollback command, the store)."""
        with self._report_lock:
            progress = self._progress.get(event.model)
            if progress is not None and progress.version == event.version:
                if event.step == "loaded":
                    self._progress[event.model] = Progress(event.version, "validating")
                elif event.step == "validated":
                    self._progress[event.model] = Progress(event.version, "swapping")
        if event.step in _REPORTED_STEPS:
            self._wake.set()

    def _step(self, name: str, version: str, phase: Phase) -> None:
        """This client now carries ``version`` of ``name`` through ``phase``; reported at once."""
        with self._report_lock:
            self._progress[name] = Progress(version, phase)
        self._report()

    def _clear_step(self, name: str) -> None:
        with self._report_lock:
            self._progress.pop(name, None)

    def _while_reporting(self, name: str, work: Callable[[], _T]) -> _T:
        """Run ``work`` (a swap: seconds of loading, warming and validating) on a helper thread
        while this thread sends the reports its steps call for: the swap's own threads never
        wait on the network."""
        result: list[_T] = []
        error: list[BaseException] = []
        done = threading.Event()

        def target() -> None:
            try:
                result.append(work())
            except BaseException as exc:  # handed to the caller below
                error.append(exc)
            finally:
                done.set()
                self._wake.set()

        threading.Thread(target=target, name=f"update-{name}", daemon=True).start()
        while not done.is_set():
            self._wake.wait()
            self._wake.clear()
            if not done.is_set():
                self._report()
        if error:
            raise error[0]
        return result[0]

    def _facts(self, name: str) -> ModelFacts:
        record: UpdateRecord | None = None
        serving: Serving | None = None
        if name in self._activators.names():
            activator = self._activators.get(name)
            record = activator.record()
            current = activator.slot.current
            if current is not None:
                serving = Serving(
                    version=current.version,
                    variant_id=current.variant_id,
                    backend=current.backend,
                    device=current.device,
                    choice=current.choice or None,
                )
        entry = (
            next((m for m in self._desired.models if m.name == name), None)
            if (self._desired)
            else None
        )
        rejection: Rejection | None = None
        rejected = self._rejected.get(name)
        if entry is not None and rejected == (entry.version, entry.generation):
            rejection = Rejection(entry.version, self._rejected_why.get(name, "rejected"))
        elif name in self._failures:
            rejection = self._failures[name]
        with self._report_lock:
            progress = self._progress.get(name)
        return ModelFacts(
            name=name,
            serving=serving,
            record=record,
            desired=entry.version if entry is not None else None,
            progress=progress,
            rejection=rejection,
            waiting=self._waiting.get(name),
            loop=self._loop_health().get(name),
            shadow=self._shadows.report(name) if self._shadows is not None else None,
        )

    def _reported_state(self) -> ReportedState:
        names = set(self._activators.names()) | set(self._loop_health())
        if self._desired is not None:
            names |= {m.name for m in self._desired.models}
        with self._report_lock:
            names |= set(self._progress)
        return ReportedState(
            device_id=self._credential.device_id if self._credential else "",
            agent_version=__version__,
            generation_seen=self._desired.generation if self._desired else None,
            models=tuple(reported_model(self._facts(n)) for n in sorted(names)),
            refused=self._refused,
            updated_at=datetime.now(timezone.utc),
        )

    def _report(self) -> None:
        """Send the reported state when it differs from the last one the control plane took,
        or when the last send failed; while the control plane is away, on the next good poll.
        Only this client's thread calls it. The PUT carries the whole state, so a repeat is
        harmless."""
        if self._credential is None:
            return
        self._sync_journal()
        state = self._reported_state()
        body = state.model_dump(mode="json")
        key = {k: v for k, v in body.items() if k != "updated_at"}
        if key == self._last_sent and not self._report_pending:
            return
        self._report_pending = True
        if not self._online:
            return
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
            log.info("report_deferred", reason=str(exc))
            return
        if response.status_code >= 400:
            log.warning("report_refused", status=response.status_code, body=_brief(response))
            return
        self._last_sent = key
        self._report_pending = False


# Steps after which what serves (or how an update ended) may have changed: worth a report.
_REPORTED_STEPS = frozenset(
    {"swapped", "committed", "rolled_back", "failed", "activated", "removed", "paused"}
)


class _RefusedError(Exception):
    """A target, its metadata or its bundle was refused for security or integrity reasons."""


def _length_sha(target: SignedTarget) -> tuple[int, str]:
    return target.length, target.sha256


def _brief(response: _Answer) -> str:
    return response.text[:200]


def _safe_name(name: str) -> str:
    import re

    cleaned = "".join(c if c in _NAME_CHARS else "-" for c in name).lstrip("._-") or "device"
    cleaned = cleaned[:64]
    if not re.match(NAME_RE, cleaned):
        raise ConfigError(f"device name {name!r} cannot be made into a valid name")
    return cleaned
