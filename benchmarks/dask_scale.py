"""`python -m benchmarks.dask_scale`: the cost of the Dask path, and what N workers would give.

The same N full-resolution inputs (benchmarks.inputs, JPEG and uncompressed DICOM) scored
in-process (the default layout: a decode worker plus the batch split across one infer thread per core), on `local:1` and
on `local:2` (LocalClusters of single-threaded worker processes; on `local:2` once with the client
writing the store and once with the workers writing it, `dask_workers_write`), all on this machine and into
the same kind of database (PostgreSQL: several machines need it). Then the database alone: the
rate at which the store takes scored images (record_scored batches of 32, as the client writes
them). From the per-worker throughput and that rate the README projects N workers and where the
database becomes the bottleneck.

    python -m benchmarks.dask_scale              # N = 2000
    python -m benchmarks.dask_scale --n 200      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.inputs import build
from benchmarks.servers import Postgres

RESULTS = Path(__file__).parent / "results"


def _vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_score(folder: Path, url: str, reports: Path, scheduler: str, workers_write: bool = False) -> dict:
    """One `batchcxr score` in a fresh process: images/s from process start to end, peak RSS of the
    client (and of the worker processes, sampled)."""
    from benchmarks.servers import free_port  # noqa: F401 - keeps the import order of the harness

    cmd = [sys.executable, "-m", "benchmarks.peak", str(reports.with_suffix(".peak")), "batchcxr.cli", "score",
           str(folder), "--db", url, "--reports", str(reports), "--no-progress"]
    if scheduler:
        cmd += ["--scheduler", scheduler]
    os.sync()
    start = time.perf_counter()
    env = dict(os.environ, BATCHCXR_DASK_WORKERS_WRITE="true" if workers_write else "false")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    worker_peak = 0.0
    while proc.poll() is None:
        from tests.helpers import children

        worker_peak = max([worker_peak] + [_vm_hwm_mb(c) for c in children(proc.pid)])
        time.sleep(0.5)
    out = proc.stdout.read()
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise RuntimeError(out)
    scored = int(next(line.split()[1] for line in out.splitlines() if line.strip().startswith("scored")))
    return {"scheduler": scheduler or "in-process", "workers_write": workers_write, "scored": scored, "seconds": round(seconds, 1),
            "images_per_s": round(scored / seconds, 1),
            "client_peak_rss_mb": round(float(reports.with_suffix(".peak").read_text())),
            "largest_child_peak_rss_mb": round(worker_peak)}


def insert_rate(url: str, n: int = 4000) -> dict:
    """Images per second the store takes (record_scored, 32 a transaction, two predictions each)."""
    from pathlib import Path as P

    from batchcxr.domain import FileKind, ImageInfo, ModelOutput, PreparedImage, SourceFile, StudyInfo
    from batchcxr.store.repo import ScoredImage, Store

    store = Store.open(url)
    run = store.start_run("bench", "insert-rate", ["a-1", "b-1"])
    items = []
    for k in range(n):
        source = SourceFile(P(f"/bench/{k}.dcm"), FileKind.DICOM, f"{10**9 + k:064x}", 1000, 1, k, k)
        prepared = PreparedImage(source, StudyInfo(f"1.2.3.{k // 2}", "Bench^Mark", "B1"),
                                 ImageInfo(sop_instance_uid=f"1.2.3.{k}", modality="DX"), None,
                                 np.zeros((1,), np.uint8), [], display_file=f"images/{k}.jpg")
        outputs = [ModelOutput(m, f"{m}-1", 0.5, 0.5, np.zeros((7, 7), np.float32)) for m in ("a", "b")]
        items.append(ScoredImage(prepared, outputs, f"images/{k}.jpg", {"a": "x.png", "b": "y.png"}))
    start = time.perf_counter()
    for i in range(0, n, 32):
        store.record_scored(run, items[i : i + 32])
    seconds = time.perf_counter() - start
    store.close()
    return {"images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--kinds", default="jpeg,dicom-uncompressed")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "batchcxr-bench")
    p.add_argument("--out", type=Path, default=RESULTS / "dask.json")
    args = p.parse_args(argv)
    pg = Postgres(Path(tempfile.mkdtemp(prefix="batchcxr-pg-", dir="/tmp")))
    results: dict = {"n": args.n, "runs": []}
    try:
        for kind in args.kinds.split(","):
            folder = build(kind, args.n, args.work)
            subprocess.run(["cat", *map(str, sorted(folder.rglob("*.*")))], stdout=subprocess.DEVNULL)  # page cache
            for scheduler, workers_write in (("", False), ("local:1", False), ("local:2", False), ("local:2", True)):
                tag = f"{kind}-{scheduler.replace(':', '') or 'inprocess'}{'-workers' if workers_write else ''}"
                url = pg.new_database(tag.replace("-", "_"))
                reports = Path(tempfile.mkdtemp(prefix="batchcxr-reports-")) / "reports"
                r = run_score(folder, url, reports, scheduler, workers_write)
                r["kind"] = kind
                results["runs"].append(r)
                print(json.dumps(r), flush=True)
                shutil.rmtree(reports.parent, ignore_errors=True)
        results["postgresql_insert"] = insert_rate(pg.new_database("insert_rate"))
        print(json.dumps(results["postgresql_insert"]), flush=True)
    finally:
        pg.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
