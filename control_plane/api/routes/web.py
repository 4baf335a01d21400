"""The operator's web page: ``GET /`` (and ``/ui``), a server-rendered summary of the fleet.

Owns one read-only HTML page (devices with their labels, presence and reported state; models,
versions and variants with their accuracy verdicts, and the targets a build skipped with the
reason; rollouts where the rollout tables exist),
refreshed by a ``<meta http-equiv="refresh">`` tag, and the tiny login that feeds it. No
JavaScript: every value is HTML-escaped on the way out, and the page carries a
``Content-Security-Policy`` that forbids scripts, so text a device reports (an error message, a
label) cannot run in an operator's browser.

Auth: any operator token (viewer and up), taken from the ``Authorization: Bearer`` header, a
``?token=`` query parameter (for ``curl`` or a bookmark; the token then appears in URLs and
logs, so prefer the form), or the ``edgefleet_token`` cookie that ``POST /ui/login`` (form field
``token``) sets (HttpOnly, SameSite=Strict). ``POST /ui/logout`` clears it. Who may do what is
``control_plane.api.deps``' decision; the JSON API stays the source of truth for automation.

Forms and cross-site requests: every form is made by ``_form``, which adds a hidden ``csrf``
field, the HMAC (keyed from the admin token, so every replica agrees) of a random value kept in
the ``edgefleet_csrf`` cookie (HttpOnly, SameSite=Strict). The router's ``_csrf_guard`` checks
every request of this router that is not a read: the field must match the cookie, a
``Sec-Fetch-Site`` of ``cross-site`` or ``same-site`` and an ``Origin`` of another host are
refused. A refusal is a ``CsrfError`` (403). Login is covered too (login CSRF): the cookie is
set by the page that shows the login form, before any credential exists.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from agent.logs import get_logger
from control_plane.api.deps import Context, require_viewer
from control_plane.auth import Operator
from control_plane.context import AppContext
from control_plane.db.models import BuildJob, Device, Model
from control_plane.errors import AuthError, CsrfError, ForbiddenError
from control_plane.jobs import skipped_variants

__all__ = ["COOKIE_NAME", "CSRF_COOKIE", "CSRF_FIELD", "ONLINE_WINDOW", "router"]

log = get_logger(__name__)

COOKIE_NAME = "edgefleet_token"
CSRF_COOKIE = "edgefleet_csrf"
CSRF_FIELD = "csrf"
_CSRF_NONCE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
COOKIE_MAX_AGE_S = 12 * 3600
REFRESH_S = 5
# A device that reported (state, profile, telemetry) this recently counts as online.
ONLINE_WINDOW = timedelta(seconds=90)
MAX_TOKEN_CHARS = 512
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1b1f24;background:#fafbfc}
h1{font-size:1.3rem;margin:0 0 .2rem}h2{font-size:1.05rem;margin:1.6rem 0 .4rem}
h3{font-size:.95rem;margin:1rem 0 .3rem}
table{border-collapse:collapse;font-size:.85rem;background:#fff}
th,td{border:1px solid #d0d7de;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f0f3f6}.muted{color:#656d76}.ok{color:#1a7f37}.bad{color:#cf222e}
.warn{color:#9a6700}code{font-size:.8rem}form{display:inline}
.bar{display:flex;gap:1rem;align-items:baseline}
"""


