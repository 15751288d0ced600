"""HTML reports: one page per study and an index/worklist, from the Store, via Jinja2.

The report folder is self-contained (relative links, images and CSS inside it)
so it opens from file:// on another machine. File names come from hashes,
never from DICOM fields, and every DICOM-derived text is autoescaped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from batchcxr.paths import TEMPLATES_DIR
from batchcxr.store.repo import Store
from batchcxr.store.schema import ErrorRecord, Study

NOTICE = "Research software. Not for diagnostic use: every result needs review by a radiologist."


def study_slug(study_key: str) -> str:
    """File-name-safe id for a study; a hash, so no DICOM text reaches a path."""
    return hashlib.sha256(study_key.encode()).hexdigest()[:16]


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write via a temp file and rename, so no reader sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    try:
        tmp.write_bytes(raw)
    except FileNotFoundError:  # first file in a new folder (one syscall less for all the others)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(raw)
    tmp.replace(path)


@dataclass
class ModelResult:
    id: int
    name: str
    version: str
    probability: float
    threshold: float
    label: str
    overlay: str


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

    @property
    def disagree(self) -> bool:
        return len({r.label for r in self.results}) > 1


@dataclass
class StudyView:
    id: int
    key: str
    slug: str
    patient_name: str
    patient_id: str
    accession_number: str
    study_date: str
    study_description: str
    images: list[ImageView]
    scores: dict[str, float]
    """Study result per model: the highest frontal-image probability."""
    labels: dict[str, str]

    @property
    def max_score(self) -> float:
        return max(self.scores.values(), default=-1.0)

    @property
    def disagree(self) -> bool:
        return len(set(self.labels.values())) > 1 or any(i.disagree for i in self.images)


def study_view(study: Study, lateral_views: tuple[str, ...]) -> StudyView:
    images: list[ImageView] = []
    scores: dict[str, float] = {}
    labels: dict[str, str] = {}
    for img in sorted(study.images, key=lambda i: i.path):
        frontal = img.view_position.upper() not in lateral_views
        results = [
            ModelResult(p.id, p.model_name, p.model_version, p.probability, p.threshold, p.label, p.heatmap_path)
            for p in sorted(img.predictions, key=lambda p: (p.model_name, p.created_at))
        ]
        latest = {r.name: r for r in results}  # newest prediction per model name
        results = sorted(latest.values(), key=lambda r: r.name)
        images.append(ImageView(img.id, img.path, img.status, img.reason, img.qc_notes, img.view_position,
                                frontal, img.display_path, results))
        if img.status == "scored" and frontal:
            for r in results:
                if r.probability > scores.get(r.name, -1.0):
                    scores[r.name] = r.probability
                    labels[r.name] = r.label
    return StudyView(study.id, study.study_key, study_slug(study.study_key), study.patient_name, study.patient_id,
                     study.accession_number, study.study_date, study.study_description, images, scores, labels)


def make_environment() -> Environment:
    """The Jinja2 environment of reports/templates (autoescaped), shared with the web app."""
    return Environment(
        loader=FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=select_autoescape(["html", "xml"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _reasons(errors: list[ErrorRecord]) -> list[tuple[tuple[str, str], int]]:
    """(status, reason) -> count, most frequent first."""
    counts = Counter((e.status, e.reason) for e in errors)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


class ReportWriter:
    """Renders report pages into one folder."""

    def __init__(self, out_dir: Path, lateral_views: tuple[str, ...] = ("LL", "RL", "LAT", "LATERAL")) -> None:
        self.out_dir = Path(out_dir)
        self.lateral_views = lateral_views
        self.env = make_environment()

    def _render(self, template: str, **context: Any) -> str:
        return self.env.get_template(template).render(notice=NOTICE, **context)

    def _copy_static(self) -> None:
        css = TEMPLATES_DIR / "style.css"
        target = self.out_dir / "style.css"
        if not target.exists() or target.read_bytes() != css.read_bytes():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(css, target)

    def write_study(self, view: StudyView) -> Path:
        path = self.out_dir / "studies" / f"{view.slug}.html"
        atomic_write(path, self._render("study.html", study=view, root="../",
                                        image_src=lambda img: "../" + img.display,
                                        overlay_src=lambda result: "../" + result.overlay))
        return path

    def write_index(self, views: list[StudyView], errors: list[ErrorRecord], run: Any | None,
                    runs: list[Any]) -> Path:
        views = sorted(views, key=lambda v: (-v.max_score, v.key))
        path = self.out_dir / "index.html"
        atomic_write(path, self._render(
            "index.html", studies=views, reasons=_reasons(errors), errors=errors, run=run, runs=runs, root="",
            model_names=sorted({name for v in views for name in v.scores}),
            generated=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        ))
        return path

    def write_run(self, run: Any, errors: list[ErrorRecord]) -> Path:
        """The summary page of one run (the nightly job's record)."""
        path = self.out_dir / "runs" / f"run-{run.id}.html"
        atomic_write(path, self._render("run.html", run=run, reasons=_reasons(errors), errors=errors, root="../"))
        return path

    def write_all(self, store: Store, changed_keys: set[str] | None = None, run_id: int | None = None) -> Path:
        """Rewrite pages of changed studies (all when None), any missing page, and the index."""
        self._copy_static()
        views = [study_view(s, self.lateral_views) for s in store.studies()]
        for view in views:
            page = self.out_dir / "studies" / f"{view.slug}.html"
            if changed_keys is None or view.key in changed_keys or not page.exists():
                self.write_study(view)
        run = store.get_run(run_id) if run_id is not None else store.latest_run()
        errors = store.errors(run.id) if run is not None else []
        runs = store.recent_runs()
        for r in runs:
            if (run is not None and r.id == run.id) or not (self.out_dir / "runs" / f"run-{r.id}.html").exists():
                self.write_run(r, errors if run is not None and r.id == run.id else store.errors(r.id))
        return self.write_index(views, errors, run, runs)
