"""Scoring on Dask distributed: reading, decoding, normalization and both models on Dask workers.

Used when ``scheduler`` is set (`score --scheduler tcp://HOST:8786` or `local:N`); otherwise Dask
is never imported. The same stage functions run on the workers as in-process (prepare_file,
infer_batch); each worker loads the models once (a WorkerPlugin) and returns small results: the
display JPEG's bytes, each model's probability and Grad-CAM map, the lung mask. The client
admits files (identity records, claims), writes the database and the reports, so the store's
idempotent upserts keep a task that ran twice (a worker killed mid-task is rescheduled by Dask)
to one row of each. Work in flight is bounded, so memory stays flat on both sides.

With ``dask_workers_write`` the workers also write what the client would: the display JPEG, the
Grad-CAM layers and the rows of the images they scored (``record_scored``, the same upsert), into
the shared reports folder and a PostgreSQL store; the client gets back only each file's outcome
(``Stored``) and still records rejections, closes the run and renders the report pages.

Workers must see the inputs at the same paths as the client (an NFS or CIFS mount, say
/srv/archive on every machine) and have the same models folder (and, when they write, the same
reports folder).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import tempfile
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from distributed import WorkerPlugin

from batchcxr.domain import PreparedImage, Rejection, Stored

log = logging.getLogger(__name__)

TASK_FILES = 8
PLUGIN_NAME = "batchcxr-models"
_clients: dict[str, object] = {}


class SchedulerLost(ConnectionError):
    """The Dask scheduler (or every worker) went away in the middle of a run."""


class ModelsPlugin(WorkerPlugin):
    """Loads the scoring models and the lung segmenter once per worker process."""

    name = PLUGIN_NAME

    def __init__(self, model_dirs: list[str], lung_dir: str, threads: int = 1) -> None:
        self.model_dirs, self.lung_dir, self.threads = model_dirs, lung_dir, threads

    def setup(self, worker) -> None:
        import cv2

        from batchcxr.infer.lungs import load_lung_model
        from batchcxr.infer.runtime import load_scoring_model

        cv2.setNumThreads(self.threads)  # as in a decode worker: a worker per core, OpenCV's pool would only contend
        _heap_for_large_buffers()

        worker.batchcxr = ([load_scoring_model(Path(d), self.threads) for d in self.model_dirs],
                           load_lung_model(Path(self.lung_dir), self.threads))

    def teardown(self, worker) -> None:
        worker.batchcxr = None
        for store in getattr(worker, "batchcxr_stores", {}).values():
            store.close()


def _heap_for_large_buffers() -> None:
    """Undo, in this worker process, the MALLOC_TRIM_THRESHOLD_ that Dask's nanny sets for its
    workers: with it glibc serves every buffer over 128 KB by a fresh mmap (page faults on every
    file read and decoded frame) and unmaps it when freed. Set here to glibc's own dynamic maxima
    (mmap above 32 MiB, trim above 64 MiB) instead, whoever started the worker (LocalCluster,
    systemd, dask-jobqueue, Kubernetes). Measured on 300 uncompressed DICOM files: prepare_file
    2.7 -> 1.9 CPU s in a worker (in-process 1.8); JPEG 1.8 -> 1.6 (1.6). glibc only; else no-op."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 2**20)
    mallopt(m_trim_threshold, 64 * 2**20)


def _worker_store(worker, url: str):
    """This worker's connection to the store (opened on first use, kept for the worker's life)."""
    from batchcxr.store.repo import Store

    stores = worker.__dict__.setdefault("batchcxr_stores", {})
    if url not in stores:
        stores[url] = Store.open(url, upgrade=False)  # the client brought the schema up to date
    return stores[url]


def prepare_and_score(paths: list[str], root: str, quality, display_size: int, incomplete_seconds: float,
                      batch_size: int = 32) -> list:
    """The task: prepare_file and infer_batch for a few files on this worker. Returns Prepared
    records whose scored images carry their outputs and lung mask (``inferred``), the display JPEG
    as bytes, and no model input (it stays on the worker)."""
    from distributed import get_worker

    from batchcxr.pipeline import Prepared, infer_batch, prepare_file

    models, lungs = get_worker().batchcxr
    prepared = [prepare_file(Path(p), Path(root), quality, display_size, None, incomplete_seconds) for p in paths]
    images = [p.result for p in prepared if isinstance(p.result, PreparedImage)]
    results: dict[str, PreparedImage | Rejection] = {}
    for i in range(0, len(images), batch_size):
        kept, per_image, masks, rejected = infer_batch(models, lungs, images[i : i + batch_size], quality.require_chest)
        for item, outputs, mask in zip(kept, per_image, masks):
            results[str(item.source.path)] = dataclasses.replace(
                item, model_input=np.zeros((0,), np.uint8), inferred=(outputs, mask))
        for r in rejected:
            results[str(r.source.path)] = r
    return [Prepared(p.source, results.get(str(p.source.path), p.result), p.seconds) for p in prepared]


