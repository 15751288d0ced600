"""HTML reports: one page per study, paged study lists, the failure lists and an index, from the
Store, via Jinja2.

The report folder is self-contained (relative links, images and CSS inside it) so it opens from
file:// on another machine. File names come from hashes, never from DICOM fields, and every
DICOM-derived text is autoescaped. A run writes only what changed: the pages of studies whose
data changed (the database marks them stale), the list pages holding them, the failure pages
when the set of failed files changed, its run page and the index, which is built from aggregate
queries. So the cost of a run follows the files in it, not the size of the archive.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from batchcxr.paths import TEMPLATES_DIR
from batchcxr.report.files import TMP_DIR, atomic_write, private_dir, remove_stale_temp
from batchcxr.report.names import dicom_date, folder_of, person_name, study_title
from batchcxr.store.lists import BUCKET
from batchcxr.store.schema import ErrorRecord, Study

log = logging.getLogger(__name__)

NOTICE = "Research software. Not for diagnostic use: every result needs review by a radiologist."
FAILURES_PAGE = 200
STALE_CHUNK = 200
INDEX_LIST = 50


def study_slug(study_key: str) -> str:
    """File-name-safe id for a study; a hash, so no DICOM text reaches a path."""
    return hashlib.sha256(study_key.encode()).hexdigest()[:16]


@dataclass
class ModelResult:
    id: int
    name: str
    version: str
    probability: float
    threshold: float
    label: str
    overlay: str
    calibrated: float | None = None
    boxed: bool = False
    """The model saw a lung crop (the outline layer shows its box)."""


@dataclass
class ImageView:
    id: int
    path: str
    status: str
    reason: str
    qc_notes: str
    view_position: str
    frontal: bool
    display: str
    results: list[ModelResult] = field(default_factory=list)
    lungs: str = ""
    """The lung-outline layer, relative to the reports folder."""
    patient_id: str = ""
    patient_name: str = ""
    """What this file says about its patient (shown when the study has a conflict)."""

    @property
    def disagree(self) -> bool:
        return len({r.label for r in self.results}) > 1


@dataclass
class StudyFields:
    """What names a study on every page: formatted, empty fields left for the template to hide."""

    id: int
    key: str
    slug: str
    patient_name: str
    patient_id: str
    accession_number: str
    study_date: str
    study_description: str
    conflict: str = ""
    """Images of this study name different patients (kept as recorded, flagged on every page)."""

    @property
    def title(self) -> str:
        return study_title(self.key, self.patient_name, self.patient_id, self.study_date, self.accession_number)

    @property
    def folder(self) -> str:
        return folder_of(self.key)

    @property
    def display_name(self) -> str:
        return person_name(self.patient_name)

    @property
    def display_date(self) -> str:
        return dicom_date(self.study_date)


@dataclass
class StudyRow(StudyFields):
    """One line of a study list: the study's fields and its result per model (from the study
    row alone)."""

    n_images: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    flagged_disagree: bool = False
    calibrated: dict[str, float | None] = field(default_factory=dict)
    """The calibrated probability of each model's study result (None: the model has none)."""

    @property
    def disagree(self) -> bool:
        return self.flagged_disagree


@dataclass
class StudyView(StudyFields):
    """A whole study for its page."""

    images: list[ImageView] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    """Study result per model: the highest frontal-image probability."""
    labels: dict[str, str] = field(default_factory=dict)
    calibrated: dict[str, float | None] = field(default_factory=dict)
    """That image's calibrated probability per model (None: the model has no calibration): what
    the page shows as P(pneumonia)."""

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def disagree(self) -> bool:
        return len(set(self.labels.values())) > 1 or any(i.disagree for i in self.images)


def _fields(study: Study) -> dict[str, Any]:
    return dict(id=study.id, key=study.study_key, slug=study_slug(study.study_key), patient_name=study.patient_name,
                patient_id=study.patient_id, accession_number=study.accession_number, study_date=study.study_date,
                study_description=study.study_description, conflict=study.conflict or "")


