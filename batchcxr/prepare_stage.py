"""The prepare stage - read one file, normalize it, write its display JPEG - as the decode workers
run it. It imports only what that needs (no models, database or templates), so a decode worker
starts in about a third of the time the whole pipeline takes to import; pipeline.py runs it in
its workers, or in its own process, and the Dask workers run the same function."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from batchcxr.domain import Deferred, FailStage, FileKind, ImageStatus, PreparedImage, Rejection, SourceFile
from batchcxr.errors import FileChanged, FileTooLarge, FileVanished, NotRegularFile
from batchcxr.ingest.complete import is_complete
from batchcxr.ingest.files import read_regular
from batchcxr.report.files import TMP_DIR, atomic_write
from batchcxr.report.overlay import IMAGE_SUFFIX, encode_image
from batchcxr.settings import QualitySettings, Settings

log = logging.getLogger(__name__)


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
    result: PreparedImage | Rejection | Deferred
    seconds: float


def display_file(sha256: str) -> str:
    """Where an image's display JPEG goes, relative to the reports folder (named by content)."""
    return f"images/{sha256[:24]}{IMAGE_SUFFIX}"


def write_display(item: PreparedImage, reports_dir: Path) -> PreparedImage:
    """Write the display JPEG and drop the array (a fifth of the bytes back from a worker)."""
    rel = display_file(item.source.sha256)
    atomic_write(reports_dir / rel, encode_image(item.display), reports_dir / TMP_DIR)
    return dataclasses.replace(item, display=None, display_file=rel)


def _init_decode_worker(parent: int) -> None:
    """Decode workers die with the process that started them, whatever kills it (Linux
    PR_SET_PDEATHSIG), ignore SIGTERM and SIGINT (systemd signals the whole control group; the
    parent decides when its batch is done), and keep OpenCV to one thread."""
    import signal

    import cv2

    from batchcxr.signals import die_with_parent

    die_with_parent(parent)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would only contend
    import batchcxr.normalize.prepare  # noqa: F401 - the decoders (pydicom, ~0.3 s) before the first task


def start_decoders(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` decode workers, started now. Each is a spawned child (it dies with
    this process) that takes ~0.35 s to import the prepare stage, so a command that starts them
    before importing and loading the rest (models, database, templates: ~1 s) finds them ready
    when the first files are admitted, instead of a core idling at the start of every run."""
    import multiprocessing

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_decode_worker, initargs=(os.getpid(),))
    for _ in range(workers):
        pool.submit(os.getpid)  # a task finds no idle worker, so each starts one more
    return pool


def early_decoders(settings: Settings, files: int) -> ProcessPoolExecutor | None:
    """``start_decoders`` when a run of ``files`` files will use decode workers (configured, not
    on Dask, at least two batches to read: the scorer's own rule), else None."""
    if settings.decode_workers < 1 or settings.scheduler or files < 2 * settings.batch_size:
        return None
    return start_decoders(settings.decode_workers)


def _lstat_source(path: Path) -> SourceFile:
    try:
        st = os.lstat(path)
        return SourceFile(path, FileKind.OTHER, "", st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns)
    except OSError:
        return SourceFile(path, FileKind.OTHER, "", 0)


def prepare_file(path: Path, root: Path, quality: QualitySettings, display_size: int,
                 reports_dir: Path | None, incomplete_seconds: float = 0.0) -> Prepared:
    """Read one file, normalize it and write its display JPEG into ``reports_dir`` (runs in a
    worker process). Never raises for a bad file; a failing report write (disk full) raises.

    A file that fails the way a file still being written fails (truncated, no end marker, a
    data set cut short) and was modified less than ``incomplete_seconds`` ago is deferred, not
    failed: the nightly job may meet files the watcher has not taken yet.
    """
    start = time.perf_counter()
    try:
        source, data, ident = read_regular(path, quality.max_file_bytes)
    except FileVanished as exc:
        return Prepared(_lstat_source(path), Deferred(_lstat_source(path), exc.reason, vanished=True),
                        time.perf_counter() - start)
    except FileChanged as exc:
        return Prepared(_lstat_source(path), Deferred(_lstat_source(path), exc.reason), time.perf_counter() - start)
    except (NotRegularFile, FileTooLarge) as exc:
        source = _lstat_source(path)
        status = ImageStatus.SKIPPED if isinstance(exc, NotRegularFile) else ImageStatus.FAILED
        return Prepared(source, Rejection(source, status, FailStage.READ, exc.reason), time.perf_counter() - start)
    except OSError as exc:
        source = _lstat_source(path)
        reason = f"unreadable: {exc.strerror or exc}"
        return Prepared(source, Rejection(source, ImageStatus.FAILED, FailStage.READ, reason),
                        time.perf_counter() - start)
    from batchcxr.normalize.prepare import prepare  # imported here: the scorer's own process seldom needs it

    try:
        result = prepare(source, data, quality, folder_key(path, root), display_size)
    except Exception as exc:  # noqa: BLE001 - one bad file never stops a run
        log.exception("%s: unexpected error while preparing", path)
        result = Rejection(source, ImageStatus.FAILED, FailStage.DECODE,
                           f"unexpected {type(exc).__name__}: {exc}", detail=_digest(exc))
    if (isinstance(result, Rejection) and result.status == ImageStatus.FAILED and incomplete_seconds > 0
            and time.time() - ident.mtime_ns / 1e9 < incomplete_seconds and not is_complete(data, quality)):
        age = time.time() - ident.mtime_ns / 1e9
        result = Deferred(source, f"incomplete and modified {age:.0f} s ago (still being written?): {result.reason}")
    if isinstance(result, PreparedImage):
        if reports_dir is None:  # a Dask worker: the client writes the reports
            result = dataclasses.replace(result, display=None, display_jpeg=encode_image(result.display))
        else:
            result = write_display(result, reports_dir)  # not the file's fault if this fails: the run stops
    return Prepared(source, result, time.perf_counter() - start)


def prepare_files(paths: list[Path], root: Path, quality: QualitySettings, display_size: int,
                  reports_dir: Path, incomplete_seconds: float = 0.0) -> list[Prepared]:
    """``prepare_file`` for a few files: one worker task, so the pool's per-task cost (pickling,
    futures, ~0.2 ms of the main process's CPU) is paid once per task (pipeline.TASK_FILES files)."""
    return [prepare_file(path, root, quality, display_size, reports_dir, incomplete_seconds) for path in paths]
