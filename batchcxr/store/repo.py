"""The Store: every read and write of results goes through here (no SQL elsewhere).

Writes are idempotent upserts keyed by content (study key, image content hash, image + model
version), so a batch written twice - after a crash, by two processes racing on copies of one
file, by a Dask task that ran twice - leaves one row of each. Every value taken from a file is
made to fit its column first (``fit``); a row the database still refuses fails only its file,
never its batch. Reads on SQLite use a second engine whose transactions never take the write
lock, so the review app and exports never hold up the watcher.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Table, bindparam, case, exists, func, literal, select, update
from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError, StatementError
from sqlalchemy.orm import Session, aliased, selectinload

from batchcxr.domain import ImageStatus, ModelOutput, PreparedImage, Rejection, StudyInfo
from batchcxr.store.db import SQLITE_BUSY_TIMEOUT_S, make_engine, migrate
from batchcxr.store.files import FileRecords
from batchcxr.store.lists import StudyLists
from batchcxr.store.outbox import OutboxRecords
from batchcxr.store.review import ReviewRecords
from batchcxr.store.schema import (
    DaemonStatus,
    ErrorRecord,
    Image,
    Prediction,
    Run,
    SourceFile,
    Study,
    Verdict,
    utcnow,
)

log = logging.getLogger(__name__)

VERDICTS = ("yes", "no", "uncertain")
_PREDICTION_COLUMNS = (Study.study_key, Study.patient_id, Study.patient_name, Study.accession_number,
                       Study.study_date, Study.conflict, Image.path, Image.patient_id.label("image_patient_id"),
                       Image.content_sha256, Image.sop_instance_uid,
                       Prediction.model_name, Prediction.model_version, Prediction.probability,
                       Prediction.calibrated.label("calibrated_probability"),
                       Prediction.label, Prediction.threshold, Prediction.created_at)
PREDICTION_FIELDS = tuple(c.key for c in _PREDICTION_COLUMNS)
"""The columns of `batchcxr export`, in order."""
ROW_ERRORS = (DataError, IntegrityError, ProgrammingError, StatementError)
"""What a database raises for one bad row (too long, NUL byte, a constraint): that file fails.
OperationalError (locked, disk full, connection lost) is a fault of the database instead."""
DEFAULT_LATERAL = ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD")
IDENTITY_FIELDS = ("patient_id", "patient_name")
LABELS = {"patient_id": "PatientID", "patient_name": "PatientName"}


def _conflict_text(field: str, first: str, later: str) -> str:
    return f"{LABELS[field]} {later} differs from {first}"
_CONTROL = {c: None for c in range(32) if chr(c) not in "\t\n\r"}


def clean_text(value: str) -> str:
    """Text as a database can store it: NUL and other control characters removed (PostgreSQL
    refuses NUL in text), tabs and line breaks kept."""
    return value.translate(_CONTROL) if isinstance(value, str) else value


def fit(table: Table, values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``values`` cleaned and cut to their columns' lengths, and a note for each value cut."""
    out, notes = {}, []
    for key, value in values.items():
        if isinstance(value, str):
            value = clean_text(value)
            length = getattr(table.c[key].type, "length", None) if key in table.c else None
            if length and len(value) > length:
                notes.append(f"{key} cut to {length} of {len(value)} characters")
                value = value[: length - 9] + "~" + hashlib.sha256(value.encode()).hexdigest()[:8]
        out[key] = value
    return out, notes


@dataclass(frozen=True)
class ScoredImage:
    """What the pipeline hands the store for one scored image."""

    prepared: PreparedImage
    outputs: list[ModelOutput]
    display_path: str
    overlay_paths: dict[str, str]
    lungs_path: str = ""


@dataclass(frozen=True)
class RefusedRow:
    """A file whose rows the database refused (written as a failure instead)."""

    item: ScoredImage | Rejection
    reason: str


@dataclass(frozen=True)
class Known:
    """What an earlier run recorded for a content hash or a path."""

    status: str
    reason: str = ""
    stage: str = ""
    detail: str = ""