def study_row(study: Study) -> StudyRow:
    results = study.results or {}
    return StudyRow(**_fields(study), n_images=study.n_images, scores={k: v[0] for k, v in results.items()},
                    labels={k: v[1] for k, v in results.items()}, flagged_disagree=bool(study.disagree),
                    calibrated={k: v[2] if len(v) > 2 else None for k, v in results.items()})


def study_view(study: Study, lateral_views: tuple[str, ...]) -> StudyView:
    images: list[ImageView] = []
    scores: dict[str, float] = {}
    labels: dict[str, str] = {}
    calibrated: dict[str, float | None] = {}
    lateral = {v.upper() for v in lateral_views}
    for img in sorted(study.images, key=lambda i: i.path):
        frontal = img.view_position.upper() not in lateral
        results = [
            ModelResult(p.id, p.model_name, p.model_version, p.probability, p.threshold, p.label, p.heatmap_path,
                        p.calibrated)
            for p in sorted(img.predictions, key=lambda p: (p.model_name, p.created_at, p.id))
        ]
        latest = {r.name: r for r in results}  # newest prediction per model name
        results = sorted(latest.values(), key=lambda r: r.name)
        images.append(ImageView(img.id, img.path, img.status, img.reason, img.qc_notes, img.view_position,
                                frontal, img.display_path, results, img.lungs_path, img.patient_id, img.patient_name))
        if img.status == "scored" and frontal:
            for r in results:
                if r.probability > scores.get(r.name, -1.0):
                    scores[r.name], labels[r.name], calibrated[r.name] = r.probability, r.label, r.calibrated
    return StudyView(**_fields(study), images=images, scores=scores, labels=labels, calibrated=calibrated)


