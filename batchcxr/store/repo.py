"""The Store: every read and write of results goes through here (no SQL elsewhere)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, insert, select
from sqlalchemy.orm import Session, selectinload

from batchcxr.domain import ImageStatus, ModelOutput, PreparedImage, Rejection, StudyInfo
from batchcxr.store.db import make_engine, migrate
from batchcxr.store.schema import DaemonStatus, ErrorRecord, Image, Prediction, Run, Study, Verdict, utcnow

VERDICTS = ("yes", "no", "uncertain")


@dataclass(frozen=True)
class ScoredImage:
    """What the pipeline hands the store for one scored image."""

    prepared: PreparedImage
    outputs: list[ModelOutput]
    display_path: str
    overlay_paths: dict[str, str]


class Store:
    """Results database over one engine; each public write is one transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url: str) -> Store:
        """Connect and bring the schema up to date."""
        engine = make_engine(url)
        migrate(engine)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False, autoflush=False)

    # runs -------------------------------------------------------------
    def start_run(self, command: str, source: str, model_versions: Sequence[str]) -> int:
        with self.session() as s, s.begin():
            run = Run(command=command, source=source, model_versions=list(model_versions))
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

    def get_run(self, run_id: int) -> Run | None:
        with self.session() as s:
            return s.get(Run, run_id)

    def recent_runs(self, n: int = 20) -> list[Run]:
        with self.session() as s:
            return list(s.scalars(select(Run).order_by(Run.id.desc()).limit(n)).all())

    def latest_run(self) -> Run | None:
        with self.session() as s:
            return s.scalars(select(Run).order_by(Run.id.desc()).limit(1)).first()

    # idempotency ------------------------------------------------------
    def already_done(self, sha256s: Iterable[str], model_versions: Sequence[str]) -> set[str]:
        """Hashes needing no work: scored by every given model version, or skipped/failed before
        (a file that is not an image at all is known by its error rows)."""
        hashes = list(set(sha256s))
        done: set[str] = set()
        with self.session() as s:
            for i in range(0, len(hashes), 500):
                chunk = hashes[i : i + 500]
                rows = s.execute(
                    select(Image.content_sha256, Image.status, func.count(Prediction.id))
                    .outerjoin(Prediction, (Prediction.image_id == Image.id)
                               & Prediction.model_version.in_(list(model_versions)))
                    .where(Image.content_sha256.in_(chunk))
                    .group_by(Image.id)
                ).all()
                for sha, status, n in rows:
                    if status != ImageStatus.SCORED.value or n >= len(model_versions):
                        done.add(sha)
                done.update(s.scalars(select(ErrorRecord.content_sha256).where(
                    ErrorRecord.content_sha256.in_(chunk),
                    ~ErrorRecord.content_sha256.in_(select(Image.content_sha256)))).all())
        return done

    # writes -----------------------------------------------------------
    @staticmethod
    def _study(s: Session, info: StudyInfo) -> Study:
        study = s.scalars(select(Study).where(Study.study_key == info.study_key)).first()
        if study is None:
            study = Study(study_key=info.study_key)
            s.add(study)
            s.flush()  # visible to the next lookup in this transaction (autoflush is off)
        Store._update_study(study, info, utcnow())
        return study

    @staticmethod
    def _update_study(study: Study, info: StudyInfo, now: dt.datetime) -> None:
        for field in ("patient_name", "patient_id", "accession_number", "study_date", "study_description"):
            value = getattr(info, field)
            if value:
                setattr(study, field, value)
        study.updated_at = now

    @staticmethod
    def _image(s: Session, sha256: str) -> Image:
        image = s.scalars(select(Image).where(Image.content_sha256 == sha256)).first()
        if image is None:
            image = Image(content_sha256=sha256, path="", kind="", status="")
            s.add(image)
        return image

    def record_scored(self, run_id: int, items: Sequence[ScoredImage]) -> None:
        """Upsert the studies, images and predictions of one batch in one transaction
        (three look-up queries for the whole batch, not a few per image)."""
        with self.session() as s, s.begin():
            keys = {i.prepared.study.study_key for i in items}
            studies = {st.study_key: st for st in s.scalars(select(Study).where(Study.study_key.in_(keys)))}
            shas = [i.prepared.source.sha256 for i in items]
            images = {im.content_sha256: im for im in s.scalars(select(Image).where(Image.content_sha256.in_(shas)))}
            known_ids = [im.id for im in images.values()]
            preds = {(pr.image_id, pr.model_version): pr for pr in s.scalars(
                select(Prediction).where(Prediction.image_id.in_(known_ids)))} if known_ids else {}
            now = utcnow()
            rows = []
            for item in items:
                p = item.prepared
                study = studies.get(p.study.study_key)
                if study is None:
                    study = studies[p.study.study_key] = Study(study_key=p.study.study_key)
                    s.add(study)
                self._update_study(study, p.study, now)
                image = images.get(p.source.sha256)
                if image is None:
                    image = images[p.source.sha256] = Image(content_sha256=p.source.sha256)
                    s.add(image)
                image.study = study
                image.path, image.kind = str(p.source.path), p.source.kind.value
                image.sop_instance_uid, image.modality = p.image.sop_instance_uid, p.image.modality
                image.view_position, image.rows, image.columns = p.image.view_position, p.image.rows, p.image.columns
                image.status, image.reason = ImageStatus.SCORED.value, ""
                image.qc_notes = "; ".join(p.qc_notes)
                image.display_path = item.display_path
                image.updated_at = now
                rows.append((item, image))
            s.flush()  # ids for new images
            new_preds = []
            for item, image in rows:
                for out in item.outputs:
                    values = dict(run_id=run_id, model_name=out.model_name, probability=out.probability,
                                  label=out.label, threshold=out.threshold,
                                  heatmap_path=item.overlay_paths.get(out.model_name, ""), created_at=now)
                    pred = preds.get((image.id, out.model_version))
                    if pred is None:
                        new_preds.append(dict(values, image_id=image.id, model_version=out.model_version))
                    else:
                        for k, v in values.items():
                            setattr(pred, k, v)
            if new_preds:
                s.execute(insert(Prediction), new_preds)  # one executemany, no unit-of-work objects

    def record_rejections(self, run_id: int, rejections: Sequence[Rejection]) -> None:
        with self.session() as s, s.begin():
            for r in rejections:
                s.add(ErrorRecord(run_id=run_id, path=str(r.source.path), content_sha256=r.source.sha256,
                                  status=r.status.value, stage=r.stage.value, reason=r.reason, detail=r.detail))
                if r.study is None or not r.source.sha256:
                    continue  # not recognisable as an image: the error row is the record
                image = self._image(s, r.source.sha256)
                image.study = self._study(s, r.study)
                image.path, image.kind = str(r.source.path), r.source.kind.value
                if r.image is not None:
                    image.sop_instance_uid, image.modality = r.image.sop_instance_uid, r.image.modality
                    image.view_position, image.rows, image.columns = r.image.view_position, r.image.rows, r.image.columns
                image.status, image.reason = r.status.value, r.reason
                image.updated_at = utcnow()

    def heartbeat(self, name: str, *, pid: int, host: str, state: str, started_at: dt.datetime,
                  files_waiting: int, studies_pending: int, last_scored_at: dt.datetime | None) -> None:
        with self.session() as s, s.begin():
            row = s.get(DaemonStatus, name) or DaemonStatus(name=name)
            row.pid, row.host, row.state, row.started_at = pid, host, state, started_at
            row.heartbeat_at = utcnow()
            row.files_waiting, row.studies_pending, row.last_scored_at = files_waiting, studies_pending, last_scored_at
            s.add(row)

    def add_verdict(self, study_id: int, reviewer: str, verdict: str, note: str = "") -> Verdict:
        """Append a verdict (pneumonia yes / no / uncertain). Raises ValueError for anything else."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, found {verdict!r}")
        with self.session() as s, s.begin():
            if s.get(Study, study_id) is None:
                raise ValueError(f"no study with id {study_id}")
            row = Verdict(study_id=study_id, reviewer=reviewer, verdict=verdict, note=note[:4000])
            s.add(row)
            s.flush()
            return row

    # reads ------------------------------------------------------------
    def latest_verdicts(self) -> dict[int, Verdict]:
        """The latest verdict of each reviewed study, by study id."""
        latest: dict[int, Verdict] = {}
        with self.session() as s:
            for v in s.scalars(select(Verdict).order_by(Verdict.id)):
                latest[v.study_id] = v
        return latest

    def verdict_rows(self) -> list[dict[str, Any]]:
        """Every verdict ever recorded (the append-only log), oldest first."""
        with self.session() as s:
            rows = s.execute(select(Verdict.id, Study.study_key, Study.patient_id, Study.accession_number,
                                    Verdict.reviewer, Verdict.verdict, Verdict.note, Verdict.created_at)
                             .join(Study, Study.id == Verdict.study_id).order_by(Verdict.id)).mappings().all()
        return [{k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in r.items()} for r in rows]

    def study(self, study_id: int) -> Study | None:
        with self.session() as s:
            return s.scalars(select(Study).where(Study.id == study_id)
                             .options(selectinload(Study.images).selectinload(Image.predictions))).first()

    def image_file(self, image_id: int) -> str | None:
        """The display image of an image row (relative to the reports folder), as recorded."""
        with self.session() as s:
            image = s.get(Image, image_id)
            return image.display_path if image and image.display_path else None

    def overlay_file(self, prediction_id: int) -> str | None:
        with self.session() as s:
            pred = s.get(Prediction, prediction_id)
            return pred.heatmap_path if pred and pred.heatmap_path else None

    def outcomes(self, sha256s: Iterable[str]) -> dict[str, tuple[str, str, str, str]]:
        """(status, reason, stage, detail) last recorded for each known content hash."""
        hashes = list(set(sha256s))
        found: dict[str, tuple[str, str, str, str]] = {}
        with self.session() as s:
            for i in range(0, len(hashes), 500):
                chunk = hashes[i : i + 500]
                for e in s.scalars(select(ErrorRecord).where(ErrorRecord.content_sha256.in_(chunk))
                                   .order_by(ErrorRecord.id)):
                    found[e.content_sha256] = (e.status, e.reason, e.stage, e.detail)
                for sha, status in s.execute(select(Image.content_sha256, Image.status)
                                             .where(Image.content_sha256.in_(chunk))):
                    if status == ImageStatus.SCORED.value or sha not in found:
                        found[sha] = (status, "", "", "")
        return found

    def daemons(self) -> list[DaemonStatus]:
        with self.session() as s:
            return list(s.scalars(select(DaemonStatus).order_by(DaemonStatus.name)).all())

    def errors_since(self, since: dt.datetime) -> list[ErrorRecord]:
        with self.session() as s:
            return list(s.scalars(select(ErrorRecord).where(ErrorRecord.created_at >= since)
                                  .order_by(ErrorRecord.id)).all())

    def last_prediction_at(self) -> dt.datetime | None:
        with self.session() as s:
            return s.scalar(select(func.max(Prediction.created_at)))

    def studies(self, keys: Iterable[str] | None = None) -> list[Study]:
        """Studies with their images and predictions loaded."""
        with self.session() as s:
            q = select(Study).options(selectinload(Study.images).selectinload(Image.predictions))
            if keys is not None:
                q = q.where(Study.study_key.in_(list(keys)))
            return list(s.scalars(q).all())

    def errors(self, run_id: int | None = None) -> list[ErrorRecord]:
        with self.session() as s:
            q = select(ErrorRecord).order_by(ErrorRecord.id)
            if run_id is not None:
                q = q.where(ErrorRecord.run_id == run_id)
            return list(s.scalars(q).all())

    def prediction_rows(self) -> list[dict[str, Any]]:
        """One flat row per prediction, for export."""
        with self.session() as s:
            rows = s.execute(
                select(Study.study_key, Study.patient_id, Study.patient_name, Study.accession_number,
                       Study.study_date, Image.path, Image.content_sha256, Image.sop_instance_uid,
                       Prediction.model_name, Prediction.model_version, Prediction.probability,
                       Prediction.label, Prediction.threshold, Prediction.created_at)
                .join(Image, Image.study_id == Study.id)
                .join(Prediction, Prediction.image_id == Image.id)
                .order_by(Study.study_key, Image.path, Prediction.model_name)
            ).mappings().all()
        return [
            {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.items()} for row in rows
        ]
