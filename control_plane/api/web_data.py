"""What the web pages show, read from the database into plain dicts for the templates.

Owns the queries (filters and pagination in SQL where the column allows, presence in Python
over the page's rows), the chart geometry (inline SVG: polylines and bars in a fixed box) and
the formatting of numbers. Nothing here writes; the routes in ``routes/web.py`` render.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import String, cast, func, inspect, or_, select
from sqlalchemy.orm import Session

from control_plane.cli._format import reduced_compute_text
from control_plane.db.models import BuildJob, Device, Model
from control_plane.jobs import skipped_variants

__all__ = [
    "ONLINE_WINDOW",
    "PAGE_SIZE",
    "DeviceFilter",
    "device_detail",
    "device_page",
    "fleet_summary",
    "models_view",
    "rollout_rows",
    "rollout_view",
]

ONLINE_WINDOW = timedelta(seconds=90)
PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
CHART_W, CHART_H = 640, 180
_PHASE_CLASS = {"committed": "ok", "idle": "ok", "failed": "bad", "rolled_back": "bad"}
_STATUS_CLASS = {"completed": "ok", "aborted": "bad", "running": "warn", "paused": "warn"}
VERSION_STEPS = ("activated", "swapped", "committed", "rolled_back")


def ago(when: datetime | None, now: datetime) -> str:
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


def _has(session: Session, table: str) -> bool:
    return bool(inspect(session.get_bind()).has_table(table))


def _links(session: Session, ids: Sequence[str] | None = None) -> dict[str, Any]:
    from control_plane.ingest.tables import DeviceLink

    if not _has(session, DeviceLink.__tablename__):
        return {}
    query = select(DeviceLink)
    if ids is not None:
        query = query.where(DeviceLink.device_id.in_(list(ids)))
    return {link.device_id: link for link in session.scalars(query)}


def _last_heard(device: Device, link: Any) -> datetime | None:
    times = [device.last_seen_at, device.reported_at]
    if link is not None:
        times += [link.state_received_at, link.telemetry_received_at]
    heard = [t for t in times if isinstance(t, datetime)]
    return max(heard) if heard else None


def presence(device: Device, link: Any, now: datetime) -> tuple[str, str]:
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


def _reported_models(reported: Any) -> list[dict[str, Any]]:
    models = (reported or {}).get("models") if isinstance(reported, dict) else None
    out = []
    for m in models or ():
        if not isinstance(m, dict):
            continue
        phase = str(m.get("phase") or "idle")
        target = m.get("target_version")
        out.append(
            {
                "name": m.get("name"),
                "version": m.get("active_version") or "-",
                "variant": m.get("variant_id") or "",
                "backend": m.get("backend") or "",
                "device": m.get("device") or "",
                "phase": phase,
                "phase_class": _PHASE_CLASS.get(phase, "warn"),
                "target": target if target and target != m.get("active_version") else None,
                "error": m.get("last_error"),
                "choice": m.get("choice") or "",
            }
        )
    return out


def _latency(link: Any) -> list[str]:
    models = getattr(link, "models", None)
    if not isinstance(models, dict):
        return []
    out = []
    for name, entry in sorted(models.items()):
        if not isinstance(entry, dict):
            continue
        p50, p99 = entry.get("p50_ms"), entry.get("p99_ms")
        if isinstance(p50, (int, float)) and isinstance(p99, (int, float)):
            out.append(f"{name}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    return out


def _device_row(d: Device, link: Any, now: datetime) -> dict[str, Any]:
    word, cls = presence(d, link, now)
    profile = d.profile if isinstance(d.profile, dict) else {}
    reported = d.reported if isinstance(d.reported, dict) else {}
    return {
        "id": d.id,
        "name": d.name,
        "labels": d.labels if isinstance(d.labels, dict) else {},
        "presence": word,
        "presence_class": cls,
        "last_heard": ago(_last_heard(d, link), now),
        "arch": profile.get("arch", "-"),
        "agent": reported.get("agent_version", "-"),
        "models": _reported_models(reported),
        "latency": _latency(link),
    }


@dataclass(frozen=True)
class DeviceFilter:
    q: str = ""
    state: str = ""  # online | offline | never seen | "" (any)
    label: str = ""  # key=value
    model: str = ""
    page: int = 1
    per_page: int = PAGE_SIZE

    def query(self, page: int) -> str:
        params = {
            k: v
            for k, v in (
                ("q", self.q),
                ("state", self.state),
                ("label", self.label),
                ("model", self.model),
            )
            if v
        }
        if self.per_page != PAGE_SIZE:
            params["per_page"] = str(self.per_page)
        params["page"] = str(page)
        return "/ui?" + urlencode(params)


def fleet_summary(session: Session, now: datetime) -> dict[str, int]:
    total = int(session.scalar(select(func.count()).select_from(Device)) or 0)
    recent = now - ONLINE_WINDOW
    heard = func.coalesce(Device.last_seen_at, Device.reported_at)
    online_http = int(
        session.scalar(select(func.count()).select_from(Device).where(heard >= recent)) or 0
    )
    return {"devices": total, "online": online_http}


def device_page(session: Session, f: DeviceFilter, now: datetime) -> dict[str, Any]:
    """One page of the filtered device list. Text, label and model filter in SQL; presence is
    decided per device (MQTT link or last contact), so a state filter reads the matching rows'
    presence before paging."""
    query = select(Device).order_by(Device.name, Device.id)
    if f.q:
        like = f"%{f.q.lower()}%"
        query = query.where(or_(func.lower(Device.name).like(like), Device.id.like(like)))
    if f.label:
        key, _, value = f.label.partition("=")
        text = cast(Device.labels, String)
        needle = f'"{key.strip()}": "{value.strip()}"' if value else f'"{key.strip()}":'
        query = query.where(text.like(f"%{needle}%"))
    if f.model:
        query = query.where(cast(Device.reported, String).like(f'%"name": "{f.model}"%'))
    if f.state:
        rows = session.scalars(query).all()
        links = _links(session, [d.id for d in rows])
        rows = [d for d in rows if presence(d, links.get(d.id), now)[0] == f.state]
        total = len(rows)
        start = (f.page - 1) * f.per_page
        page_rows = rows[start : start + f.per_page]
    else:
        total = int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
        page_rows = list(session.scalars(query.offset((f.page - 1) * f.per_page).limit(f.per_page)))
        links = _links(session, [d.id for d in page_rows])
    pages = max(1, math.ceil(total / f.per_page))
    return {
        "devices": [_device_row(d, links.get(d.id), now) for d in page_rows],
        "page": {
            "total": total,
            "number": f.page,
            "pages": pages,
            "prev": f.query(f.page - 1) if f.page > 1 else None,
            "next": f.query(f.page + 1) if f.page < pages else None,
        },
    }


# -- charts ------------------------------------------------------------------------------------


def _nice(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for m in (1, 2, 5, 10):
        if value <= m * exp:
            return float(m * exp)
    return float(10 * exp)


def line_chart(
    title: str,
    caption: str,
    series: list[tuple[str, str, list[tuple[float, float]]]],
    *,
    left: str,
    right: str,
) -> dict[str, Any]:
    """``series``: (name, css class, [(x, y)]); x and y scaled into the chart's box."""
    points = [p for _, _, pts in series for p in pts]
    out: dict[str, Any] = {
        "title": title,
        "caption": caption,
        "width": CHART_W,
        "height": CHART_H,
        "count": len(points),
        "bars": False,
        "left": left,
        "right": right,
        "series": [],
    }
    if not points:
        out["top"] = ""
        return out
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    top = _nice(max(p[1] for p in points))
    out["top"] = f"{top:g}"
    span = (x1 - x0) or 1.0
    for name, cls, pts in series:
        coords = " ".join(
            f"{40 + (x - x0) / span * (CHART_W - 44):.1f},"
            f"{(CHART_H - 20) - y / top * (CHART_H - 24):.1f}"
            for x, y in pts
        )
        out["series"].append({"name": name, "cls": cls, "points": coords})
    return out


