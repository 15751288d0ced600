"""The Store's paged study lists: the review app's worklist and the static report pages, filtered,
sorted and paged in SQL on the denormalized study results, so a page costs the same at 100
studies and at a million. Mixed into Store (store/repo.py)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from sqlalchemy import and_, bindparam, exists, func, select, true, tuple_, update
from sqlalchemy.orm import Session, selectinload

from batchcxr.store.schema import Image, SourceFile, Study, Verdict

FILTERS = {
    "review": ("all", "unreviewed", "reviewed"),
    "agreement": ("all", "agree", "disagree"),
    "label": ("all", "PNEUMONIA", "NORMAL"),
}
BUCKET = 500
"""Studies per static list page: page k holds ids (k-1)*BUCKET+1 .. k*BUCKET, so a new study
changes only the last page and a rescored one only its own."""


@dataclass(frozen=True)
class WorklistFilter:
    """The worklist's filters (the review app's query parameters)."""

    review: str = "all"
    agreement: str = "all"
    label: str = "all"
    date_from: str = ""
    """DICOM DA, YYYYMMDD."""
    date_to: str = ""

    @classmethod
    def from_args(cls, args) -> WorklistFilter:
        chosen = {k: (args.get(k) if args.get(k) in allowed else "all") for k, allowed in FILTERS.items()}
        return cls(**chosen, date_from=_date(args.get("from")), date_to=_date(args.get("to")))

    def as_args(self) -> dict[str, str]:
        out = {k: getattr(self, k) for k in FILTERS if getattr(self, k) != "all"}
        if self.date_from:
            out["from"] = f"{self.date_from[:4]}-{self.date_from[4:6]}-{self.date_from[6:]}"
        if self.date_to:
            out["to"] = f"{self.date_to[:4]}-{self.date_to[4:6]}-{self.date_to[6:]}"
        return out


def _date(text: str | None) -> str:
    """'2026-11-24' or '20261124' -> '20261124' (DICOM DA); anything else -> ''."""
    if not text:
        return ""
    digits = text.replace("-", "")
    return digits if len(digits) == 8 and digits.isdigit() else ""


def _where(f: WorklistFilter):
    reviewed = exists().where(Verdict.study_id == Study.id)
    conds = []
    if f.review == "reviewed":
        conds.append(reviewed)
    elif f.review == "unreviewed":
        conds.append(~reviewed)
    if f.agreement == "agree":
        conds.append(Study.disagree.is_(False))
    elif f.agreement == "disagree":
        conds.append(Study.disagree.is_(True))
    if f.label == "PNEUMONIA":
        conds.append(Study.positive.is_(True))
    elif f.label == "NORMAL":
        conds.append(Study.negative.is_(True))
    if f.date_from:
        conds.append(and_(Study.study_date != "", Study.study_date >= f.date_from))
    if f.date_to:
        conds.append(and_(Study.study_date != "", Study.study_date <= f.date_to))
    return and_(true(), *conds)


ORDER = (Study.max_score.desc(), Study.id.desc())
"""Worklist order: highest P(pneumonia) shown first, newest first among equals (one backward index scan; a
label or agreement filter walks its own (flag, max_score, id) index instead)."""
COUNT_CAP = 1_000
"""Filtered worklists count their studies up to this; beyond it they say "more than"."""


class StudyLists:
    """Paged study queries (a mixin of Store)."""

    def read_session(self) -> Session:  # provided by Store
        raise NotImplementedError

    def session(self) -> Session:  # provided by Store
        raise NotImplementedError

    def worklist(self, f: WorklistFilter, offset: int, limit: int) -> list[Study]:
        """One page of studies (without images), in worklist order."""
        with self.read_session() as s:
            return list(s.scalars(select(Study).where(_where(f)).order_by(*ORDER).offset(offset).limit(limit)).all())

    def count_studies(self, f: WorklistFilter | None = None, cap: int | None = None) -> int:
        """Studies matching ``f`` (all without it); with ``cap``, counting stops after cap + 1
        (a filtered count over a million studies is a full scan: ~0.4 s; capped, a few ms)."""
        with self.read_session() as s:
            if cap is not None:
                matching = select(Study.id).where(_where(f or WorklistFilter())).limit(cap + 1).subquery()
                return s.scalar(select(func.count()).select_from(matching)) or 0
            q = select(func.count()).select_from(Study)
            if f is not None:
                q = q.where(_where(f))
            return s.scalar(q) or 0

    def neighbours(self, study: Study, f: WorklistFilter) -> tuple[int | None, int | None]:
        """The studies before and after ``study`` in the filtered worklist order (keyset queries).

        Row-value comparisons, so both databases start their index scans at the study: spelled
        out as ``max_score > k OR (max_score = k AND id > i)``, both walked the index from one end
        (at a million studies 25-95 ms a query on PostgreSQL, 9-45 ms on SQLite, against 0.3 and
        0.1 ms)."""
        key, here = tuple_(Study.max_score, Study.id), tuple_(study.max_score, study.id)
        before, after = key > here, key < here
        with self.read_session() as s:
            prev_id = s.scalar(select(Study.id).where(_where(f), before)
                               .order_by(Study.max_score.asc(), Study.id.asc()).limit(1))
            next_id = s.scalar(select(Study.id).where(_where(f), after).order_by(*ORDER).limit(1))
        return prev_id, next_id

    def studies_by_id(self, ids: Sequence[int], with_images: bool = True) -> list[Study]:
        with self.read_session() as s:
            q = select(Study).where(Study.id.in_(list(ids)))
            if with_images:
                q = q.options(selectinload(Study.images).selectinload(Image.predictions))
            return list(s.scalars(q).all())

    def iter_studies_by_id(self, ids: Sequence[int], chunk: int = 200) -> Iterator[Study]:
        """The studies with these ids (with images and predictions), in id order, loaded ``chunk``
        at a time so memory stays flat however many ids there are."""
        ids = sorted(ids)
        for lo in range(0, len(ids), chunk):
            yield from sorted(self.studies_by_id(ids[lo : lo + chunk]), key=lambda st: st.id)

    def stale_studies(self, limit: int = 200, after_id: int = 0) -> list[Study]:
        """Studies whose report page is out of date (with images and predictions), by id."""
        with self.read_session() as s:
            return list(s.scalars(select(Study).where(Study.report_stale.is_(True), Study.id > after_id)
                                  .order_by(Study.id).limit(limit)
                                  .options(selectinload(Study.images).selectinload(Image.predictions))).all())

    def clear_stale(self, written: Iterable[tuple[int, dt.datetime]]) -> None:
        """Pages written from these (id, updated_at) states are current, unless the study changed
        again meanwhile (then it stays stale for the next writer)."""
        rows = list(written)
        if not rows:
            return
        table = Study.__table__
        done = (update(table).where(table.c.id == bindparam("sid"), table.c.updated_at == bindparam("updated"))
                .values(report_stale=False))
        with self.session() as s, s.begin():  # one executemany, not a statement per study
            s.connection().execute(done, [{"sid": sid, "updated": updated} for sid, updated in rows])

    def mark_all_stale(self) -> int:
        """Every study page to be written again (after an upgrade of the templates)."""
        with self.session() as s, s.begin():
            return s.execute(update(Study).values(report_stale=True)).rowcount

    def bucket_studies(self, bucket: int) -> list[Study]:
        """The studies of one static list page (ids in the bucket), in worklist order."""
        lo, hi = (bucket - 1) * BUCKET + 1, bucket * BUCKET
        with self.read_session() as s:
            return list(s.scalars(select(Study).where(Study.id.between(lo, hi)).order_by(*ORDER)).all())

    def max_study_id(self) -> int:
        with self.read_session() as s:
            return s.scalar(select(func.max(Study.id))) or 0

    def archive_counts(self) -> dict[str, int]:
        """Totals for the report index, each one aggregate query (on SQLite each count walks a small
        covering index; one pass with count(CASE) over the studies cost it 105 against 86 ms at a
        million studies, though PostgreSQL's four counts take it twice as long as one pass)."""
        with self.read_session() as s:
            return {
                "studies": s.scalar(select(func.count()).select_from(Study)) or 0,
                "scored_studies": s.scalar(select(func.count()).select_from(Study).where(Study.max_score >= 0)) or 0,
                "positive": s.scalar(select(func.count()).select_from(Study).where(Study.positive.is_(True))) or 0,
                "disagree": s.scalar(select(func.count()).select_from(Study).where(Study.disagree.is_(True))) or 0,
                "images": s.scalar(select(func.count()).select_from(Image)) or 0,
                "failed_files": s.scalar(select(func.count()).select_from(SourceFile)
                                         .where(SourceFile.status == "failed")) or 0,
            }

    def failures_version(self) -> tuple[int, str, int]:
        """(count, newest update, newest id) of failed-file records: the failure pages change only
        when this does."""
        with self.read_session() as s:
            n, newest, top = s.execute(select(func.count(), func.max(SourceFile.updated_at), func.max(SourceFile.id))
                                       .where(SourceFile.status == "failed")).one()
        return int(n or 0), str(newest or ""), int(top or 0)
