"""The Store's records for the review app: server-side sessions, login throttling and the audit
log. Mixed into Store (store/repo.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from batchcxr.store.schema import AuditEvent, LoginThrottle, WebSession, utcnow

audit_log = logging.getLogger("batchcxr.audit")
SEEN_EVERY = dt.timedelta(seconds=30)
"""A session's last-seen time is written at most this often (one write per page view otherwise)."""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class SessionInfo:
    user: str
    address: str
    created_at: dt.datetime
    last_seen_at: dt.datetime


class ReviewRecords:
    """Sessions, throttling, audit (a mixin of Store)."""

    def session(self) -> Session:  # provided by Store
        raise NotImplementedError

    def read_session(self) -> Session:  # provided by Store
        raise NotImplementedError

    # sessions -----------------------------------------------------------------
    def open_web_session(self, user: str, password_fingerprint: str, address: str) -> str:
        """A new session; returns its token (only its hash is stored)."""
        token = secrets.token_urlsafe(32)
        with self.session() as s, s.begin():
            s.add(WebSession(token_hash=_hash(token), user=user, password_fingerprint=password_fingerprint,
                             address=address[:64], created_at=utcnow(), last_seen_at=utcnow()))
        return token

    def web_session_user(self, token: str, fingerprints: Mapping[str, str], idle: dt.timedelta,
                         absolute: dt.timedelta) -> str | None:
        """The user of a live session, or None (ended, unknown, idle or too old, or the user's
        password changed since: such sessions are ended here)."""
        if not token:
            return None
        now = utcnow()
        with self.session() as s, s.begin():
            row = s.get(WebSession, _hash(token))
            if row is None or row.ended_at is not None:
                return None
            why = ""
            if fingerprints.get(row.user) != row.password_fingerprint:
                why = "password changed" if row.user in fingerprints else "user removed"
            elif now - row.last_seen_at > idle:
                why = "idle timeout"
            elif now - row.created_at > absolute:
                why = "absolute timeout"
            if why:
                row.ended_at, row.ended_why = now, why
                return None
            if now - row.last_seen_at > SEEN_EVERY:
                row.last_seen_at = now
            return row.user

    def end_web_session(self, token: str, why: str = "logout") -> None:
        with self.session() as s, s.begin():
            s.execute(update(WebSession).where(WebSession.token_hash == _hash(token), WebSession.ended_at.is_(None))
                      .values(ended_at=utcnow(), ended_why=why))

    def revoke_web_sessions(self, user: str) -> int:
        """End every live session of ``user`` (`batchcxr sessions revoke`)."""
        with self.session() as s, s.begin():
            return s.execute(update(WebSession).where(WebSession.user == user, WebSession.ended_at.is_(None))
                             .values(ended_at=utcnow(), ended_why="revoked")).rowcount

    def live_web_sessions(self) -> list[SessionInfo]:
        with self.read_session() as s:
            rows = s.scalars(select(WebSession).where(WebSession.ended_at.is_(None)).order_by(WebSession.created_at))
            return [SessionInfo(r.user, r.address, r.created_at, r.last_seen_at) for r in rows]

    # login throttling -------------------------------------------------------------
    def login_wait(self, keys: Sequence[str]) -> float:
        """Seconds until a login for these keys (user name, client address) may be tried again."""
        now = utcnow()
        with self.read_session() as s:
            waits = s.scalars(select(LoginThrottle.wait_until).where(LoginThrottle.key.in_(list(keys)))).all()
        return max([(w - now).total_seconds() for w in waits if w is not None] + [0.0])

    def login_failed(self, keys: Sequence[str], free_failures: int, max_wait_s: float) -> None:
        """Count a failure for each key; after ``free_failures`` each further one waits twice as
        long as the last (1, 2, 4 ... s, at most ``max_wait_s``)."""
        now = utcnow()
        with self.session() as s, s.begin():
            for key in keys:
                row = s.get(LoginThrottle, key) or LoginThrottle(key=key, failures=0)
                row.failures = (row.failures or 0) + 1
                row.last_failure_at = now
                over = row.failures - free_failures
                row.wait_until = now + dt.timedelta(seconds=min(max_wait_s, 2.0 ** (over - 1))) if over > 0 else None
                s.add(row)

    def login_succeeded(self, keys: Sequence[str]) -> None:
        with self.session() as s, s.begin():
            for key in keys:
                row = s.get(LoginThrottle, key)
                if row is not None:
                    s.delete(row)

    # audit ------------------------------------------------------------------------
    def audit(self, action: str, *, user: str = "", address: str = "", target: str = "", detail: str = "") -> None:
        """Append one event to the audit table and the audit log."""
        from batchcxr.store.repo import clean_text

        event = AuditEvent(at=utcnow(), user=clean_text(user)[:128], address=clean_text(address)[:64],
                           action=action[:32], target=clean_text(target)[:1000], detail=clean_text(detail)[:2000])
        with self.session() as s, s.begin():
            s.add(event)
        audit_log.info("%s user=%s address=%s target=%s %s", action, event.user or "-", event.address or "-",
                       event.target or "-", event.detail)

    def audit_events(self, since: dt.datetime, user: str | None = None, limit: int = 10_000) -> list[AuditEvent]:
        with self.read_session() as s:
            q = select(AuditEvent).where(AuditEvent.at >= since)
            if user:
                q = q.where(AuditEvent.user == user)
            return list(s.scalars(q.order_by(AuditEvent.id).limit(limit)).all())