def prepare_score_store(paths: list[str], root: str, settings, incomplete_seconds: float, run_id: int,
                        rescore: bool = False, retry_failed: bool = False) -> list:
    """The task with ``dask_workers_write``: prepare_file (writing the display JPEG), then for the
    images no earlier run scored with these model versions, infer_batch, their Grad-CAM layers and
    their rows (record_scored, one transaction a batch). Returns Prepared records whose scored
    images became ``Stored`` outcomes; rejections and deferrals come back as they are, for the
    client to record."""
    from distributed import get_worker

    from batchcxr.pipeline import Prepared, infer_batch, prepare_file, write_layers
    from batchcxr.store.repo import ScoredImage

    worker = get_worker()
    models, lungs = worker.batchcxr
    store = _worker_store(worker, settings.sqlalchemy_url)
    reports = Path(settings.reports_dir)
    prepared = [prepare_file(Path(p), Path(root), settings.quality, settings.display_size, reports, incomplete_seconds)
                for p in paths]
    images = [p.result for p in prepared if isinstance(p.result, PreparedImage)]
    versions = [m.version for m in models]
    done = {} if rescore else store.already_done([i.source.sha256 for i in images], versions)
    mine = store.scored_by_run(done, run_id) if done else set()  # this task ran before, on a worker that died
    results: dict[str, PreparedImage | Rejection | Stored] = {}
    todo = []
    for item in images:
        known = done.get(item.source.sha256)
        if item.source.sha256 in mine:
            results[str(item.source.path)] = Stored(item.source, item.study, item.image)
        elif known is not None and not (retry_failed and known.status == "failed"):
            results[str(item.source.path)] = Stored(item.source, item.study, item.image, earlier_status=known.status,
                                                    earlier_reason=known.reason)
        else:
            todo.append(item)
    for i in range(0, len(todo), settings.batch_size):
        kept, per_image, masks, rejected = infer_batch(models, lungs, todo[i : i + settings.batch_size],
                                                       settings.quality.require_chest)
        scored = []
        for item, outputs, mask in zip(kept, per_image, masks):
            overlays, outline = write_layers(item, outputs, mask, reports, settings.overlay_alpha)
            scored.append(ScoredImage(item, list(outputs), item.display_file, overlays, outline))
        refused = {str(r.item.prepared.source.path): r.reason for r in store.record_scored(run_id, scored)}
        for item in kept:
            results[str(item.source.path)] = Stored(item.source, item.study, item.image,
                                                    refused=refused.get(str(item.source.path), ""))
        for r in rejected:
            results[str(r.source.path)] = r
    return [Prepared(p.source, results.get(str(p.source.path), p.result), p.seconds) for p in prepared]


def client_for(scheduler: str, settings):
    """A Dask client for ``tcp://HOST:PORT`` or ``local:N`` (a LocalCluster of N single-threaded
    worker processes, started once per process), with the models plugin registered."""
    from distributed import Client, LocalCluster

    if scheduler in _clients:
        return _clients[scheduler]
    logging.getLogger("distributed").setLevel(logging.WARNING)  # quiet, like every other library
    if scheduler.startswith("local:"):
        n = int(scheduler.split(":", 1)[1] or 1)
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                               local_directory=tempfile.mkdtemp(prefix="batchcxr-dask-"), silence_logs=logging.WARNING)
        client = Client(cluster)
    else:
        client = Client(scheduler, timeout="30s")
    plugin = ModelsPlugin([str(p.resolve()) for p in settings.models], str(Path(settings.lung_model).resolve()))
    client.register_plugin(plugin, name=PLUGIN_NAME)
    _clients[scheduler] = client
    return client


def close_clients() -> None:
    for client in _clients.values():
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None:
            cluster.close()
    _clients.clear()


def remote_stream(scorer, root: Path, paths: Iterator[Path], incomplete_seconds: float, run_id: int = 0,
                  rescore: bool = False, retry_failed: bool = False) -> Iterator:
    """Prepared records from Dask workers, in submission order, with a bounded window of tasks
    (with ``dask_workers_write``: scored images as ``Stored`` outcomes, written by the workers)."""
    from concurrent.futures import CancelledError

    from distributed import TimeoutError as DaskTimeout
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    settings = scorer.settings
    client = client_for(settings.scheduler, settings)
    threads = sum(w.get("nthreads", 1) for w in client.scheduler_info().get("workers", {}).values()) or 1
    window = settings.dask_tasks_in_flight or 3 * threads
    tasks = iter(lambda: [str(p) for p in itertools.islice(paths, TASK_FILES)], [])
    pending: deque = deque()

    if settings.dask_workers_write:  # workers need absolute paths for what they write
        shared = dataclasses.replace(settings, reports_dir=Path(settings.reports_dir).resolve(),
                                     db_url=settings.sqlalchemy_url)

    def submit() -> None:
        task = next(tasks, None)
        if not task:
            return
        if settings.dask_workers_write:
            future = client.submit(prepare_score_store, task, str(root), shared, incomplete_seconds, run_id,
                                   rescore, retry_failed, pure=False)
        else:
            future = client.submit(prepare_and_score, task, str(root), settings.quality, settings.display_size,
                                   incomplete_seconds, settings.batch_size, pure=False)
        pending.append((task, future))

    for _ in range(window):
        submit()
    while pending:
        task, future = pending.popleft()
        try:
            done = future.result()
        except KilledWorker:  # the task took down a worker three times: its files wait for the next run
            from batchcxr.domain import Deferred
            from batchcxr.pipeline import Prepared, _lstat_source

            done = [Prepared(_lstat_source(Path(p)), Deferred(_lstat_source(Path(p)), "a Dask worker died on it "
                                                              "three times; tried again next run"), 0.0) for p in task]
        except (CommClosedError, DaskTimeout, OSError, CancelledError) as exc:
            for _, f in pending:
                f.cancel()
            raise SchedulerLost(f"Dask scheduler {settings.scheduler} lost: {type(exc).__name__} {exc}") from exc
        submit()
        yield from done