def bar_chart(title: str, caption: str, bars: list[tuple[str, float]]) -> dict[str, Any]:
    """Signed bars (e.g. p99 delta per device), zero line in the middle."""
    out: dict[str, Any] = {
        "title": title,
        "caption": caption,
        "width": CHART_W,
        "height": CHART_H,
        "count": len(bars),
        "bars": True,
        "left": bars[0][0] if bars else "",
        "right": bars[-1][0] if bars else "",
        "series": [],
    }
    if not bars:
        out["top"] = ""
        return out
    top = _nice(max(abs(v) for _, v in bars))
    out["top"] = f"{top:+g}"
    mid = (CHART_H - 20) / 2
    width = (CHART_W - 44) / len(bars)
    shapes = []
    for i, (label, value) in enumerate(bars):
        h = abs(value) / top * (mid - 2)
        shapes.append(
            {
                "x": f"{40 + i * width + 1:.1f}",
                "y": f"{mid - h if value >= 0 else mid:.1f}",
                "w": f"{max(1.0, width - 2):.1f}",
                "h": f"{max(h, 0.5):.1f}",
                "cls": "up" if value > 0 else "down",
                "label": f"{label}: {value:+.1%}",
            }
        )
    out["series"] = [{"name": "p99 delta", "bars": shapes}]
    return out


