"""The operator's web page: ``/ui``, server-rendered from Jinja2 templates (autoescape on).

Pages: the device list (``/ui``: filters by text, presence, label and model; 50 a page), a
device (``/ui/devices/{id}``: what serves and why, latency and error charts from the stored
telemetry buckets, versions over time and events), the rollouts (``/ui/rollouts``) and one
rollout (``/ui/rollouts/{id}``: waves, per-device state, the p99 delta chart, the abort reason,
and pause, resume, abort and per-device retry for the operator role), and the models
(``/ui/models``: every variant with its gate metric). Charts are inline SVG drawn on the server.

Live updates: htmx-style polling. ``/ui/static/live.js`` (the only script, same origin, allowed
by the ``Content-Security-Policy``) refetches the page every 5 s and swaps in each element
marked ``data-poll``; forms and the rest of the page stay. Without JavaScript the page is
complete and a reload shows the news.

Every value reaches HTML through the templates' autoescaping, and the page forbids inline
scripts, so text a device reports (an error message, a label) cannot run in an operator's
browser.

Auth: any operator token (viewer and up), taken from the ``Authorization: Bearer`` header, a
``?token=`` query parameter (for ``curl`` or a bookmark; the token then appears in URLs and
logs, so prefer the form), or the ``edgefleet_token`` cookie that ``POST /ui/login`` (form field
``token``) sets (HttpOnly, SameSite=Strict). ``POST /ui/logout`` clears it. Actions need the
operator role (``ForbiddenError`` otherwise).

Forms and cross-site requests: every form carries a hidden ``csrf`` field, the HMAC (keyed
from the admin token, so every replica agrees) of a random value kept in the ``edgefleet_csrf``
cookie (HttpOnly, SameSite=Strict). The router's ``_csrf_guard`` checks every request of this
router that is not a read: the field must match the cookie, a ``Sec-Fetch-Site`` of
``cross-site`` or ``same-site`` and an ``Origin`` of another host are refused. A refusal is a
``CsrfError`` (403). Login is covered too (login CSRF): the cookie is set by the page that
shows the login form, before any credential exists.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from importlib.resources import files
from typing import Annotated, Any
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from starlette.concurrency import run_in_threadpool

from agent.logs import get_logger
from control_plane.api import web_data
from control_plane.api.deps import Context, require_viewer
from control_plane.auth import Operator
from control_plane.context import AppContext
from control_plane.db.models import Device
from control_plane.errors import (
    AuthError,
    ConflictError,
    CsrfError,
    ForbiddenError,
    NotFoundError,
    RequestError,
    UnavailableError,
)

__all__ = ["COOKIE_NAME", "CSRF_COOKIE", "CSRF_FIELD", "ONLINE_WINDOW", "router"]

log = get_logger(__name__)

COOKIE_NAME = "edgefleet_token"
CSRF_COOKIE = "edgefleet_csrf"
CSRF_FIELD = "csrf"
_CSRF_NONCE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
COOKIE_MAX_AGE_S = 12 * 3600
REFRESH_S = 5  # live.js polls this often
ONLINE_WINDOW = web_data.ONLINE_WINDOW  # heard from this recently: online
MAX_TOKEN_CHARS = 512
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; script-src 'self'; "
        "connect-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # same-origin: a browser then sends its real Origin on our own form posts (under
    # no-referrer Chromium sends "Origin: null", which the CSRF guard refuses), none elsewhere
    "Referrer-Policy": "same-origin",
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
.bar{display:flex;gap:1rem;align-items:baseline;flex-wrap:wrap}a{color:#0969da}
h1 a{color:inherit;text-decoration:none}.filters{margin:.4rem 0}.actions{margin:.6rem 0}
button.danger{color:#fff;background:#cf222e;border:1px solid #a40e26}
.chart{margin:.6rem 0}.chart svg{background:#fff;border:1px solid #d0d7de}
.chart text{font-size:10px;fill:#656d76}.axis{stroke:#8c959f}
.line{fill:none;stroke-width:1.5}.s0{stroke:#0969da}.s1{stroke:#bf3989}.s2{stroke:#1a7f37}
.s3{stroke:#9a6700}rect.up{fill:#cf222e}rect.down{fill:#1a7f37}
"""


