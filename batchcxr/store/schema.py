"""Tables. Changing them needs a new Alembic revision in store/migrations/versions/."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Run(Base):
    """One `batchcxr score` (or watcher batch): when, what, and how it went."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    command: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="running")
    scored: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    unchanged: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float | None] = mapped_column(Float)
    model_versions: Mapped[list] = mapped_column(JSON, default=list)
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int | None] = mapped_column(Integer)
    """Who ran it: a run left ``running`` by a process that is gone is marked ``interrupted``."""


class Study(Base):
    """A study, with its result per model kept up to date (denormalized) so lists sort and filter
    in SQL however large the archive."""

    __tablename__ = "studies"
    __table_args__ = (Index("ix_studies_max_score", "max_score", "id"), Index("ix_studies_study_date", "study_date"),
                      Index("ix_studies_report_stale", "report_stale"),
                      Index("ix_studies_updated_at", "updated_at"),  # the studies a run touched (outbox)
                      # the worklist filtered by label or agreement, in score order, without walking the
                      # whole archive (normals sit at the end of the score order)
                      Index("ix_studies_positive_score", "positive", "max_score", "id"),
                      Index("ix_studies_negative_score", "negative", "max_score", "id"),
                      Index("ix_studies_disagree_score", "disagree", "max_score", "id"),
                      Index("ix_studies_positive_disagree_score", "positive", "disagree", "max_score", "id"),
                      Index("ix_studies_negative_disagree_score", "negative", "disagree", "max_score", "id"))
    id: Mapped[int] = mapped_column(primary_key=True)
    study_key: Mapped[str] = mapped_column(String(255), unique=True)
    """StudyInstanceUID, or ``folder:<path>`` for JPEG/PNG studies."""
    patient_name: Mapped[str] = mapped_column(Text, default="")
    patient_id: Mapped[str] = mapped_column(Text, default="")
    accession_number: Mapped[str] = mapped_column(Text, default="")
    study_date: Mapped[str] = mapped_column(String(32), default="")
    study_description: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    max_score: Mapped[float] = mapped_column(Float, default=-1.0)
    """Highest frontal-image probability over all models as readers see it (calibrated; a model
    without a calibration: its raw score), what the worklist sorts by (-1: nothing scored; never
    NULL, so the worklist order is one index scan on SQLite and PostgreSQL alike)."""
    positive: Mapped[bool] = mapped_column(Boolean, default=False)
    """Some model labels the study PNEUMONIA."""
    negative: Mapped[bool] = mapped_column(Boolean, default=False)
    """Some model labels the study NORMAL."""
    disagree: Mapped[bool] = mapped_column(Boolean, default=False)
    """The models' labels differ on the study or on one of its images."""
    n_images: Mapped[int] = mapped_column(Integer, default=0)
    results: Mapped[dict | None] = mapped_column(JSON)
    """Study result per model: {model name: [probability, label, calibrated probability or None]}
    (highest frontal image; rows written before revision 0009 may lack the third)."""
    conflict: Mapped[str] = mapped_column(Text, default="")
    """Set when images of this StudyInstanceUID name different patients (kept as data, never overwritten)."""
    report_stale: Mapped[bool] = mapped_column(Boolean, default=True)
    """The static report page is older than the study's data (written, then cleared, by ReportWriter)."""
    images: Mapped[list[Image]] = relationship(back_populates="study")


class Image(Base):
    """A file recognised as an image (scored, or skipped/failed with a reason)."""

    __tablename__ = "images"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    content_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(8))
    sop_instance_uid: Mapped[str] = mapped_column(String(128), default="")
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    series_instance_uid: Mapped[str] = mapped_column(String(128), default="")
    patient_orientation: Mapped[str] = mapped_column(String(32), default="")
    patient_id: Mapped[str] = mapped_column(Text, default="")
    patient_name: Mapped[str] = mapped_column(Text, default="")
    """What this file says about its patient (the study keeps the first; a difference is a conflict)."""
    modality: Mapped[str] = mapped_column(String(16), default="")
    view_position: Mapped[str] = mapped_column(String(16), default="")
    rows: Mapped[int] = mapped_column(Integer, default=0)
    columns: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    qc_notes: Mapped[str] = mapped_column(Text, default="")
    display_path: Mapped[str] = mapped_column(Text, default="")
    """Plain display image (JPEG), relative to the reports folder."""
    lungs_path: Mapped[str] = mapped_column(Text, default="")
    """Lung-outline layer (SVG; PNG with alpha before 2026-12) the pages stack over the image, relative to the
    reports folder."""
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    study: Mapped[Study | None] = relationship(back_populates="images")
    predictions: Mapped[list[Prediction]] = relationship(back_populates="image")