# -- one device --------------------------------------------------------------------------------


def device_detail(
    session: Session, device: Device, desired: Any, now: datetime, *, hours: int = 24
) -> dict[str, Any]:
    from control_plane.ingest.tables import DeviceEventRow, TelemetryBucket

    link = _links(session, [device.id]).get(device.id)
    row = _device_row(device, link, now)
    reported = {m["name"]: m for m in row["models"]}
    serving = []
    names = [m.name for m in getattr(desired, "models", ())] + [
        n for n in reported if n not in {m.name for m in getattr(desired, "models", ())}
    ]
    desired_by = {m.name: m.version for m in getattr(desired, "models", ())}
    for name in names:
        r = reported.get(name, {})
        serving.append(
            {
                "name": name,
                "desired": desired_by.get(name, "-"),
                "version": r.get("version", "-"),
                "variant": r.get("variant", "-") or "-",
                "runs_on": " / ".join(x for x in (r.get("backend"), r.get("device")) if x) or "-",
                "phase": r.get("phase", "-"),
                "phase_class": r.get("phase_class", "muted"),
                "choice": r.get("choice") or "-",
                "error": r.get("error"),
            }
        )
    since = now - timedelta(hours=hours)
    latency: dict[str, list[tuple[float, float]]] = {}
    errors: dict[str, list[tuple[float, float]]] = {}
    if _has(session, TelemetryBucket.__tablename__):
        buckets = session.scalars(
            select(TelemetryBucket)
            .where(TelemetryBucket.device_id == device.id, TelemetryBucket.bucket_start >= since)
            .order_by(TelemetryBucket.bucket_start)
            .limit(5000)
        )
        for b in buckets:
            key = f"{b.model} {b.version}".strip()
            t = b.bucket_start.timestamp()
            if b.latency_weight:
                latency.setdefault(key, []).append((t, b.p99_weighted_sum / b.latency_weight))
            total = b.inferences + b.failed
            if total:
                errors.setdefault(key, []).append((t, 100.0 * b.failed / total))
    left, right = since.strftime("%m-%d %H:%M"), now.strftime("%m-%d %H:%M")
    palette = ("s0", "s1", "s2", "s3")
    latency_chart = line_chart(
        "p99 latency (ms)",
        "count-weighted p99 of each minute, per model version",
        [(k, palette[i % 4], v) for i, (k, v) in enumerate(sorted(latency.items()))],
        left=left,
        right=right,
    )
    error_chart = line_chart(
        "failed inferences (%)",
        "per minute, per model version",
        [(k, palette[i % 4], v) for i, (k, v) in enumerate(sorted(errors.items()))],
        left=left,
        right=right,
    )
    events: list[dict[str, Any]] = []
    versions: list[dict[str, Any]] = []
    if _has(session, DeviceEventRow.__tablename__):
        rows = session.scalars(
            select(DeviceEventRow)
            .where(DeviceEventRow.device_id == device.id)
            .order_by(DeviceEventRow.received_at.desc())
            .limit(200)
        ).all()
        for e in rows:
            item = {
                "at": e.device_ts.strftime("%Y-%m-%d %H:%M:%S"),
                "model": e.model,
                "version": e.version or "-",
                "from_version": e.from_version or "-",
                "step": e.step,
                "reason": e.reason or "",
            }
            if len(events) < 50:
                events.append(item)
            if e.step in VERSION_STEPS:
                versions.append(item)
    return {
        "d": row,
        "serving": serving,
        "latency_chart": latency_chart,
        "error_chart": error_chart,
        "events": events,
        "versions": versions[:50],
        "hours": hours,
    }


