"""Tables. Changing them needs a new Alembic revision in store/migrations/versions/."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
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


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_key: Mapped[str] = mapped_column(String(255), unique=True)
    """StudyInstanceUID, or ``folder:<path>`` for JPEG/PNG studies."""
    patient_name: Mapped[str] = mapped_column(Text, default="")
    patient_id: Mapped[str] = mapped_column(Text, default="")
    accession_number: Mapped[str] = mapped_column(Text, default="")
    study_date: Mapped[str] = mapped_column(String(32), default="")
    study_description: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    images: Mapped[list[Image]] = relationship(back_populates="study")


class Image(Base):
    """A file recognised as an image (scored, or skipped/failed with a reason)."""

    __tablename__ = "images"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"))
    content_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(8))
    sop_instance_uid: Mapped[str] = mapped_column(String(128), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    view_position: Mapped[str] = mapped_column(String(16), default="")
    rows: Mapped[int] = mapped_column(Integer, default=0)
    columns: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    qc_notes: Mapped[str] = mapped_column(Text, default="")
    display_path: Mapped[str] = mapped_column(Text, default="")
    """Plain display image (JPEG), relative to the reports folder."""
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
    label: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[float] = mapped_column(Float)
    heatmap_path: Mapped[str] = mapped_column(Text, default="")
    """Grad-CAM layer (PNG with alpha, stacked over the image by the reports), relative to the reports folder."""
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    image: Mapped[Image] = relationship(back_populates="predictions")


class ErrorRecord(Base):
    """A file a run did not score: skipped (with reason) or failed (with reason and stage)."""

    __tablename__ = "errors"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    path: Mapped[str] = mapped_column(Text)
    content_sha256: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


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