def _e(value: object) -> str:
    """Text for HTML (element content and quoted attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


# -- auth ------------------------------------------------------------------------------------


def _given_token(request: Request) -> str | None:
    query = request.query_params.get("token")
    if query:
        return query
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(COOKIE_NAME) or None


async def _viewer(ctx: AppContext, token: str) -> Operator:
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthError("unknown or revoked API token")
    credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)
    return await require_viewer(ctx, credentials)


def _set_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=COOKIE_MAX_AGE_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def _html(
    body: str, *, status_code: int = 200, title: str = "edgefleet", refresh_s: int | None = None
) -> HTMLResponse:
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    page = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8>{refresh}"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    )
    return HTMLResponse(page, status_code=status_code, headers=dict(_SECURITY_HEADERS))


# -- forms and cross-site requests -----------------------------------------------------------


def _csrf_key(ctx: AppContext) -> bytes:
    secret = ctx.settings.admin_token.get_secret_value().encode()
    return hashlib.sha256(b"edgefleet-csrf\0" + secret).digest()


def _csrf_value(ctx: AppContext, nonce: str) -> str:
    return hmac.new(_csrf_key(ctx), nonce.encode(), hashlib.sha256).hexdigest()


def _nonce(request: Request) -> str | None:
    value = request.cookies.get(CSRF_COOKIE, "")
    return value if 16 <= len(value) <= 64 and _CSRF_NONCE_CHARS.issuperset(value) else None


@dataclass(frozen=True)
class _Csrf:
    """This browser's anti-forgery value for the forms of one page, and whether its cookie is
    new (the response then sets it)."""

    nonce: str
    field: str
    fresh: bool


def _csrf(ctx: AppContext, request: Request) -> _Csrf:
    nonce = _nonce(request)
    fresh = nonce is None
    if nonce is None:
        nonce = secrets.token_urlsafe(24)
    return _Csrf(nonce, _csrf_value(ctx, nonce), fresh)


def _set_csrf_cookie(response: Response, request: Request, csrf: _Csrf) -> None:
    if csrf.fresh:
        response.set_cookie(
            CSRF_COOKIE,
            csrf.nonce,
            max_age=COOKIE_MAX_AGE_S,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )


def _form(action: str, csrf: _Csrf, inner: str) -> str:
    """Every form of the page: a POST to ``action`` carrying the anti-forgery field."""
    return (
        f"<form method=post action={_e(action)}>"
        f"<input type=hidden name={CSRF_FIELD} value={_e(csrf.field)}>{inner}</form>"
    )


async def _csrf_guard(request: Request) -> None:
    """Every request of this router that is not a read must come from one of its own forms."""
    if request.method in _SAFE_METHODS:
        return
    fetch_site = request.headers.get("sec-fetch-site", "")
    if fetch_site in ("cross-site", "same-site"):
        raise CsrfError(f"refused a {fetch_site} form post")
    origin = request.headers.get("origin")
    if origin is not None:
        host = request.headers.get("host", "")
        if origin == "null" or origin.split("://", 1)[-1].rstrip("/") != host:
            raise CsrfError("refused a form post from another origin")
    ctx: AppContext = request.app.state.ctx
    nonce = _nonce(request)
    form = await request.form()
    given = form.get(CSRF_FIELD)
    if nonce is None or not isinstance(given, str):
        raise CsrfError("the form carries no anti-forgery token: reload the page and try again")
    if not hmac.compare_digest(given.encode(), _csrf_value(ctx, nonce).encode()):
        raise CsrfError("the form's anti-forgery token does not match: reload the page")


router = APIRouter(tags=["web"], include_in_schema=False, dependencies=[Depends(_csrf_guard)])


def _login_page(
    ctx: AppContext, request: Request, message: str | None, *, status_code: int
) -> HTMLResponse:
    note = f"<p class=bad>{_e(message)}</p>" if message else ""
    csrf = _csrf(ctx, request)
    body = (
        "<h1>edgefleet control plane</h1>"
        "<p>Sign in with an operator API token (a viewer token is enough).</p>"
        f"{note}"
        + _form(
            "/ui/login",
            csrf,
            "<input type=password name=token autocomplete=off size=48 required "
            f"maxlength={MAX_TOKEN_CHARS} aria-label=token> <button type=submit>Sign in</button>",
        )
    )
    response = _html(body, status_code=status_code, title="edgefleet: sign in")
    _set_csrf_cookie(response, request, csrf)
    return response


# -- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RolloutRow:
    id: str
    model: str
    version: str
    status: str
    progress: str
    detail: str


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    seconds = max(0, int((now - when).total_seconds()))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 172800:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


def _last_heard(device: Device, link: Any) -> datetime | None:
    times = [device.last_seen_at, device.reported_at]
    if link is not None:
        times += [link.state_received_at, link.telemetry_received_at]
    heard = [t for t in times if isinstance(t, datetime)]
    return max(heard) if heard else None


def _presence(device: Device, link: Any, now: datetime) -> tuple[str, str]:
    """(word, css class): the MQTT birth / last will where the ingester keeps them, else
    whether the device was heard from over HTTP within ``ONLINE_WINDOW``."""
    if link is not None and link.status in ("online", "offline"):
        return (str(link.status), "ok") if link.status == "online" else ("offline", "bad")
    heard = _last_heard(device, None)
    if heard is None:
        return "never seen", "muted"
    if now - heard <= ONLINE_WINDOW:
        return "online", "ok"
    return "offline", "bad"


def _latency(link: Any) -> str:
    """The latest inference window per model from the device's telemetry, where ingested."""
    models = getattr(link, "models", None)
    if not isinstance(models, dict) or not models:
        return "<span class=muted>-</span>"
    parts = []
    for name, entry in sorted(models.items()):
        if not isinstance(entry, dict):
            continue
        p50, p99 = entry.get("p50_ms"), entry.get("p99_ms")
        if not isinstance(p50, (int, float)) or not isinstance(p99, (int, float)):
            continue
        parts.append(f"{_e(name)}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    return "<br>".join(parts) or "<span class=muted>-</span>"


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return "<span class=muted>-</span>"
    return " ".join(f"<code>{_e(k)}={_e(v)}</code>" for k, v in sorted(labels.items()))


_PHASE_CLASS = {"committed": "ok", "idle": "ok", "failed": "bad", "rolled_back": "bad"}


def _reported_models(reported: dict[str, Any] | None) -> str:
    models: Sequence[Any] = (reported or {}).get("models") or ()
    if not models:
        return "<span class=muted>nothing reported</span>"
    parts = []
    for m in models:
        if not isinstance(m, dict):
            continue
        phase = str(m.get("phase") or "idle")
        text = (
            f"<b>{_e(m.get('name'))}</b> {_e(m.get('active_version') or '-')}"
            f" <span class=muted>{_e(m.get('variant_id') or '')}"
            f" {_e(m.get('backend') or '')}</span>"
            f" <span class={_PHASE_CLASS.get(phase, 'warn')}>{_e(phase)}</span>"
        )
        target = m.get("target_version")
        if target and target != m.get("active_version"):
            text += f" &rarr; {_e(target)}"
        if m.get("last_error"):
            text += f"<br><span class=bad>{_e(m['last_error'])}</span>"
        parts.append(text)
    return "<br>".join(parts)


def _devices_section(devices: Iterable[Device], links: dict[str, Any], now: datetime) -> str:
    rows = []
    for d in devices:
        link = links.get(d.id)
        word, cls = _presence(d, link, now)
        reported = d.reported if isinstance(d.reported, dict) else None
        profile = d.profile if isinstance(d.profile, dict) else {}
        rows.append(
            "<tr>"
            f"<td>{_e(d.name)}<br><code class=muted>{_e(d.id)}</code></td>"
            f"<td>{_labels(d.labels if isinstance(d.labels, dict) else {})}</td>"
            f"<td class={cls}>{_e(word)}</td>"
            f"<td>{_e(_ago(_last_heard(d, link), now))}</td>"
            f"<td>{_e(profile.get('arch', '-'))}</td>"
            f"<td>{_e((reported or {}).get('agent_version', '-'))}</td>"
            f"<td>{_reported_models(reported)}</td>"
            f"<td>{_latency(link)}</td>"
            "</tr>"
        )
    if not rows:
        return "<h2>Devices</h2><p class=muted>No device has enrolled yet.</p>"
    return (
        "<h2>Devices</h2><table><tr><th>device</th><th>labels</th><th>status</th>"
        "<th>last seen</th><th>arch</th><th>agent</th><th>models (active version, phase)</th>"
        "<th>latency</th></tr>" + "".join(rows) + "</table>"
    )


def _accuracy(spec: dict[str, Any]) -> str:
    acc = spec.get("accuracy")
    if not isinstance(acc, dict):
        return "<span class=muted>reference</span>"
    try:
        text = (
            f"{_e(acc.get('metric'))} {float(acc['value']):.2f} "
            f"(&Delta; {float(acc['delta']):+.2f}, budget {float(acc['budget']):g})"
        )
    except (KeyError, TypeError, ValueError):
        return "<span class=muted>-</span>"
    if acc.get("reason"):
        text += f"<br><span class=muted>{_e(acc['reason'])}</span>"
    return text


def _build_cells(spec: dict[str, Any]) -> str:
    """Build-host latency, weight bytes and compute ops per precision (and what stayed float)."""
    build = spec.get("build")
    if not isinstance(build, dict):
        return "<td class=muted>-</td>" * 3
    latency = build.get("latency_ms")
    counts = build.get("precisions")
    counts = counts if isinstance(counts, dict) else {}
    ops = ", ".join(f"{_e(p)} {_e(n)}" for p, n in sorted(counts.items())) or "-"
    kept = build.get("kept_float") if isinstance(build.get("kept_float"), list) else []
    if kept:
        ops += f"<br><span class=muted>float: {_e(', '.join(map(str, kept[:5])))}"
        ops += f" (+{len(kept) - 5})" if len(kept) > 5 else ""
        ops += "</span>"
    return (
        f"<td>{_e(f'{latency:.1f}' if isinstance(latency, (int, float)) else '-')}</td>"
        f"<td>{_e(build.get('weight_bytes', '-'))}</td><td>{ops}</td>"
    )


def _skipped_by_version(session: Session) -> dict[int, dict[str, str]]:
    """Per version id, the targets its latest build skipped and why (read from the job log)."""
    newest = select(func.max(BuildJob.id)).group_by(BuildJob.version_id)
    rows = session.execute(select(BuildJob.version_id, BuildJob.log).where(BuildJob.id.in_(newest)))
    return {vid: skipped for vid, text in rows if (skipped := skipped_variants(text))}


def _models_section(models: Iterable[Model], skipped: dict[int, dict[str, str]]) -> str:
    out = ["<h2>Models</h2>"]
    any_model = False
    for model in models:
        any_model = True
        out.append(
            f"<h3>{_e(model.name)} <span class=muted>budget {model.accuracy_budget:g} points"
            f"{' &middot; ' + _e(model.description) if model.description else ''}</span></h3>"
        )
        if not model.versions:
            out.append("<p class=muted>No version uploaded.</p>")
            continue
        out.append(
            "<table><tr><th>version</th><th>status</th><th>variant</th><th>runtime</th>"
            "<th>precision</th><th>verdict</th><th>accuracy vs FP32 (deciding metric)</th>"
            "<th>build-host ms</th><th>weights</th><th>compute ops by precision</th>"
            "<th>size</th></tr>"
        )
        for version in reversed(model.versions):
            variants = version.variants
            built = {v.variant_id for v in variants}
            left_out = sorted(
                (target, reason)
                for target, reason in skipped.get(version.id, {}).items()
                if target not in built
            )
            rows = max(1, len(variants) + len(left_out))
            status_cls = {"ready": "ok", "failed": "bad"}.get(version.status, "warn")
            task = f"<br><span class=muted>task {_e(version.task)}</span>" if version.task else ""
            head = (
                f"<td rowspan={rows}>{_e(version.version)}{task}</td>"
                f"<td rowspan={rows} class={status_cls}>{_e(version.status)}"
                + (f"<br><span class=bad>{_e(version.error)}</span>" if version.error else "")
                + "</td>"
            )
            if not variants and not left_out:
                out.append(f"<tr>{head}<td colspan=9 class=muted>no variant yet</td></tr>")
                continue
            for i, v in enumerate(variants):
                verdict_cls = "ok" if v.status == "accepted" else "bad"
                out.append(
                    "<tr>"
                    + (head if i == 0 else "")
                    + f"<td><code>{_e(v.variant_id)}</code></td><td>{_e(v.runtime)}</td>"
                    f"<td>{_e(v.precision)}</td><td class={verdict_cls}>{_e(v.status)}</td>"
                    f"<td>{_accuracy(v.spec if isinstance(v.spec, dict) else {})}</td>"
                    f"{_build_cells(v.spec if isinstance(v.spec, dict) else {})}"
                    f"<td>{_e(v.archive_size if v.archive_size is not None else '-')}</td>"
                    "</tr>"
                )
            for j, (target, reason) in enumerate(left_out):
                out.append(
                    "<tr>"
                    + (head if not variants and j == 0 else "")
                    + f"<td><code>{_e(target)}</code></td><td colspan=2 class=muted>-</td>"
                    f"<td class=warn>skipped</td><td colspan=5>{_e(reason)}</td>"
                    "</tr>"
                )
        out.append("</table>")
    if not any_model:
        out.append("<p class=muted>No model in the registry.</p>")
    return "".join(out)


def _rollouts(session: Session) -> list[_RolloutRow] | None:
    """The newest rollouts; None where this database has no rollout tables."""
    try:
        from control_plane.rollouts.controller import RolloutState
        from control_plane.rollouts.tables import RolloutRow
    except ImportError:  # a build without the rollout service
        return None
    if not inspect(session.get_bind()).has_table(RolloutRow.__tablename__):
        return None
    rows = []
    for r in session.scalars(select(RolloutRow).order_by(RolloutRow.created_at.desc()).limit(20)):
        try:
            state = RolloutState.model_validate(r.state)
        except ValueError:
            rows.append(_RolloutRow(r.id, r.model, r.version, r.status, "-", "unreadable state"))
            continue
        waves = len(state.spec.waves)
        health = state.health
        detail = state.reason or (
            f"{health.reporting}/{health.assigned} reporting, "
            f"{health.failed_updates} failed updates"
            + (
                f", p99 {health.p99_regression * 100:+.0f}%"
                if health.p99_regression is not None
                else ""
            )
        )
        rows.append(
            _RolloutRow(
                id=r.id,
                model=r.model,
                version=r.version,
                status=state.status,
                progress=(
                    f"wave {min(state.wave + 1, waves)} of {waves}, "
                    f"{len(state.assigned)} devices assigned"
                ),
                detail=detail,
            )
        )
    return rows


def _links(session: Session) -> dict[str, Any]:
    """The ingester's latest MQTT state per device id (empty where it keeps none)."""
    try:
        from control_plane.ingest.tables import DeviceLink
    except ImportError:  # a build without telemetry ingestion
        return {}
    if not inspect(session.get_bind()).has_table(DeviceLink.__tablename__):
        return {}
    return {link.device_id: link for link in session.scalars(select(DeviceLink))}


def _rollouts_section(rows: list[_RolloutRow] | None) -> str:
    if rows is None:
        return ""
    if not rows:
        return "<h2>Rollouts</h2><p class=muted>No rollout yet.</p>"
    status_cls = {"completed": "ok", "aborted": "bad", "running": "warn", "paused": "warn"}
    body = "".join(
        "<tr>"
        f"<td><code>{_e(r.id)}</code></td><td>{_e(r.model)}</td><td>{_e(r.version)}</td>"
        f"<td class={status_cls.get(r.status, 'muted')}>{_e(r.status)}</td>"
        f"<td>{_e(r.progress)}</td><td>{_e(r.detail)}</td>"
        "</tr>"
        for r in rows
    )
    return (
        "<h2>Rollouts</h2><table><tr><th>rollout</th><th>model</th><th>version</th>"
        "<th>status</th><th>progress</th><th>detail</th></tr>" + body + "</table>"
    )


def _page_body(ctx: AppContext, operator: Operator, csrf: _Csrf) -> str:
    now = ctx.now()
    with ctx.sessions() as session:
        devices = session.scalars(select(Device).order_by(Device.name, Device.id)).all()
        models = session.scalars(select(Model).order_by(Model.name)).all()
        links = _links(session)
        sections = [
            _devices_section(devices, links, now),
            _rollouts_section(_rollouts(session)),
            _models_section(models, _skipped_by_version(session)),
        ]
    online = sum(1 for d in devices if _presence(d, links.get(d.id), now)[0] == "online")
    return (
        "<div class=bar><h1>edgefleet control plane</h1>"
        f"<span class=muted>{len(devices)} devices, {online} online &middot; "
        f"{_e(now.strftime('%Y-%m-%d %H:%M:%S'))} UTC &middot; refreshes every {REFRESH_S} s"
        f" &middot; signed in as {_e(operator.name)} ({_e(operator.role)})</span>"
        + _form("/ui/logout", csrf, "<button type=submit>Sign out</button>")
        + "</div>"
        + "".join(sections)
    )


# -- routes ----------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
@router.get("/ui", response_class=HTMLResponse)
async def fleet_page(request: Request, ctx: Context) -> Response:
    token = _given_token(request)
    if token is None:
        return _login_page(ctx, request, None, status_code=401)
    try:
        operator = await _viewer(ctx, token)
    except AuthError as exc:
        return _login_page(ctx, request, str(exc), status_code=401)
    except ForbiddenError as exc:
        return _login_page(ctx, request, str(exc), status_code=403)
    csrf = _csrf(ctx, request)
    body = await run_in_threadpool(_page_body, ctx, operator, csrf)
    response = _html(body, refresh_s=REFRESH_S)
    _set_csrf_cookie(response, request, csrf)
    if request.cookies.get(COOKIE_NAME) != token:
        _set_cookie(response, request, token)
    return response


@router.post("/ui/login")
async def login(
    request: Request, ctx: Context, token: Annotated[str, Form(max_length=MAX_TOKEN_CHARS)]
) -> Response:
    try:
        operator = await _viewer(ctx, token.strip())
    except AuthError as exc:
        return _login_page(ctx, request, str(exc), status_code=401)
    except ForbiddenError as exc:
        return _login_page(ctx, request, str(exc), status_code=403)
    log.info("web_login", operator=operator.name, role=operator.role)
    response = RedirectResponse("/ui", status_code=303)
    _set_cookie(response, request, token.strip())
    return response


@router.post("/ui/logout")
async def logout() -> Response:
    response = RedirectResponse("/ui", status_code=303)
    response.delete_cookie(COOKIE_NAME, path="/")
    return response
