"""The one module that composes the stages: ingest -> normalize -> infer -> store -> report.

`Scorer.score_tree` streams files in batches, so memory stays flat however
large the folder is. Each file ends as scored, skipped or failed with its
reason; no exception from one file stops the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import multiprocessing
import os
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from batchcxr.domain import FailStage, ImageStatus, PreparedImage, Rejection, SourceFile, FileKind
from batchcxr.infer.runtime import ScoringModel, load_scoring_model
from batchcxr.ingest.files import read_source, walk
from batchcxr.normalize.contract import finish_batch
from batchcxr.normalize.prepare import prepare
from batchcxr.report.overlay import IMAGE_SUFFIX, LAYER_SUFFIX, encode_image, encode_layer, heatmap_layer
from batchcxr.report.render import ReportWriter, atomic_write
from batchcxr.settings import QualitySettings, Settings
from batchcxr.store.repo import ScoredImage, Store

log = logging.getLogger(__name__)

TASK_FILES = 8
"""Files per decode-worker task."""


@dataclass(frozen=True)
class FileOutcome:
    """What became of one file in a run."""

    sha256: str
    status: str
    """scored, skipped, failed, or unchanged (handled by an earlier run)."""
    reason: str = ""
    stage: str = ""
    detail: str = ""


@dataclass
class RunSummary:
    run_id: int
    files: dict[Path, FileOutcome] = field(default_factory=dict)
    scored: int = 0
    unchanged: int = 0
    skipped: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    stages: Counter = field(default_factory=Counter)
    """Seconds per stage: prepare (read + decode + normalize, summed over workers), infer,
    images (display JPEGs and Grad-CAM layers), store, report."""
    index_path: Path | None = None

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


def folder_key(path: Path, root: Path) -> str:
    """Study key for JPEG/PNG files: their folder, relative to the scanned root."""
    base = root if root.is_dir() else root.parent
    try:
        rel = path.parent.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        rel = path.parent.resolve().as_posix()
    return f"folder:{base.resolve().name}/{rel}".rstrip("/.")


def _digest(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(exc))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Prepared:
    """prepare_file's answer: the file, what it became, and the seconds it took."""

    source: SourceFile
    result: PreparedImage | Rejection
    seconds: float


def display_file(sha256: str) -> str:
    """Where an image's display JPEG goes, relative to the reports folder (named by content)."""
    return f"images/{sha256[:24]}{IMAGE_SUFFIX}"


def write_display(item: PreparedImage, reports_dir: Path) -> PreparedImage:
    """Write the display JPEG and drop the array (a fifth of the bytes back from a worker)."""
    rel = display_file(item.source.sha256)
    atomic_write(reports_dir / rel, encode_image(item.display))
    return dataclasses.replace(item, display=None, display_file=rel)


def _read_ahead(path: Path) -> None:
    """Ask the kernel to start reading a file the workers will soon need (Linux; no-op elsewhere),
    so a cold disk read overlaps the decoding of the files before it."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # the worker will record why
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def _init_decode_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would only contend


def prepare_file(path: Path, root: Path, quality: QualitySettings, display_size: int,
                 reports_dir: Path) -> Prepared:
    """Read one file, normalize it and write its display JPEG into ``reports_dir`` (runs in a
    worker process). Never raises for a bad file; a failing report write (disk full) raises."""
    start = time.perf_counter()
    try:
        source, data = read_source(path)
    except OSError as exc:
        source = SourceFile(path, FileKind.OTHER, "", 0)
        reason = f"unreadable: {exc.strerror or exc}"
        return Prepared(source, Rejection(source, ImageStatus.FAILED, FailStage.READ, reason),
                        time.perf_counter() - start)
    try:
        result = prepare(source, data, quality, folder_key(path, root), display_size)
    except Exception as exc:  # noqa: BLE001 - one bad file never stops a run
        log.exception("%s: unexpected error while preparing", path)
        result = Rejection(source, ImageStatus.FAILED, FailStage.DECODE,
                           f"unexpected {type(exc).__name__}: {exc}", detail=_digest(exc))
    if isinstance(result, PreparedImage):
        result = write_display(result, reports_dir)  # not the file's fault if this fails: the run stops
    return Prepared(source, result, time.perf_counter() - start)


def prepare_files(paths: list[Path], root: Path, quality: QualitySettings, display_size: int,
                  reports_dir: Path) -> list[Prepared]:
    """``prepare_file`` for a few files: one worker task, so the pool's per-task cost (pickling,
    futures, ~0.2 ms of the main process's CPU) is paid once per TASK_FILES files."""
    return [prepare_file(path, root, quality, display_size, reports_dir) for path in paths]