# -- rollouts ----------------------------------------------------------------------------------


def rollout_rows(session: Session, limit: int = 20) -> list[dict[str, Any]] | None:
    """The newest rollouts; None where this database has no rollout tables."""
    from control_plane.rollouts.controller import RolloutState
    from control_plane.rollouts.tables import RolloutRow

    if not _has(session, RolloutRow.__tablename__):
        return None
    rows = []
    query = select(RolloutRow).order_by(RolloutRow.created_at.desc()).limit(limit)
    for r in session.scalars(query):
        try:
            state = RolloutState.model_validate(r.state)
        except ValueError:
            rows.append(
                {
                    "id": r.id,
                    "model": r.model,
                    "version": r.version,
                    "status": r.status,
                    "status_class": "muted",
                    "progress": "-",
                    "detail": "unreadable state",
                }
            )
            continue
        waves = len(state.spec.waves)
        h = state.health
        detail = state.reason or (
            f"{h.reporting}/{h.assigned} reporting, {h.failed_updates} failed updates"
            + (f", p99 {h.p99_regression * 100:+.0f}%" if h.p99_regression is not None else "")
        )
        rows.append(
            {
                "id": r.id,
                "model": r.model,
                "version": r.version,
                "status": state.status,
                "status_class": _STATUS_CLASS.get(state.status, "muted"),
                "progress": (
                    f"wave {min(state.wave + 1, waves)} of {waves}, "
                    f"{len(state.assigned)} devices assigned"
                ),
                "detail": detail,
            }
        )
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def rollout_view(public: Any) -> dict[str, Any]:
    """The rollout page from the API's ``RolloutPublic`` (the same numbers ``edgectl`` shows)."""
    r = public.model_dump()
    for w in r["wave_status"]:
        w["size"] = f"{w['percent']:g}%" if w["percent"] is not None else str(w["count"])
        w["p99"] = _pct(w["p99_regression"])
        w["errors"] = "-" if w["error_rate"] is None else f"{w['error_rate']:.2%}"
    bars = []
    for d in r["devices"]:
        d["p99"] = "-" if d["p99_ms"] is None else f"{d['p99_ms']:.1f}"
        d["base"] = "-" if d["baseline_p99_ms"] is None else f"{d['baseline_p99_ms']:.1f}"
        d["retryable"] = d["update"] in ("failed", "rejected") and not d["rolled_back"]
        if d["p99_ms"] is not None and d["baseline_p99_ms"]:
            bars.append((d["device_id"], d["p99_ms"] / d["baseline_p99_ms"] - 1.0))
    for e in r["decisions"]:
        e["at"] = e["at"].strftime("%Y-%m-%d %H:%M:%S")
        e["wave"] = "-" if e["wave"] is None else e["wave"] + 1
    r["decisions"] = r["decisions"][-50:]
    shadow = r.get("shadow")
    if shadow:
        h, stage = shadow.get("health") or {}, shadow["stage"]

        def num(value: float | None, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        shadow["summary"] = (
            f"{h.get('reporting', 0)}/{h.get('assigned', 0)} devices reporting, "
            f"{h.get('samples', 0)} samples, {h.get('metric') or 'metric'} "
            f"-{num(h.get('delta'), '.2f')} points (max {stage['max_delta']:g}), "
            f"p99 x{num(h.get('latency_ratio'), '.2f')}"
            + (f", {h['refused']} refused" if h.get("refused") else "")
        )
        for d in shadow["devices"]:
            d["value_text"] = num(d["value"], ".2f")
            d["delta_text"] = num(d["delta"], ".2f")
            d["p99_text"] = num(d["p99_ms"], ".1f")
            d["serving_text"] = num(d["serving_p99_ms"], ".1f")
    return {
        "r": r,
        "status_class": _STATUS_CLASS.get(r["status"], "muted"),
        "p99_chart": bar_chart(
            "p99 delta vs baseline",
            "per device on the new version: its p99 over the health window against its p99 "
            "before the update",
            bars,
        ),
    }


# -- models ------------------------------------------------------------------------------------


def _gate(spec: dict[str, Any]) -> str:
    acc = spec.get("accuracy")
    if not isinstance(acc, dict):
        return "reference"
    try:
        text = (
            f"{acc.get('metric')} {float(acc['value']):.2f} "
            f"(delta {float(acc['delta']):+.2f}, budget {float(acc['budget']):g})"
        ) + reduced_compute_text(acc)
    except (KeyError, TypeError, ValueError):
        return "-"
    return text + (f"; {acc['reason']}" if acc.get("reason") else "")


def _size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "-"


def models_view(session: Session) -> list[dict[str, Any]]:
    newest = select(func.max(BuildJob.id)).group_by(BuildJob.version_id)
    skipped = {
        vid: s
        for vid, text in session.execute(
            select(BuildJob.version_id, BuildJob.log).where(BuildJob.id.in_(newest))
        )
        if (s := skipped_variants(text))
    }
    out = []
    for model in session.scalars(select(Model).order_by(Model.name)):
        versions = []
        for version in reversed(model.versions):
            rows = []
            for v in version.variants:
                spec = v.spec if isinstance(v.spec, dict) else {}
                raw_build = spec.get("build")
                build: dict[str, Any] = raw_build if isinstance(raw_build, dict) else {}
                latency = build.get("latency_ms")
                rows.append(
                    {
                        "id": v.variant_id,
                        "runtime": v.runtime,
                        "precision": v.precision,
                        "verdict": v.status,
                        "verdict_class": "ok" if v.status == "accepted" else "bad",
                        "gate": _gate(spec),
                        "latency": f"{latency:.1f}" if isinstance(latency, (int, float)) else "-",
                        "weights": _size(build.get("weight_bytes")),
                        "size": _size(v.archive_size),
                    }
                )
            built = {v.variant_id for v in version.variants}
            for target, reason in sorted(skipped.get(version.id, {}).items()):
                if target not in built:
                    rows.append(
                        {
                            "id": target,
                            "runtime": "-",
                            "precision": "-",
                            "verdict": "skipped",
                            "verdict_class": "warn",
                            "gate": reason,
                            "latency": "-",
                            "weights": "-",
                            "size": "-",
                        }
                    )
            if not rows:
                rows.append(
                    {
                        "id": "-",
                        "runtime": "",
                        "precision": "",
                        "verdict": "no variant yet",
                        "verdict_class": "muted",
                        "gate": "",
                        "latency": "",
                        "weights": "",
                        "size": "",
                    }
                )
            versions.append(
                {
                    "version": version.version,
                    "task": version.task,
                    "status": version.status,
                    "status_class": {"ready": "ok", "failed": "bad"}.get(version.status, "warn"),
                    "error": version.error,
                    "rows": rows,
                }
            )
        out.append(
            {
                "name": model.name,
                "budget": f"{model.accuracy_budget:g}",
                "description": model.description,
                "versions": versions,
            }
        )
    return out