def _insert_for(dialect: str):
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(f"upserts need SQLite or PostgreSQL, not {dialect}")
    return insert


def shown(result: Sequence) -> float:
    """The probability a reader sees for a [probability, label, calibrated] result: the calibrated
    one, or the model's raw score where it has no calibration (what the worklist sorts by)."""
    return result[2] if len(result) > 2 and result[2] is not None else result[0]


class Store(FileRecords, StudyLists, ReviewRecords, OutboxRecords):
    """Results database over one engine (plus a read engine for SQLite); each public write is one
    transaction."""

    def __init__(self, engine: Engine, reader: Engine | None = None,
                 lateral_views: Sequence[str] = DEFAULT_LATERAL, quick: Engine | None = None) -> None:
        self.engine = engine
        self.reader = reader or engine
        self.quick = quick or engine
        """For heartbeats and claim renewals: on SQLite a writer that waits at most a second for
        the lock, so a locked database never holds up the daemon's loop."""
        self.lateral_views = tuple(v.upper() for v in lateral_views)
        self.dialect = engine.dialect.name
        self._insert = _insert_for(self.dialect)

    @classmethod
    def open(cls, url: str, *, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S,
             lateral_views: Sequence[str] = DEFAULT_LATERAL, upgrade: bool = True) -> Store:
        """Connect and bring the schema up to date."""
        engine = make_engine(url, busy_timeout_s=busy_timeout_s)
        if upgrade:
            migrate(engine)
        sqlite = url.startswith("sqlite")
        reader = make_engine(url, busy_timeout_s=busy_timeout_s, writer=False) if sqlite else None
        quick = make_engine(url, busy_timeout_s=min(1.0, busy_timeout_s)) if sqlite else None
        return cls(engine, reader, lateral_views, quick)

    def upgrade(self) -> None:
        """Create or upgrade the schema (Store.open does this unless told not to)."""
        migrate(self.engine)

    def close(self) -> None:
        for engine in {id(e): e for e in (self.engine, self.reader, self.quick)}.values():
            engine.dispose()

    def session(self) -> Session:
        """A writing session (on SQLite, its transactions take the write lock at BEGIN)."""
        return Session(self.engine, expire_on_commit=False, autoflush=False)

    def read_session(self) -> Session:
        """A session for reads only: never takes or waits for SQLite's write lock."""
        return Session(self.reader, expire_on_commit=False, autoflush=False)

    # runs -------------------------------------------------------------
    def start_run(self, command: str, source: str, model_versions: Sequence[str], *, host: str = "",
                  pid: int | None = None) -> int:
        with self.session() as s, s.begin():
            run = Run(command=command[:32], source=clean_text(source), model_versions=list(model_versions),
                      host=host[:255], pid=pid)
            s.add(run)
            s.flush()
            return run.id

    def finish_run(self, run_id: int, *, scored: int, skipped: int, failed: int, unchanged: int,
                   seconds: float, status: str = "finished") -> None:
        with self.session() as s, s.begin():
            run = s.get(Run, run_id)
            run.finished_at = utcnow()
            run.status, run.seconds = status, seconds
            run.scored, run.skipped, run.failed, run.unchanged = scored, skipped, failed, unchanged

    def interrupt_stale_runs(self, host: str, alive) -> list[int]:
        """Mark ``running`` runs of ``host`` whose process is gone (``alive(pid)`` false) as
        ``interrupted``; return their ids. Runs of other hosts are left to their own hosts."""
        with self.session() as s, s.begin():
            runs = s.scalars(select(Run).where(Run.status == "running", Run.host == host)).all()
            stale = [r for r in runs if r.pid is None or not alive(r.pid)]
            for r in stale:
                r.status, r.finished_at = "interrupted", r.finished_at or utcnow()
            return [r.id for r in stale]

    def get_run(self, run_id: int) -> Run | None:
        with self.read_session() as s:
            return s.get(Run, run_id)

    def recent_runs(self, n: int = 20) -> list[Run]:
        with self.read_session() as s:
            return list(s.scalars(select(Run).order_by(Run.id.desc()).limit(n)).all())

    def latest_run(self) -> Run | None:
        with self.read_session() as s:
            return s.scalars(select(Run).order_by(Run.id.desc()).limit(1)).first()

    # idempotency ------------------------------------------------------
    def already_done(self, sha256s: Iterable[str], model_versions: Sequence[str]) -> dict[str, Known]:
        """Hashes needing no work, with what was recorded: scored by every given model version,
        or skipped/failed before (a file that is not an image at all is known by its error rows)."""
        hashes = list(set(sha256s))
        done: dict[str, Known] = {}
        with self.read_session() as s:
            for i in range(0, len(hashes), 500):
                chunk = hashes[i : i + 500]
                rows = s.execute(
                    select(Image.content_sha256, Image.status, Image.reason, func.count(Prediction.id))
                    .outerjoin(Prediction, (Prediction.image_id == Image.id)
                               & Prediction.model_version.in_(list(model_versions)))
                    .where(Image.content_sha256.in_(chunk))
                    .group_by(Image.id, Image.content_sha256, Image.status, Image.reason)
                ).all()
                for sha, status, reason, n in rows:
                    if status != ImageStatus.SCORED.value or n >= len(model_versions):
                        done[sha] = Known(status, reason or "")
                missing = [h for h in chunk if h not in done]
                if missing:
                    for e in s.scalars(select(ErrorRecord).where(
                            ErrorRecord.content_sha256.in_(missing),
                            ~ErrorRecord.content_sha256.in_(select(Image.content_sha256))).order_by(ErrorRecord.id)):
                        done[e.content_sha256] = Known(e.status, e.reason, e.stage, e.detail)
        return done

    def scored_by_run(self, sha256s: Iterable[str], run_id: int) -> set[str]:
        """The hashes among these whose predictions run ``run_id`` wrote (a Dask task run again
        after its worker died had already written some of its files)."""
        hashes = list(set(sha256s))
        if not hashes:
            return set()
        with self.read_session() as s:
            return set(s.scalars(select(Image.content_sha256).join(Prediction, Prediction.image_id == Image.id)
                                 .where(Image.content_sha256.in_(hashes), Prediction.run_id == run_id)).all())

    # writes -----------------------------------------------------------
    def _upsert(self, s: Session, model, rows: list[dict], keys: Sequence[str], update_cols: Sequence[str],
                keep_nonempty: Sequence[str] = (), extra_sets: dict | None = None) -> None:
        """INSERT ... ON CONFLICT (keys) DO UPDATE; columns in ``keep_nonempty`` keep the stored
        value unless it is empty; ``extra_sets(table, excluded)`` adds computed updates."""
        if not rows:
            return
        stmt = self._insert(model)
        excluded = stmt.excluded
        table = model.__table__
        sets = {}
        for c in update_cols:
            if c in keep_nonempty:
                sets[c] = case((table.c[c] == "", excluded[c]), else_=table.c[c])
            else:
                sets[c] = excluded[c]
        if extra_sets:
            sets.update(extra_sets(table, excluded))
        s.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=sets), rows)

    def _study_rows(self, infos: Iterable[StudyInfo], now: dt.datetime) -> dict[str, dict]:
        """One row per study key; images of one batch naming different patients set ``conflict``."""
        rows: dict[str, dict] = {}
        for info in infos:
            row, _ = fit(Study.__table__, dict(
                study_key=info.study_key, patient_name=info.patient_name, patient_id=info.patient_id,
                accession_number=info.accession_number, study_date=info.study_date,
                study_description=info.study_description))
            row = dict(row, updated_at=now, report_stale=True, conflict="")
            first = rows.get(info.study_key)
            if first is None:
                rows[info.study_key] = row
                continue
            for f in IDENTITY_FIELDS:
                if first[f] and row[f] and first[f] != row[f] and not first["conflict"]:
                    first["conflict"] = _conflict_text(f, first[f], row[f])
                first[f] = first[f] or row[f]
        return rows

    def _write_studies(self, s: Session, infos: Iterable[StudyInfo], now: dt.datetime) -> dict[str, int]:
        """Upsert studies; return their ids by (original) study key. A study keeps the patient it
        was first seen with: a later file of the same StudyInstanceUID naming another patient sets
        the study's conflict flag instead of overwriting (the file's own values stay on its image)."""
        rows = self._study_rows(infos, now)
        fields = ("patient_name", "patient_id", "accession_number", "study_date", "study_description")

        def conflict(table, excluded):
            cases = [(table.c.conflict != "", table.c.conflict)]
            for f in IDENTITY_FIELDS:
                cases.append(((table.c[f] != "") & (excluded[f] != "") & (table.c[f] != excluded[f]),
                              literal(f"{LABELS[f]} ") + excluded[f] + literal(" differs from ") + table.c[f]))
            return {"conflict": case(*cases, else_=excluded.conflict)}

        # in key order: writers of overlapping batches (Dask workers, two watchers) lock rows in one
        # order, so they wait for each other instead of deadlocking
        self._upsert(s, Study, sorted(rows.values(), key=lambda r: r["study_key"]), ["study_key"],
                     [*fields, "updated_at", "report_stale"], keep_nonempty=fields, extra_sets=conflict)
        fitted = {r["study_key"]: k for k, r in rows.items()}
        found = s.execute(select(Study.study_key, Study.id).where(Study.study_key.in_(list(fitted)))).all()
        return {fitted[key]: sid for key, sid in found}

    def _write_images(self, s: Session, rows: list[dict]) -> dict[str, int]:
        cols = [c for c in rows[0] if c != "content_sha256"]
        self._upsert(s, Image, rows, ["content_sha256"], cols)
        shas = [r["content_sha256"] for r in rows]
        return dict(s.execute(select(Image.content_sha256, Image.id).where(Image.content_sha256.in_(shas))).all())

    def _image_row(self, source, image, status: str, reason: str, study_id: int | None, now: dt.datetime,
                   qc_notes: str = "", display_path: str = "", lungs_path: str = "",
                   study: StudyInfo | None = None) -> dict:
        row, notes = fit(Image.__table__, dict(
            content_sha256=source.sha256, study_id=study_id, path=str(source.path), kind=source.kind.value,
            patient_id=study.patient_id if study else "", patient_name=study.patient_name if study else "",
            sop_instance_uid=image.sop_instance_uid if image else "", modality=image.modality if image else "",
            sop_class_uid=image.sop_class_uid if image else "",
            series_instance_uid=image.series_instance_uid if image else "",
            patient_orientation=image.patient_orientation if image else "",
            view_position=image.view_position if image else "", rows=image.rows if image else 0,
            columns=image.columns if image else 0, status=status, reason=reason, qc_notes=qc_notes,
            display_path=display_path, lungs_path=lungs_path, updated_at=now))
        if notes:
            row["qc_notes"] = "; ".join(x for x in (row["qc_notes"], "; ".join(notes)) if x)
        return row

    def record_scored(self, run_id: int, items: Sequence[ScoredImage]) -> list[RefusedRow]:
        """Upsert the studies, images and predictions of one batch in one transaction. A row the
        database refuses fails its file only: the batch is written again file by file and the
        refused files come back (the caller records them as failed)."""
        if not items:
            return []
        try:
            with self.session() as s, s.begin():
                self._record_scored(s, run_id, items)
            return []
        except ROW_ERRORS as exc:
            if len(items) == 1:
                return [RefusedRow(items[0], f"database refused the record: {_short(exc)}")]
            log.warning("a batch of %d was refused (%s); writing it file by file", len(items), _short(exc))
        refused: list[RefusedRow] = []
        for item in items:
            refused += self.record_scored(run_id, [item])
        return refused

    def _record_scored(self, s: Session, run_id: int, items: Sequence[ScoredImage]) -> None:
        now = utcnow()
        study_ids = self._write_studies(s, [i.prepared.study for i in items], now)
        rows = {}
        for item in items:
            p = item.prepared
            rows[p.source.sha256] = self._image_row(
                p.source, p.image, ImageStatus.SCORED.value, "", study_ids[p.study.study_key], now,
                "; ".join(p.qc_notes), item.display_path, item.lungs_path, p.study)
        image_ids = self._write_images(s, [rows[k] for k in sorted(rows)])  # key order, as the studies
        preds = {}
        for item in items:
            image_id = image_ids[item.prepared.source.sha256]
            for out in item.outputs:
                preds[image_id, out.model_version] = dict(
                    image_id=image_id, model_version=out.model_version, run_id=run_id, model_name=out.model_name,
                    probability=out.probability, calibrated=out.calibrated, label=out.label, threshold=out.threshold,
                    heatmap_path=item.overlay_paths.get(out.model_name, ""), created_at=now)
        self._upsert(s, Prediction, [preds[k] for k in sorted(preds)], ["image_id", "model_version"],
                     ["run_id", "model_name", "probability", "calibrated", "label", "threshold", "heatmap_path",
                      "created_at"])
        self._refresh_studies(s, set(study_ids.values()))
        self._write_sources(s, run_id, [(i.prepared.source, ImageStatus.SCORED.value, "", "") for i in items], now)

    def restate(self, run_id: int, name: str, weights: str, version: str, threshold: float,
                calibrate: Callable[[float], float | None], chunk: int = 2000) -> int:
        """Give each image whose newest ``name`` prediction is of these weights under another
        calibration (versions ``weights`` and ``weights``-c...) a prediction of ``version`` without
        running the model: that prediction's raw probability and Grad-CAM layer, ``calibrate(raw)``,
        the label at ``threshold``, recorded by ``run_id``. Images that have a prediction of
        ``version``, or whose newest result is other weights', are left alone (a run naming
        ``version`` scores the latter). Their studies' results are recomputed and their report pages
        marked stale. One transaction per ``chunk`` images, in image order: a run stopped half-way
        is finished by running it again. Returns the number of predictions written."""
        newer = aliased(Prediction)
        family = (Prediction.model_version == weights) | Prediction.model_version.startswith(weights + "-c",
                                                                                             autoescape=True)
        old = ((Prediction.model_name == name) & (Prediction.model_version != version) & family
               & ~exists().where(newer.image_id == Prediction.image_id, newer.model_version == version))
        written, after = 0, 0
        while True:
            with self.session() as s, s.begin():
                ids = s.scalars(select(Prediction.image_id).where(old, Prediction.image_id > after)
                                .group_by(Prediction.image_id).order_by(Prediction.image_id).limit(chunk)).all()
                if not ids:
                    return written
                latest: dict[int, tuple[float, str, int, bool]] = {}
                for image_id, raw, layer, study_id, ours in s.execute(
                        select(Prediction.image_id, Prediction.probability, Prediction.heatmap_path, Image.study_id,
                               family).join(Image, Image.id == Prediction.image_id)
                        .where(Prediction.model_name == name, Prediction.image_id.in_(ids))
                        .order_by(Prediction.created_at, Prediction.id)):
                    latest[image_id] = (raw, layer, study_id, bool(ours))  # the newest last
                latest = {k: v for k, v in latest.items() if v[3]}
                now = utcnow()
                rows = [dict(image_id=image_id, model_version=version, run_id=run_id, model_name=name, probability=raw,
                             calibrated=calibrate(raw), label="PNEUMONIA" if raw >= threshold else "NORMAL",
                             threshold=threshold, heatmap_path=layer, created_at=now)
                        for image_id, (raw, layer, _, _) in sorted(latest.items())]
                if rows:
                    touched = {study_id for _, _, study_id, _ in latest.values()}
                    # a watcher may score one of these images with ``version`` meanwhile: its row stands
                    s.execute(self._insert(Prediction)
                              .on_conflict_do_nothing(index_elements=["image_id", "model_version"]), rows)
                    self._refresh_studies(s, touched)
                    s.execute(update(Study).where(Study.id.in_(sorted(touched)))
                              .values(report_stale=True, updated_at=now))
                written, after = written + len(rows), ids[-1]

    def record_rejections(self, run_id: int, rejections: Sequence[Rejection]) -> list[RefusedRow]:
        """Error rows, and image/study rows for files recognisable as images; the same fallback
        as record_scored (a refused file is written again with only its reason)."""
        if not rejections:
            return []
        try:
            with self.session() as s, s.begin():
                self._record_rejections(s, run_id, rejections)
            return []
        except ROW_ERRORS as exc:
            if len(rejections) > 1:
                refused: list[RefusedRow] = []
                for r in rejections:
                    refused += self.record_rejections(run_id, [r])
                return refused
            reason = f"database refused the record: {_short(exc)}"
            bare = Rejection(rejections[0].source, ImageStatus.FAILED, rejections[0].stage,
                             f"{rejections[0].reason} ({reason})"[:2000])
            with self.session() as s, s.begin():
                self._record_rejections(s, run_id, [bare])
            return [RefusedRow(rejections[0], reason)]

    def _record_rejections(self, s: Session, run_id: int, rejections: Sequence[Rejection]) -> None:
        now = utcnow()
        errors = []
        for r in rejections:
            row, _ = fit(ErrorRecord.__table__, dict(run_id=run_id, path=str(r.source.path),
                                                     content_sha256=r.source.sha256, status=r.status.value,
                                                     stage=r.stage.value, reason=r.reason, detail=r.detail,
                                                     created_at=now))
            errors.append(row)
        s.execute(ErrorRecord.__table__.insert(), errors)
        with_study = [r for r in rejections if r.study is not None and r.source.sha256]
        if with_study:  # recognisable as an image: the image row keeps the reason
            study_ids = self._write_studies(s, [r.study for r in with_study], now)
            rows = {r.source.sha256: self._image_row(r.source, r.image, r.status.value, r.reason,
                                                     study_ids[r.study.study_key], now, study=r.study)
                    for r in with_study}
            self._write_images(s, list(rows.values()))
            self._refresh_studies(s, set(study_ids.values()))
        self._write_sources(s, run_id, [(r.source, r.status.value, r.stage.value, r.reason) for r in rejections], now)

    def _refresh_studies(self, s: Session, study_ids: set[int]) -> None:
        """Recompute the denormalized study results (the StudyView rules: the newest prediction
        per model of each frontal scored image; the study's result is the highest)."""
        if not study_ids:
            return
        ids = sorted(study_ids)
        images = s.execute(select(Image.id, Image.study_id, Image.status, Image.view_position)
                           .where(Image.study_id.in_(ids))).all()
        preds = s.execute(select(Prediction.image_id, Prediction.model_name, Prediction.probability,
                                 Prediction.label, Prediction.calibrated, Prediction.created_at, Prediction.id)
                          .join(Image, Image.id == Prediction.image_id).where(Image.study_id.in_(ids))
                          .order_by(Prediction.created_at, Prediction.id)).all()
        latest: dict[int, dict[str, tuple[float, str, float | None]]] = defaultdict(dict)
        for image_id, name, probability, label, calibrated, _, _ in preds:
            latest[image_id][name] = (probability, label, calibrated)
        per_study: dict[int, dict] = {sid: dict(best={}, disagree=False, n=0) for sid in ids}
        for image_id, study_id, status, view in images:
            agg = per_study[study_id]
            agg["n"] += 1
            results = latest.get(image_id, {})
            if len({r[1] for r in results.values()}) > 1:
                agg["disagree"] = True
            if status != ImageStatus.SCORED.value or (view or "").upper() in self.lateral_views:
                continue
            for name, result in results.items():
                if result[0] > agg["best"].get(name, (-1.0,))[0]:
                    agg["best"][name] = result
        rows = []
        for sid, agg in per_study.items():
            labels = {r[1] for r in agg["best"].values()}
            results = {name: list(r) for name, r in sorted(agg["best"].items())}
            rows.append(dict(b_id=sid, max_score=max((shown(r) for r in agg["best"].values()), default=-1.0),
                             results=results,
                             positive="PNEUMONIA" in labels, negative="NORMAL" in labels,
                             disagree=agg["disagree"] or len(labels) > 1, n_images=agg["n"]))
        table = Study.__table__
        s.connection().execute(
            update(table).where(table.c.id == bindparam("b_id"))
            .values(max_score=bindparam("max_score"), results=bindparam("results", type_=table.c.results.type),
                    positive=bindparam("positive"), negative=bindparam("negative"), disagree=bindparam("disagree"),
                    n_images=bindparam("n_images")),
            rows)

    def heartbeat(self, name: str, *, pid: int, host: str, state: str, started_at: dt.datetime,
                  files_waiting: int, studies_pending: int, last_scored_at: dt.datetime | None,
                  fault: str = "", fault_since: dt.datetime | None = None, oldest_waiting_s: float = 0.0) -> None:
        with Session(self.quick, expire_on_commit=False) as s, s.begin():
            row = s.get(DaemonStatus, name) or DaemonStatus(name=name)
            row.pid, row.host, row.state, row.started_at = pid, host, state, started_at
            row.heartbeat_at = utcnow()
            row.files_waiting, row.studies_pending, row.last_scored_at = files_waiting, studies_pending, last_scored_at
            row.fault, row.fault_since = clean_text(fault), fault_since
            row.oldest_waiting_s = oldest_waiting_s
            s.add(row)

    def add_verdict(self, study_id: int, reviewer: str, verdict: str, note: str = "") -> Verdict:
        """Append a verdict (pneumonia yes / no / uncertain). Raises ValueError for anything else."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, found {verdict!r}")
        with self.session() as s, s.begin():
            if s.get(Study, study_id) is None:
                raise ValueError(f"no study with id {study_id}")
            row = Verdict(study_id=study_id, reviewer=reviewer, verdict=verdict, note=clean_text(note)[:4000])
            s.add(row)
            s.flush()
            return row

    # reads ------------------------------------------------------------
    def latest_verdicts(self, study_ids: Iterable[int] | None = None) -> dict[int, Verdict]:
        """The latest verdict of each reviewed study (of the given ones), by study id."""
        latest: dict[int, Verdict] = {}
        with self.read_session() as s:
            q = select(Verdict).order_by(Verdict.id)
            if study_ids is not None:
                q = q.where(Verdict.study_id.in_(list(study_ids)))
            for v in s.scalars(q):
                latest[v.study_id] = v
        return latest

    def count_reviewed(self) -> int:
        with self.read_session() as s:
            return s.scalar(select(func.count(func.distinct(Verdict.study_id)))) or 0

    def verdict_rows(self) -> list[dict[str, Any]]:
        """Every verdict ever recorded (the append-only log), oldest first."""
        return list(self.iter_verdict_rows())

    def iter_verdict_rows(self) -> Iterator[dict[str, Any]]:
        """Every verdict ever recorded (the append-only log), oldest first, streamed."""
        query = (select(Verdict.id, Study.study_key, Study.patient_id, Study.accession_number,
                        Verdict.reviewer, Verdict.verdict, Verdict.note, Verdict.created_at)
                 .join(Study, Study.id == Verdict.study_id).order_by(Verdict.id))
        with self.reader.connect() as conn:
            for row in conn.execution_options(yield_per=2000).execute(query).mappings():
                yield dict(row)

    def study(self, study_id: int) -> Study | None:
        with self.read_session() as s:
            return s.scalars(select(Study).where(Study.id == study_id)
                             .options(selectinload(Study.images).selectinload(Image.predictions))).first()

    def image_file(self, image_id: int) -> str | None:
        """The display image of an image row (relative to the reports folder), as recorded."""
        with self.read_session() as s:
            image = s.get(Image, image_id)
            return image.display_path if image and image.display_path else None

    def count_study_images(self, study_keys: Sequence[str]) -> dict[str, int]:
        """Images recorded per study key (pull skips studies it already has)."""
        if not study_keys:
            return {}
        with self.read_session() as s:
            return dict(s.execute(select(Study.study_key, func.count(Image.id)).join(Image, Image.study_id == Study.id)
                                  .where(Study.study_key.in_(list(study_keys))).group_by(Study.study_key)).all())

    def lungs_file(self, image_id: int) -> str | None:
        """The lung-outline layer of an image row, as recorded."""
        with self.read_session() as s:
            image = s.get(Image, image_id)
            return image.lungs_path if image and image.lungs_path else None

    def overlay_file(self, prediction_id: int) -> str | None:
        with self.read_session() as s:
            pred = s.get(Prediction, prediction_id)
            return pred.heatmap_path if pred and pred.heatmap_path else None

    def outcomes(self, sha256s: Iterable[str]) -> dict[str, Known]:
        """What was last recorded for each known content hash."""
        hashes = list(set(sha256s))
        found: dict[str, Known] = {}
        with self.read_session() as s:
            for i in range(0, len(hashes), 500):
                chunk = hashes[i : i + 500]
                for e in s.scalars(select(ErrorRecord).where(ErrorRecord.content_sha256.in_(chunk))
                                   .order_by(ErrorRecord.id)):
                    found[e.content_sha256] = Known(e.status, e.reason, e.stage, e.detail)
                for sha, status in s.execute(select(Image.content_sha256, Image.status)
                                             .where(Image.content_sha256.in_(chunk))):
                    if status == ImageStatus.SCORED.value or sha not in found:
                        found[sha] = Known(status)
        return found

    def daemons(self) -> list[DaemonStatus]:
        with self.read_session() as s:
            return list(s.scalars(select(DaemonStatus).order_by(DaemonStatus.name)).all())

    def errors_since(self, since: dt.datetime, limit: int = 1000) -> list[ErrorRecord]:
        with self.read_session() as s:
            return list(s.scalars(select(ErrorRecord).where(ErrorRecord.created_at >= since)
                                  .order_by(ErrorRecord.id.desc()).limit(limit)).all())[::-1]

    def count_errors_since(self, since: dt.datetime) -> dict[str, int]:
        with self.read_session() as s:
            return dict(s.execute(select(ErrorRecord.status, func.count()).where(ErrorRecord.created_at >= since)
                                  .group_by(ErrorRecord.status)).all())

    def last_prediction_at(self) -> dt.datetime | None:
        with self.read_session() as s:
            return s.scalar(select(func.max(Prediction.created_at)))

    def studies(self, keys: Iterable[str] | None = None) -> list[Study]:
        """Studies with their images and predictions loaded (all of them when keys is None:
        for tests and small databases; pages use the paged queries)."""
        with self.read_session() as s:
            q = select(Study).options(selectinload(Study.images).selectinload(Image.predictions))
            if keys is not None:
                q = q.where(Study.study_key.in_(list(keys)))
            return list(s.scalars(q).all())

    def errors(self, run_id: int | None = None, limit: int | None = None) -> list[ErrorRecord]:
        with self.read_session() as s:
            q = select(ErrorRecord).order_by(ErrorRecord.id)
            if run_id is not None:
                q = q.where(ErrorRecord.run_id == run_id)
            if limit is not None:
                q = q.limit(limit)
            return list(s.scalars(q).all())

    def iter_prediction_rows(self, chunk: int = 2000) -> Iterator[dict[str, Any]]:
        """One flat row per prediction (PREDICTION_FIELDS), for export, streamed ``chunk`` rows at a
        time so memory stays flat however large the archive."""
        query = (select(*_PREDICTION_COLUMNS)
                 .join(Image, Image.study_id == Study.id)
                 .join(Prediction, Prediction.image_id == Image.id)
                 .order_by(Study.study_key, Image.path, Prediction.model_name, Prediction.id))
        with self.reader.connect() as conn:
            for row in conn.execution_options(yield_per=chunk).execute(query).mappings():
                yield dict(row)

    def prediction_rows(self) -> list[dict[str, Any]]:
        """Every prediction row (iter_prediction_rows as a list, datetimes as ISO text)."""
        return [{k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.items()}
                for row in self.iter_prediction_rows()]


def _short(exc: BaseException) -> str:
    """The first line of a database error, without the SQL and parameters SQLAlchemy appends."""
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0][:300] if text else type(exc).__name__
