"""The Store's outbox of DICOM results (mixed into Store, store/repo.py)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, selectinload

from batchcxr.store.schema import Image, OutboxItem, Study, utcnow


class OutboxRecords:
    """Rows of the outbox (a mixin of Store)."""

    def session(self) -> Session:  # provided by Store
        raise NotImplementedError

    def read_session(self) -> Session:  # provided by Store
        raise NotImplementedError

    def enqueue_outbox(self, items: Sequence[dict]) -> int:
        """Record objects to send (destination, kind, study_key, sop_instance_uid, path); an object
        already recorded for its destination is left as it is. Returns the rows added."""
        if not items:
            return 0
        now = utcnow()
        with self.session() as s, s.begin():
            before = s.scalar(select(func.count()).select_from(OutboxItem)) or 0
            stmt = self._insert(OutboxItem).on_conflict_do_nothing(index_elements=["destination", "sop_instance_uid"])
            s.execute(stmt, [dict(i, status="pending", attempts=0, next_attempt_at=now, last_error="", created_at=now)
                             for i in items])
            return (s.scalar(select(func.count()).select_from(OutboxItem)) or 0) - before

    def outbox_due(self, limit: int = 50) -> list[OutboxItem]:
        with self.read_session() as s:
            return list(s.scalars(select(OutboxItem).where(OutboxItem.status == "pending",
                                                           OutboxItem.next_attempt_at <= utcnow())
                                  .order_by(OutboxItem.next_attempt_at, OutboxItem.id).limit(limit)).all())

    def outbox_sent(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        if ids:
            with self.session() as s, s.begin():
                s.execute(update(OutboxItem).where(OutboxItem.id.in_(ids))
                          .values(status="sent", sent_at=utcnow(), last_error=""))

    def outbox_retry(self, ids: Iterable[int], error: str, max_wait_s: float) -> None:
        """A failed attempt: try again after 10, 20, 40 ... s (at most ``max_wait_s``)."""
        with self.session() as s, s.begin():
            for item in s.scalars(select(OutboxItem).where(OutboxItem.id.in_(list(ids)))):
                item.attempts += 1
                wait = min(max_wait_s, 10.0 * 2 ** (item.attempts - 1))
                item.next_attempt_at = utcnow() + dt.timedelta(seconds=wait)
                item.last_error = error[:1000]

    def outbox_summary(self) -> dict[str, dict]:
        """Per destination: pending, sent, oldest pending, last error."""
        out: dict[str, dict] = {}
        with self.read_session() as s:
            for dest, status, n, oldest in s.execute(
                    select(OutboxItem.destination, OutboxItem.status, func.count(), func.min(OutboxItem.created_at))
                    .group_by(OutboxItem.destination, OutboxItem.status)):
                d = out.setdefault(dest, {"pending": 0, "sent": 0, "oldest_pending": None, "last_error": ""})
                d[status] = n
                if status == "pending":
                    d["oldest_pending"] = oldest
            for dest, error in s.execute(select(OutboxItem.destination, OutboxItem.last_error)
                                         .where(OutboxItem.status == "pending", OutboxItem.last_error != "")
                                         .order_by(OutboxItem.next_attempt_at.desc()).limit(20)):
                out[dest]["last_error"] = out[dest]["last_error"] or error
        return out

    def dicom_studies_touched_since(self, since: dt.datetime, after_id: int = 0, limit: int = 200) -> list[Study]:
        """DICOM studies (not folder studies) updated since ``since``, with images and predictions."""
        with self.read_session() as s:
            return list(s.scalars(select(Study).where(Study.updated_at >= since, Study.id > after_id,
                                                      ~Study.study_key.startswith("folder:"))
                                  .order_by(Study.id).limit(limit)
                                  .options(selectinload(Study.images).selectinload(Image.predictions))).all())