class Prediction(Base):
    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("image_id", "model_version", name="uq_prediction_image_version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(128))
    probability: Mapped[float] = mapped_column(Float)
    calibrated: Mapped[float | None] = mapped_column(Float)
    """P(pneumonia) after the model card's calibration (None: the model has none)."""
    label: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[float] = mapped_column(Float)
    heatmap_path: Mapped[str] = mapped_column(Text, default="")
    """Grad-CAM layer (PNG with alpha, stacked over the image by the reports), relative to the reports folder."""
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    """When it was recorded (again, when rescored); indexed for the last prediction's time."""
    image: Mapped[Image] = relationship(back_populates="predictions")


class ErrorRecord(Base):
    """A file a run did not score: skipped (with reason) or failed (with reason and stage)."""

    __tablename__ = "errors"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    content_sha256: Mapped[str] = mapped_column(String(64), default="", index=True)
    status: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class DaemonStatus(Base):
    """The watcher's heartbeat, read by `batchcxr status`."""

    __tablename__ = "daemon_status"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    """``watch:<drop folder>``."""
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[dt.datetime] = mapped_column(DateTime)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime)
    files_waiting: Mapped[int] = mapped_column(Integer, default=0)
    studies_pending: Mapped[int] = mapped_column(Integer, default=0)
    last_scored_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    fault: Mapped[str] = mapped_column(Text, default="")
    """What stops the daemon from working now (disk full, database locked...); empty when healthy."""
    fault_since: Mapped[dt.datetime | None] = mapped_column(DateTime)
    oldest_waiting_s: Mapped[float] = mapped_column(Float, default=0.0)
    """How long the longest-waiting file has been waiting (a backlog shows here)."""


class Verdict(Base):
    """A reviewer's verdict on a study. Append-only: a changed mind is a new row; the latest counts."""

    __tablename__ = "verdicts"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    reviewer: Mapped[str] = mapped_column(String(128))
    verdict: Mapped[str] = mapped_column(String(16))
    """pneumonia: yes, no or uncertain."""
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class SourceFile(Base):
    """The last outcome for each input path, with the file's identity: a file seen again with
    the same identity is known without being read (restarts, reruns, the nightly job)."""

    __tablename__ = "source_files"
    __table_args__ = (Index("ix_source_files_status_updated", "status", "updated_at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    path_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """sha256 of the path (paths can be longer than an index allows)."""
    path: Mapped[str] = mapped_column(Text)
    device: Mapped[int] = mapped_column(BigInteger, default=0)
    inode: Mapped[int] = mapped_column(BigInteger, default=0)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    mtime_ns: Mapped[int] = mapped_column(BigInteger, default=0)
    content_sha256: Mapped[str] = mapped_column(String(64), default="", index=True)
    status: Mapped[str] = mapped_column(String(16))
    """scored, skipped, failed; ``removed`` once a failed file is gone."""
    stage: Mapped[str] = mapped_column(String(16), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    moved_to: Mapped[str] = mapped_column(Text, default="")
    """Where the watcher moved the file (archive or quarantine), if it did."""
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Claim(Base):
    """A path being read and scored by one process: others leave it alone until the claim is
    released or expires (the watcher and the nightly job share a folder this way)."""

    __tablename__ = "claims"
    path_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    owner: Mapped[str] = mapped_column(String(255))
    claimed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)


class IncompleteFile(Base):
    """A file the watcher found incomplete, and since when it has not changed: the quarantine
    timer survives restarts."""

    __tablename__ = "incomplete_files"
    path_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    unchanged_since: Mapped[dt.datetime] = mapped_column(DateTime)


class WebSession(Base):
    """A review-app login. The cookie carries only its random token (hashed here); logout, a new
    password, an idle or absolute timeout or `batchcxr sessions revoke` ends it server-side."""

    __tablename__ = "web_sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user: Mapped[str] = mapped_column(String(128), index=True)
    password_fingerprint: Mapped[str] = mapped_column(String(16))
    address: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    ended_why: Mapped[str] = mapped_column(String(32), default="")


class LoginThrottle(Base):
    """Failed logins per user name and per client address ("user:alice", "addr:10.0.0.5"), kept in
    the database so the back-off holds across restarts and threads."""

    __tablename__ = "login_throttle"
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_failure_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    wait_until: Mapped[dt.datetime | None] = mapped_column(DateTime)


class AuditEvent(Base):
    """Who did what, when, from where: append-only (database triggers refuse updates and deletes)."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    user: Mapped[str] = mapped_column(String(128), default="")
    address: Mapped[str] = mapped_column(String(64), default="")
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[str] = mapped_column(Text, default="")


class OutboxItem(Base):
    """A DICOM object to send to one destination (an SR, an SC or a GSPS), recorded before it is
    sent, retried with back-off, marked sent only on a success status. Its SOP Instance UID is
    derived from what it reports, so a resend replaces and never duplicates."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("destination", "sop_instance_uid", name="uq_outbox_destination_uid"),
                      Index("ix_outbox_status_next", "status", "next_attempt_at"))
    id: Mapped[int] = mapped_column(primary_key=True)
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))
    """sr, sc or gsps."""
    study_key: Mapped[str] = mapped_column(String(255))
    sop_instance_uid: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(Text)
    """The encoded object, in the outbox folder."""
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