def make_environment() -> Environment:
    """The Jinja2 environment of reports/templates (autoescaped), shared with the web app."""
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=select_autoescape(["html", "xml"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["person_name"] = person_name
    env.filters["dicom_date"] = dicom_date
    env.filters["plural"] = lambda n, word, many=None: f"{n} {word if n == 1 else (many or word + 's')}"
    return env


def _reasons(errors: list[ErrorRecord]) -> list[tuple[tuple[str, str], int]]:
    """(status, reason) -> count, most frequent first."""
    counts = Counter((e.status, e.reason) for e in errors)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _utc_now_text() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


class ReportWriter:
    """Renders report pages into one folder."""

    def __init__(self, out_dir: Path, lateral_views: tuple[str, ...] = ("LL", "RL", "LAT", "LATERAL")) -> None:
        self.out_dir = Path(out_dir)
        self.tmp = self.out_dir / TMP_DIR
        self.lateral_views = lateral_views
        self.env = make_environment()

    def _render(self, template: str, **context: Any) -> str:
        return self.env.get_template(template).render(notice=NOTICE, **context)

    def _write(self, rel: str, text: str) -> Path:
        path = self.out_dir / rel
        atomic_write(path, text, self.tmp)
        return path

    def _copy_static(self) -> None:
        private_dir(self.tmp)
        for name in ("style.css", "favicon.svg"):
            source, target = TEMPLATES_DIR / name, self.out_dir / name
            if not target.exists() or target.read_bytes() != source.read_bytes():
                atomic_write(target, source.read_bytes(), self.tmp)

    def clean_temp(self, alive) -> int:
        """Remove temp files left by crashed writers (at start of the watcher)."""
        return remove_stale_temp(self.tmp, alive)

    def write_study(self, view: StudyView) -> Path:
        return self._write(f"studies/{view.slug}.html", self._render(
            "study.html", study=view, root="../", image_src=lambda img: "../" + img.display,
            overlay_src=lambda result: "../" + result.overlay, lungs_src=lambda img: "../" + img.lungs,
            interactive=False))

    def write_bucket(self, store, bucket: int) -> Path:
        rows = [study_row(s) for s in store.bucket_studies(bucket)]
        lo, hi = (bucket - 1) * BUCKET + 1, bucket * BUCKET
        return self._write(f"lists/studies-{bucket}.html", self._render(
            "list.html", studies=rows, bucket=bucket, lo=lo, hi=hi, root="../", generated=_utc_now_text(),
            model_names=sorted({n for r in rows for n in r.scores})))

    def write_failures(self, store) -> int:
        """The failure pages (every file not scored, newest first), when the set changed."""
        marker = self.out_dir / "failures" / "version.json"
        version = list(store.failures_version())
        try:
            if json.loads(marker.read_text()) == version and (self.out_dir / "failures" / "page-1.html").exists():
                return 0
        except (OSError, ValueError):
            pass
        total = version[0]
        pages = max(1, -(-total // FAILURES_PAGE))
        for page in range(1, pages + 1):
            files = store.failed_files((page - 1) * FAILURES_PAGE, FAILURES_PAGE)
            self._write(f"failures/page-{page}.html", self._render(
                "failures.html", files=files, page=page, pages=pages, total=total, root="../",
                generated=_utc_now_text()))
        old = pages + 1
        while (self.out_dir / "failures" / f"page-{old}.html").exists():
            (self.out_dir / "failures" / f"page-{old}.html").unlink()
            old += 1
        atomic_write(marker, json.dumps(version), self.tmp)
        return pages

    def write_run(self, run: Any, errors: list[ErrorRecord]) -> Path:
        """The summary page of one run (the nightly job's record)."""
        return self._write(f"runs/run-{run.id}.html", self._render(
            "run.html", run=run, reasons=_reasons(errors), errors=errors, root="../"))

    def write_stale(self, store) -> set[int]:
        """Pages of every study marked stale; returns the list pages (buckets) they are on."""
        buckets: set[int] = set()
        after = 0
        while True:
            studies = store.stale_studies(STALE_CHUNK, after)
            if not studies:
                return buckets
            for study in studies:
                self.write_study(study_view(study, self.lateral_views))
                buckets.add((study.id - 1) // BUCKET + 1)
            store.clear_stale([(s.id, s.updated_at) for s in studies])
            after = studies[-1].id

    def write_pending(self, store, run_id: int | None = None) -> Path:
        """Bring the report folder up to date after a run: stale study pages, their list pages,
        failure pages if needed, the run's page, missing pages of recent runs, the index."""
        self._copy_static()
        buckets = self.write_stale(store)
        top_id = store.max_study_id()
        last_bucket = (top_id - 1) // BUCKET + 1 if top_id else 0
        for bucket in range(1, last_bucket + 1):
            if bucket in buckets or not (self.out_dir / "lists" / f"studies-{bucket}.html").exists():
                self.write_bucket(store, bucket)
        self.write_failures(store)
        run = store.get_run(run_id) if run_id is not None else store.latest_run()
        errors = store.errors(run.id, limit=5000) if run is not None else []
        runs = store.recent_runs()
        for r in runs:
            if (run is not None and r.id == run.id) or not (self.out_dir / "runs" / f"run-{r.id}.html").exists():
                self.write_run(r, errors if run is not None and r.id == run.id else store.errors(r.id, limit=5000))
        return self.write_index(store, run, errors, runs, last_bucket)

    def write_all(self, store, changed_keys=None, run_id: int | None = None) -> Path:
        """Everything pending (kept for callers of the old name)."""
        return self.write_pending(store, run_id)

    def write_index(self, store, run: Any | None, errors: list[ErrorRecord], runs: list[Any],
                    last_bucket: int) -> Path:
        from batchcxr.store.lists import WorklistFilter

        top = [study_row(s) for s in store.worklist(WorklistFilter(), 0, INDEX_LIST)]
        failed = store.failed_files(0, INDEX_LIST)
        counts = store.archive_counts()
        return self._write("index.html", self._render(
            "index.html", top=top, failed=failed, counts=counts, reasons=_reasons(errors), errors=errors[:200],
            run=run, runs=runs, root="", buckets=list(range(last_bucket, 0, -1)), bucket_size=BUCKET,
            model_names=sorted({n for r in top for n in r.scores}), generated=_utc_now_text(),
            failures_pages=max(1, -(-counts["failed_files"] // FAILURES_PAGE)),
        ))
