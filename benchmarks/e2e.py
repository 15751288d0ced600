"""One end-to-end scoring run in this process - the calls `batchcxr score` makes, in its order
(walk, start the decode workers, then import and load the rest), without click - printing a JSON
line with the run's stages (run by benchmarks.run)."""

from __future__ import annotations

import json
import re
import resource
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from batchcxr.ingest.files import walk
from batchcxr.prepare_stage import early_decoders
from batchcxr.settings import load_settings


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: that keeps the peak of the process
    this one was forked from (the harness, with TensorFlow loaded) across exec."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def thread_cpu() -> Counter:
    """CPU seconds of this process's Python threads by name, each thread's own clock
    (``time.thread_time``) read as it ends: threads started from now on whose ``run`` is
    Thread's own (pools, ``target=`` threads) record themselves; the caller adds the main
    thread's. Pool threads' names lose their number (``batchcxr-infer_0`` -> ``batchcxr-infer``),
    so each role is one entry."""
    spent: Counter = Counter()
    lock = threading.Lock()
    run = threading.Thread.run

    def timed_run(self: threading.Thread) -> None:
        try:
            run(self)
        finally:
            with lock:
                spent[re.sub(r"[_-]?\d+$", "", self.name)] += time.thread_time()

    threading.Thread.run = timed_run  # type: ignore[method-assign]
    return spent


def main(folder: str, decode_workers: str = "1", model_threads: str = "0", db_url: str = "", reports: str = "") -> None:
    """Score ``folder`` into ``db_url`` (default: a new SQLite file) with reports in ``reports``
    (default: a temporary folder)."""
    threads = thread_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(None, {"db_url": db_url or f"{tmp}/r.sqlite",
                                        "reports_dir": Path(reports) if reports else Path(tmp) / "reports",
                                        "decode_workers": int(decode_workers),
                                        "model_threads": int(model_threads)})
        paths = list(walk(Path(folder)))
        decoders = early_decoders(settings, len(paths))
        start = time.perf_counter()
        # as `batchcxr score`: imported (with the models and database) while the decode workers start
        from batchcxr.cli import started
        from batchcxr.pipeline import Scorer
        from batchcxr.store.repo import Store

        store = Store.open(settings.sqlalchemy_url)
        scorer = Scorer.from_settings(settings, store)
        started()
        load_seconds = time.perf_counter() - start
        summary = scorer.score_paths(Path(folder), paths, decoders=decoders)
        store.close()
    threads["MainThread"] += time.thread_time()
    own = _peak_rss_mb()
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # native threads, Thread subclasses with a run of their own (the decode pool's manager), daemons still running
    threads["other"] = max(0.0, me.ru_utime + me.ru_stime - sum(threads.values()))
    print(json.dumps({
        "files": len(paths), "scored": summary.scored, "failed": sum(summary.failed.values()),
        "seconds": summary.seconds, "images_per_s": summary.scored / summary.seconds,
        "load_seconds": load_seconds, "stages": dict(summary.stages),
        "peak_rss_mb": own,
        "cpu_main_s": me.ru_utime + me.ru_stime,  # this process: infer, layers, database, pages
        "cpu_workers_s": kids.ru_utime + kids.ru_stime,  # its decode workers (joined by now)
        "cpu_threads_s": dict(threads.most_common()),  # cpu_main_s by thread: infer, writer, main, loading, other
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
