"""Scoring on Dask distributed: reading, decoding, normalization and both models on Dask workers.

Used when ``scheduler`` is set (`score --scheduler tcp://HOST:8786` or `local:N`); otherwise Dask
is never imported. The same stage functions run on the workers as in-process (prepare_file,
infer_batch); each worker loads the models once (a WorkerPlugin) and returns small results: the
display JPEG's bytes, each model's probability and Grad-CAM map, the lung mask. The client
admits files (identity records, claims), writes the database and the reports, so the store's
idempotent upserts keep a task that ran twice (a worker killed mid-task is rescheduled by Dask)
to one row of each. Work in flight is bounded, so memory stays flat on both sides.

Workers must see the inputs at the same paths as the client (an NFS or CIFS mount, say
/srv/archive on every machine) and have the same models folder.
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

from batchcxr.domain import PreparedImage, Rejection

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
        from batchcxr.infer.lungs import load_lung_model
        from batchcxr.infer.runtime import load_scoring_model

        worker.batchcxr = ([load_scoring_model(Path(d), self.threads) for d in self.model_dirs],
                           load_lung_model(Path(self.lung_dir), self.threads))

    def teardown(self, worker) -> None:
        worker.batchcxr = None


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


def remote_stream(scorer, root: Path, paths: Iterator[Path], incomplete_seconds: float) -> Iterator:
    """Prepared records from Dask workers, in submission order, with a bounded window of tasks."""
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

    def submit() -> None:
        task = next(tasks, None)
        if task:
            pending.append((task, client.submit(prepare_and_score, task, str(root), settings.quality,
                                                settings.display_size, incomplete_seconds, settings.batch_size,
                                                pure=False)))

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
