"""`batchcxr status`: is the daemon up, is it healthy, what is waiting, what failed.

Reads the database without migrating or taking the write lock, and the watcher's status files
(a JSON copy of its heartbeat), so it still answers when the database is locked or down.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from batchcxr.settings import Settings
from batchcxr.store.db import sqlite_path
from batchcxr.store.schema import utcnow

FAILED_PAGE = 50


def status_files(settings: Settings) -> list[Path]:
    """The watchers' status files: the configured one, or those beside a SQLite database."""
    if settings.watch.status_file:
        return [Path(settings.watch.status_file).expanduser()]
    db = sqlite_path(settings.sqlalchemy_url)
    return sorted(db.parent.glob(f"{db.name}.watch-*.json")) if db is not None and db.parent.is_dir() else []


def _read_status_files(settings: Settings) -> dict[str, dict[str, Any]]:
    found = {}
    for path in status_files(settings):
        try:
            record = json.loads(path.read_text())
            found[record["name"]] = record
        except (OSError, ValueError, KeyError):
            continue
    return found


def _time(value) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    try:
        return dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None


def gather(settings: Settings, *, stale_after: float = 60.0, backlog_after: float = 900.0,
           failed_page: int | None = None) -> dict[str, Any]:
    """Everything `status` shows, as plain data; ``exit_code`` 0 ok, 1 down, 2 degraded."""
    from sqlalchemy.engine import make_url

    from batchcxr.store.repo import Store
    from batchcxr.worker import describe_fault

    now = utcnow()
    report: dict[str, Any] = {"database": make_url(settings.sqlalchemy_url).render_as_string(hide_password=True),
                              "daemons": [], "checked_at": now.isoformat(timespec="seconds")}
    daemons: dict[str, dict[str, Any]] = {}
    store = None
    try:
        store = Store.open(settings.sqlalchemy_url, busy_timeout_s=5.0, upgrade=False,
                           lateral_views=settings.quality.lateral_views)
        for d in store.daemons():
            daemons[d.name] = {c: getattr(d, c) for c in ("name", "pid", "host", "state", "started_at", "heartbeat_at",
                                                         "files_waiting", "studies_pending", "last_scored_at",
                                                         "fault", "fault_since", "oldest_waiting_s")}
        report["last_prediction_at"] = store.last_prediction_at()
        since = now - dt.timedelta(hours=24)
        report["errors_24h"] = store.count_errors_since(since)
        report["recent_failures"] = [
            {"time": e.created_at, "path": e.path, "reason": e.reason}
            for e in store.errors_since(since, limit=200) if e.status == "failed"][-10:]
        report["failed_files"] = store.count_failed_files()
        report["outbox"] = store.outbox_summary()  # what waits; sent totals: the batchcxr_outbox_sent metric
        if failed_page is not None:
            page = max(1, failed_page)
            report["failed_page"] = page
            report["failed_list"] = [
                {"path": f.path, "stage": f.stage, "reason": f.reason, "run": f.run_id, "time": f.updated_at,
                 "now_at": f.moved_to} for f in store.failed_files((page - 1) * FAILED_PAGE, FAILED_PAGE)]
    except Exception as exc:  # noqa: BLE001 - status must answer whatever the database does
        report["database_error"] = describe_fault(exc)
    finally:
        if store is not None:
            store.close()
    for name, record in _read_status_files(settings).items():  # newer than the database's copy?
        known = daemons.get(name)
        beat = _time(record.get("heartbeat_at"))
        if known is None or (beat and known.get("heartbeat_at") and beat > known["heartbeat_at"]):
            daemons[name] = {**record, **{k: _time(record.get(k)) for k in
                                          ("started_at", "heartbeat_at", "last_scored_at", "fault_since")},
                             "from_status_file": True}
    alive = degraded = 0
    for d in daemons.values():
        age = (now - d["heartbeat_at"]).total_seconds() if d.get("heartbeat_at") else float("inf")
        d["heartbeat_age_s"] = round(age, 1)
        d["alive"] = d.get("state") == "running" and age <= stale_after
        problems = []
        if d.get("fault"):
            problems.append(f"fault: {d['fault']}")
        if (d.get("oldest_waiting_s") or 0) > backlog_after:
            problems.append(f"backlog: a file has waited {d['oldest_waiting_s']:.0f} s")
        d["problems"] = problems
        alive += d["alive"]
        degraded += bool(d["alive"] and problems)
        report["daemons"].append(d)
    stuck = [name for name, d in report.get("outbox", {}).items()
             if d.get("pending") and d.get("oldest_pending") and (now - d["oldest_pending"]).total_seconds() > backlog_after]
    report["outbox_stuck"] = stuck
    if alive == 0:
        report["state"], report["exit_code"] = "down", 1
    elif degraded or alive < len(daemons) or report.get("database_error") or stuck:
        report["state"], report["exit_code"] = "degraded", 2
    else:
        report["state"], report["exit_code"] = "ok", 0
    return report


def render(report: dict[str, Any]) -> str:
    """The text `batchcxr status` prints."""
    lines = [f"state: {report['state'].upper()} ({report['database']})"]
    if report.get("database_error"):
        lines.append(f"database: cannot read it: {report['database_error']}")
    if not report["daemons"]:
        lines.append("watcher: never ran on this database")
    for d in report["daemons"]:
        lines.append(f"{d['name']}: {'ALIVE' if d['alive'] else 'NOT RUNNING'} (state {d.get('state')}, "
                     f"pid {d.get('pid')} on {d.get('host')}, heartbeat {d['heartbeat_age_s']:.0f} s ago)")
        lines.append(f"  files waiting {d.get('files_waiting', 0)}, studies pending {d.get('studies_pending', 0)}, "
                     f"last scored {d.get('last_scored_at') or 'never'}")
        for problem in d["problems"]:
            since = f" since {d['fault_since']}" if problem.startswith("fault") and d.get("fault_since") else ""
            lines.append(f"  DEGRADED: {problem}{since}")
    if "last_prediction_at" in report:
        lines.append(f"last prediction: {report['last_prediction_at'] or 'never'}")
        errors = report.get("errors_24h", {})
        lines.append(f"last 24 h: {errors.get('failed', 0)} failed, {errors.get('skipped', 0)} skipped")
        for e in report.get("recent_failures", []):
            lines.append(f"  {e['time']:%Y-%m-%d %H:%M} {e['path']}: {e['reason']}")
        lines.append(f"files not scored: {report.get('failed_files', 0)} (batchcxr status --failed 1 lists them)")
    for name, d in report.get("outbox", {}).items():
        if d.get("pending"):
            lines.append(f"outbox {name}: {d['pending']} waiting since {d['oldest_pending']:%Y-%m-%d %H:%M}"
                         + (f"; last error: {d['last_error']}" if d.get("last_error") else "")
                         + (" (DEGRADED: stuck)" if name in report.get("outbox_stuck", []) else ""))
    for f in report.get("failed_list", []):
        lines.append(f"  {f['time']:%Y-%m-%d %H:%M} run #{f['run']} {f['path']} [{f['stage']}]: {f['reason']}"
                     + (f" -> {f['now_at']}" if f["now_at"] else ""))
    return "\n".join(lines)