def model_threads(settings: Settings, n_models: int) -> int:
    """ONNX Runtime threads per model: the setting, or (0) the cores left by the decode workers
    shared among the models, which run side by side; at least one."""
    if settings.model_threads > 0:
        return settings.model_threads
    return max(1, ((os.cpu_count() or 1) - settings.decode_workers) // max(1, n_models))


class Scorer:
    """Holds the loaded models and settings; scores folder trees into the Store."""

    def __init__(self, settings: Settings, store: Store, models: list[ScoringModel]) -> None:
        if not models:
            raise ValueError("at least one model is needed")
        self.settings = settings
        self.store = store
        self.models = models
        self.reports = ReportWriter(settings.reports_dir, settings.quality.lateral_views)
        self._writer: ThreadPoolExecutor | None = None
        """Per run: the thread that writes a batch's images and rows while the next batch is scored."""
        self._writing = None
        self._infer: ThreadPoolExecutor | None = None
        """Per run: one thread per model, so the models run side by side (ONNX Runtime frees the GIL)."""

    @classmethod
    def from_settings(cls, settings: Settings, store: Store) -> Scorer:
        threads = model_threads(settings, len(settings.models))
        return cls(settings, store, [load_scoring_model(p, threads) for p in settings.models])

    @property
    def versions(self) -> list[str]:
        return [m.version for m in self.models]

    # stage helpers ---------------------------------------------------------
    def _prepared_stream(self, root: Path, paths: list[Path]) -> Iterator[Prepared]:
        """prepare_file over paths, in order; in worker processes when configured and worth it."""
        args = (root, self.settings.quality, self.settings.display_size, self.settings.reports_dir)
        workers = self.settings.decode_workers
        if workers < 1 or len(paths) < 2 * self.settings.batch_size:
            for path in paths:
                yield prepare_file(path, *args)
            return
        head = self.settings.batch_size  # prepared here while the worker processes start (~0.7 s)
        tasks = (paths[i : i + TASK_FILES] for i in range(head, len(paths), TASK_FILES))
        window = max(1, 4 * self.settings.batch_size // TASK_FILES)  # bounded look-ahead: memory stays flat
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_decode_worker) as pool:
            pending: deque = deque()

            def submit_next() -> None:
                task = next(tasks, None)
                if task is not None:
                    for path in task:
                        _read_ahead(path)
                    pending.append(pool.submit(prepare_files, task, *args))

            for _ in range(window):
                submit_next()
            for path in paths[:head]:
                yield prepare_file(path, *args)
            while pending:
                done = pending.popleft().result()
                submit_next()
                yield from done

    def _write_images(self, item: PreparedImage, outputs) -> tuple[str, dict[str, str]]:
        """One Grad-CAM layer per model (prepare_file wrote the display JPEG)."""
        out = self.settings.reports_dir
        shape = (item.image.rows, item.image.columns) if item.image.rows and item.image.columns else (1, 1)
        overlays = {}
        for o in outputs:
            rel = f"images/{item.source.sha256[:24]}-{o.model_name}{LAYER_SUFFIX}"
            atomic_write(out / rel, encode_layer(heatmap_layer(o.heatmap, shape, self.settings.overlay_alpha)))
            overlays[o.model_name] = rel
        return item.display_file, overlays

    def _score_batch(self, run_id: int, batch: list[PreparedImage], summary: RunSummary, changed: set[str]) -> None:
        """Run the models on one batch, then hand its images and rows to the writer thread, so
        the next batch's inference overlaps this batch's images and database rows."""
        import numpy as np

        try:
            t0 = time.perf_counter()
            x = np.stack([p.model_input for p in batch])
            finished = {eq: finish_batch(x, eq) for eq in {m.equalize for m in self.models}}
            outs = self._infer.map(lambda m: m.run_finished(finished[m.equalize]), self.models)
            per_image = list(zip(*outs))
            summary.stages["infer"] += time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001
            log.exception("inference failed for a batch of %d", len(batch))
            rejections = [Rejection(p.source, ImageStatus.FAILED, FailStage.INFER, f"inference failed: {exc}",
                                    p.study, p.image, _digest(exc)) for p in batch]
            self._record_rejections(run_id, rejections, summary, changed)
            return
        self._wait_for_writer()  # at most one batch waits to be written: memory stays flat
        self._writing = self._writer.submit(self._write_batch, run_id, batch, per_image, summary, changed)

    def _wait_for_writer(self) -> None:
        if self._writing is not None:
            self._writing.result()  # re-raises a writer error here
            self._writing = None

    def _write_batch(self, run_id: int, batch: list[PreparedImage], per_image, summary: RunSummary,
                     changed: set[str]) -> None:
        """Overlays and JPEGs first, then the rows: the database never names a missing file."""
        scored = []
        t0 = time.perf_counter()
        for item, outputs in zip(batch, per_image):
            display, overlays = self._write_images(item, outputs)
            scored.append(ScoredImage(item, list(outputs), display, overlays))
        t1 = time.perf_counter()
        self.store.record_scored(run_id, scored)
        summary.stages["images"] += t1 - t0
        summary.stages["store"] += time.perf_counter() - t1
        summary.scored += len(scored)
        for item in batch:
            changed.add(item.study.study_key)
            summary.files[item.source.path] = FileOutcome(item.source.sha256, ImageStatus.SCORED.value)

    def _record_rejections(self, run_id: int, rejections: list[Rejection], summary: RunSummary, changed: set[str]) -> None:
        t0 = time.perf_counter()
        self.store.record_rejections(run_id, rejections)
        summary.stages["store"] += time.perf_counter() - t0
        for r in rejections:
            summary.files[r.source.path] = FileOutcome(r.source.sha256, r.status.value, r.reason, r.stage.value, r.detail)
            (summary.failed if r.status == ImageStatus.FAILED else summary.skipped)[r.reason] += 1
            log.info("%s: %s (%s)", r.source.path, r.status.value, r.reason)
            if r.study is not None:
                changed.add(r.study.study_key)

    # the run ------------------------------------------------------------------
    def score_paths(self, root: Path, paths: Iterable[Path], *, rescore: bool = False, command: str = "score",
                    progress: Callable[[int], None] | None = None) -> RunSummary:
        """Score the given files (found under root) as one run."""
        start = time.monotonic()
        run_id = self.store.start_run(command, str(root), self.versions)
        summary = RunSummary(run_id)
        changed: set[str] = set()
        seen: set[str] = set()
        pending: list[PreparedImage] = []
        chunk: list[tuple[SourceFile, PreparedImage | Rejection]] = []
        paths = list(paths)
        batch_size = self.settings.batch_size

        def flush_chunk() -> None:
            done = set() if rescore else self.store.already_done(
                [s.sha256 for s, _ in chunk if s.sha256], self.versions)
            rejections = []
            for source, result in chunk:
                if source.sha256 and (source.sha256 in done or source.sha256 in seen):
                    summary.unchanged += 1
                    summary.files[source.path] = FileOutcome(source.sha256, "unchanged")
                    continue
                if source.sha256:
                    seen.add(source.sha256)
                (rejections if isinstance(result, Rejection) else pending).append(result)
            if rejections:
                self._record_rejections(run_id, rejections, summary, changed)
            chunk.clear()

        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchcxr-writer")
        self._infer = ThreadPoolExecutor(max_workers=len(self.models), thread_name_prefix="batchcxr-infer")
        self._writing = None
        try:
            for prepared in self._prepared_stream(root, paths):
                summary.stages["prepare"] += prepared.seconds
                chunk.append((prepared.source, prepared.result))
                if progress:
                    progress(1)
                if len(chunk) >= batch_size:
                    flush_chunk()
                while len(pending) >= batch_size:
                    self._score_batch(run_id, pending[:batch_size], summary, changed)
                    del pending[:batch_size]
            flush_chunk()
            if pending:
                self._score_batch(run_id, pending, summary, changed)
            self._wait_for_writer()
            status = "finished"
        except BaseException:
            status = "interrupted"
            raise
        finally:
            self._writer.shutdown(wait=True)
            self._infer.shutdown(wait=True)
            summary.seconds = time.monotonic() - start
            self.store.finish_run(run_id, scored=summary.scored, skipped=sum(summary.skipped.values()),
                                  failed=sum(summary.failed.values()), unchanged=summary.unchanged,
                                  seconds=summary.seconds, status=status)
        t0 = time.perf_counter()
        summary.index_path = self.reports.write_all(self.store, changed, run_id)
        summary.stages["report"] += time.perf_counter() - t0
        summary.seconds = time.monotonic() - start  # the run row holds the time before reports
        return summary

    def score_tree(self, root: Path, **kwargs) -> RunSummary:
        paths = list(walk(root))
        return self.score_paths(root, paths, **kwargs)