_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("control_plane.api", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_LIVE_JS = files("control_plane.api").joinpath("static/live.js").read_bytes()


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


def _render(
    template: str, *, status_code: int = 200, title: str = "edgefleet", **context: Any
) -> HTMLResponse:
    context.setdefault("operator", None)
    context.setdefault("flash", None)
    context.setdefault("flash_class", None)
    page = _TEMPLATES.get_template(template).render(
        title=title, style=_STYLE, refresh_s=REFRESH_S, **context
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
    csrf = _csrf(ctx, request)
    response = _render(
        "web/login.html",
        status_code=status_code,
        title="edgefleet: sign in",
        csrf=csrf.field,
        message=message,
        max_token=MAX_TOKEN_CHARS,
    )
    _set_csrf_cookie(response, request, csrf)
    return response


async def _signed_in(
    ctx: AppContext, request: Request
) -> tuple[Operator | None, HTMLResponse | None, str | None]:
    """The operator behind the request, or the login page to answer instead."""
    token = _given_token(request)
    if token is None:
        return None, _login_page(ctx, request, None, status_code=401), None
    try:
        return await _viewer(ctx, token), None, token
    except AuthError as exc:
        return None, _login_page(ctx, request, str(exc), status_code=401), None
    except ForbiddenError as exc:
        return None, _login_page(ctx, request, str(exc), status_code=403), None


def _can_act(operator: Operator) -> bool:
    return operator.role in ("operator", "admin")


async def _page(
    ctx: AppContext,
    request: Request,
    template: str,
    build: Any,
    *,
    title: str,
    status_code: int = 200,
) -> Response:
    """Sign-in check, then ``build(operator)`` (in a thread: it reads the database) rendered."""
    operator, login_page, token = await _signed_in(ctx, request)
    if operator is None:
        assert login_page is not None
        return login_page
    csrf = _csrf(ctx, request)
    try:
        context = await run_in_threadpool(build, operator)
    except NotFoundError as exc:
        return _render(
            "web/base.html",
            status_code=404,
            title=title,
            operator=operator,
            csrf=csrf.field,
            flash=str(exc),
            flash_class="bad",
        )
    flash = request.query_params.get("done")
    response = _render(
        template,
        status_code=status_code,
        title=title,
        operator=operator,
        csrf=csrf.field,
        flash=flash[:200] if flash else None,
        **context,
    )
    _set_csrf_cookie(response, request, csrf)
    if token is not None and request.cookies.get(COOKIE_NAME) != token:
        _set_cookie(response, request, token)
    return response


# -- routes ----------------------------------------------------------------------------------


@router.get("/ui/static/live.js", include_in_schema=False)
async def live_js() -> Response:
    return Response(
        _LIVE_JS,
        media_type="text/javascript",
        headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
    )


@router.get("/", response_class=HTMLResponse)
@router.get("/ui", response_class=HTMLResponse)
async def fleet_page(  # noqa: PLR0917 - FastAPI maps each query parameter to one
    request: Request,
    ctx: Context,
    q: Annotated[str, Query(max_length=64)] = "",
    state: Annotated[str, Query(pattern="^(|online|offline|never seen)$")] = "",
    label: Annotated[str, Query(max_length=128)] = "",
    model: Annotated[str, Query(max_length=64)] = "",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    per_page: Annotated[int, Query(ge=1, le=web_data.MAX_PAGE_SIZE)] = web_data.PAGE_SIZE,
) -> Response:
    f = web_data.DeviceFilter(q.strip(), state, label.strip(), model.strip(), page, per_page)

    def build(_operator: Operator) -> dict[str, Any]:
        now = ctx.now()
        with ctx.sessions() as session:
            listing = web_data.device_page(session, f, now)
            return {
                **listing,
                "f": f,
                "summary": web_data.fleet_summary(session, now),
                "rollouts": web_data.rollout_rows(session, limit=10),
                "now": now.strftime("%Y-%m-%d %H:%M:%S"),
            }

    return await _page(ctx, request, "web/fleet.html", build, title="edgefleet: devices")


@router.get("/ui/devices/{device_id}", response_class=HTMLResponse)
async def device_page(device_id: str, request: Request, ctx: Context) -> Response:
    from control_plane.desired import compute_desired_state

    def build(_operator: Operator) -> dict[str, Any]:
        with ctx.sessions() as session:
            device = session.get(Device, device_id[:64])
            if device is None:
                raise NotFoundError(f"no device {device_id[:64]!r}")
            desired = compute_desired_state(session, device)
            return web_data.device_detail(session, device, desired, ctx.now())

    return await _page(ctx, request, "web/device.html", build, title=f"edgefleet: {device_id}")


@router.get("/ui/rollouts", response_class=HTMLResponse)
async def rollouts_page(request: Request, ctx: Context) -> Response:
    def build(_operator: Operator) -> dict[str, Any]:
        with ctx.sessions() as session:
            return {"rollouts": web_data.rollout_rows(session, limit=200)}

    return await _page(ctx, request, "web/rollouts.html", build, title="edgefleet: rollouts")


def _rollout_service(ctx: AppContext) -> Any:
    if ctx.rollouts is None:
        raise UnavailableError("rollouts are not enabled on this instance")
    return ctx.rollouts


@router.get("/ui/rollouts/{rollout_id}", response_class=HTMLResponse)
async def rollout_page(rollout_id: str, request: Request, ctx: Context) -> Response:
    from control_plane.rollouts.schemas import rollout_public

    def build(operator: Operator) -> dict[str, Any]:
        view = web_data.rollout_view(rollout_public(_rollout_service(ctx).view(rollout_id[:64])))
        return {**view, "can_act": _can_act(operator)}

    return await _page(ctx, request, "web/rollout.html", build, title=f"edgefleet: {rollout_id}")


@router.get("/ui/models", response_class=HTMLResponse)
async def models_page(request: Request, ctx: Context) -> Response:
    def build(_operator: Operator) -> dict[str, Any]:
        with ctx.sessions() as session:
            return {"models": web_data.models_view(session)}

    return await _page(ctx, request, "web/models.html", build, title="edgefleet: models")


def _act(ctx: AppContext, rollout_id: str, action: str, operator: Operator, reason: str) -> str:
    service = _rollout_service(ctx)
    if action == "pause":
        service.pause(rollout_id, actor=operator.name)
    elif action == "resume":
        service.resume(rollout_id, actor=operator.name)
    else:
        service.abort(rollout_id, actor=operator.name, reason=reason or None)
    log.info("web_rollout_action", rollout_id=rollout_id, action=action, by=operator.name)
    return f"rollout {rollout_id}: {action} done"


async def _operator_for_action(ctx: AppContext, request: Request) -> Operator:
    token = _given_token(request)
    if token is None:
        raise AuthError("sign in first")
    operator = await _viewer(ctx, token)
    if not _can_act(operator):
        raise ForbiddenError(f"role {operator.role} may not change rollouts (operator needed)")
    return operator


@router.post("/ui/rollouts/{rollout_id}/{action}")
async def rollout_action(
    rollout_id: str,
    action: str,
    request: Request,
    ctx: Context,
    reason: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    if action not in ("pause", "resume", "abort"):
        raise NotFoundError(f"no action {action[:16]!r}")
    operator = await _operator_for_action(ctx, request)
    try:
        done = await run_in_threadpool(_act, ctx, rollout_id[:64], action, operator, reason)
    except (ConflictError, RequestError) as exc:
        if isinstance(exc, (AuthError, ForbiddenError, CsrfError)):
            raise
        done = f"{type(exc).__name__}: {exc}"
    return RedirectResponse(f"/ui/rollouts/{rollout_id[:64]}?{urlencode({'done': done})}", 303)


@router.post("/ui/rollouts/{rollout_id}/retry/{device_id}")
async def rollout_retry(
    rollout_id: str, device_id: str, request: Request, ctx: Context
) -> Response:
    from control_plane.api.routes.devices import retry
    from control_plane.api.schemas import RetryCreate
    from control_plane.rollouts.schemas import rollout_public

    operator = await _operator_for_action(ctx, request)

    def run() -> str:
        model = rollout_public(_rollout_service(ctx).view(rollout_id[:64])).model
        with ctx.sessions() as session:
            retry(device_id[:64], RetryCreate(model=model), session, operator, ctx)
        return f"{device_id[:64]}: {model} offered again"

    try:
        done = await run_in_threadpool(run)
    except (ConflictError, NotFoundError) as exc:
        done = f"{type(exc).__name__}: {exc}"
    return RedirectResponse(f"/ui/rollouts/{rollout_id[:64]}?{urlencode({'done': done})}", 303)


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
