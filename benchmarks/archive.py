"""`python -m benchmarks.archive`: does a run cost the same on a hospital-sized archive?

For each database (SQLite, PostgreSQL) and archive size (10k, 100k, 1M studies) it builds a
synthetic archive - the demo scored for real (so some report files exist), then studies, images,
predictions, file records, failures, runs and verdicts inserted in bulk - and measures, next to the
same measures on an empty database:

* `batchcxr report` once after the bulk insert (the list and failure pages of rows no run wrote);
* a 10-file nightly run, twice: `batchcxr score` in a subprocess, wall time from process start, peak RSS;
* one watcher batch (8 files through Watcher._process, reports included, and the next send round);
* review-app pages through Flask's test client: worklist, a study page, a filtered worklist;
* `batchcxr status`.

Results go back to a PACS (a destination on a port nothing listens on, so each send round meets a
PACS that is down), and every synthetic study has two objects sent long ago in the outbox.

    python -m benchmarks.archive                               # 10k, 100k, 1M on SQLite and PostgreSQL
    python -m benchmarks.archive --sizes 2000 --dbs sqlite     # smoke run

PostgreSQL is started like the tests do (initdb/pg_ctl on a free loopback port, as the postgres
user when run as root). Results: benchmarks/results/archive.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from batchcxr.paths import DEMO_DIR, PROJECT_ROOT
from benchmarks.servers import Postgres, free_port

RESULTS = Path(__file__).parent / "results"
CHUNK = 20_000


# --- building an archive ---------------------------------------------------------------------
def _rows(n_studies: int, start_id: int, rng: random.Random, run_id: int, versions: dict[str, str]):
    """Synthetic rows: studies with 1-3 images, two predictions per image, file records, some
    failures and verdicts (dicts per table), in chunks."""
    now = dt.datetime(2026, 12, 1)
    studies, images, preds, sources, errors, verdicts, outbox = [], [], [], [], [], [], []
    image_id = start_id * 2
    for k in range(n_studies):
        sid = start_id + k
        day = now - dt.timedelta(days=rng.randrange(3 * 365))
        n_img = rng.choice((1, 1, 1, 2, 2, 3))
        results, per_image = {}, []
        for j in range(n_img):
            image_id += 1
            sha = f"{image_id:064x}"
            path = f"/srv/archive/{day:%Y/%m/%d}/{sid}/{j}.dcm"
            images.append(dict(id=image_id, study_id=sid, content_sha256=sha, path=path, kind="dicom",
                               sop_instance_uid=f"1.2.826.0.1.{sid}.{j}", modality="DX", view_position="PA",
                               rows=2048, columns=2048, status="scored", reason="", qc_notes="MONOCHROME2",
                               display_path=f"images/{sha[:24]}.jpg", lungs_path="", updated_at=day))
            labels = {}
            for name, version in versions.items():
                p = rng.betavariate(0.6, 0.9)
                labels[name] = "PNEUMONIA" if p >= 0.5 else "NORMAL"
                preds.append(dict(image_id=image_id, run_id=run_id, model_name=name, model_version=version,
                                  probability=p, calibrated=None, label=labels[name], threshold=0.5,
                                  heatmap_path=f"images/{sha[:24]}-{name}.png", created_at=day))
                if p > results.get(name, [-1])[0]:
                    results[name] = [p, labels[name], None]
            per_image.append(labels)
            sources.append(dict(path_hash=f"{image_id:064x}", path=path, device=1, inode=image_id, size=8_000_000,
                                mtime_ns=int(day.timestamp() * 1e9), content_sha256=sha, status="scored", stage="",
                                reason="", run_id=run_id, moved_to="", updated_at=day))
        labels = {v[1] for v in results.values()}
        studies.append(dict(id=sid, study_key=f"1.2.826.0.1.3680043.{sid}", patient_name=f"Patient^{sid % 9973}",
                            patient_id=f"P{sid:08d}", accession_number=f"A{sid}", study_date=f"{day:%Y%m%d}",
                            study_description="CHEST PA", updated_at=day,
                            max_score=max(v[0] for v in results.values()), results=results,
                            positive="PNEUMONIA" in labels, negative="NORMAL" in labels,
                            disagree=len(labels) > 1 or any(len(set(x.values())) > 1 for x in per_image),
                            n_images=n_img, report_stale=False))
        if rng.random() < 0.01:
            path = f"/srv/archive/{day:%Y/%m/%d}/{sid}/broken.dcm"
            sources.append(dict(path_hash=f"{10**15 + sid:064x}", path=path, device=1, inode=10**12 + sid, size=10,
                                mtime_ns=0, content_sha256="", status="failed", stage="parse",
                                reason="corrupt DICOM: truncated", run_id=run_id, moved_to="", updated_at=day))
            errors.append(dict(run_id=run_id, path=path, content_sha256="", status="failed", stage="parse",
                               reason="corrupt DICOM: truncated", detail="", created_at=day))
        if rng.random() < 0.05:
            verdicts.append(dict(study_id=sid, reviewer="alice", verdict=rng.choice(("yes", "no")), note="",
                                 created_at=day))
        for j, kind in enumerate(("sr", "sc")):  # its results, sent to the PACS long ago
            uid = f"1.2.826.0.1.3680043.8.498.{sid}.{j}"
            outbox.append(dict(destination="pacs", kind=kind, study_key=f"1.2.826.0.1.3680043.{sid}",
                               sop_instance_uid=uid, path=f"/srv/outbox/{uid}.dcm", status="sent", attempts=1,
                               next_attempt_at=day, last_error="", created_at=day, sent_at=day))
        if len(studies) >= CHUNK:
            yield studies, images, preds, sources, errors, verdicts, outbox
            studies, images, preds, sources, errors, verdicts, outbox = [], [], [], [], [], [], []
    yield studies, images, preds, sources, errors, verdicts, outbox


def populate(store, n_studies: int, versions: dict[str, str], seed: int = 0) -> float:
    """Bulk-insert a synthetic archive of ``n_studies`` after the rows already there; seconds taken."""
    from sqlalchemy import func, insert, select, text

    from batchcxr.store.schema import ErrorRecord, Image, OutboxItem, Prediction, Run, SourceFile, Study, Verdict

    start = time.perf_counter()
    rng = random.Random(seed)
    run_id = store.start_run("archive-benchmark", "synthetic", list(versions.values()))
    with store.engine.connect() as conn:
        first = (conn.scalar(select(func.max(Study.id))) or 0) + 1
        first_image = (conn.scalar(select(func.max(Image.id))) or 0) + 1
    offset = max(first, first_image)
    tables = (Study, Image, Prediction, SourceFile, ErrorRecord, Verdict, OutboxItem)
    for chunk in _rows(n_studies, offset, rng, run_id, versions):
        with store.engine.begin() as conn:
            for model, rows in zip(tables, chunk):
                if rows:
                    conn.execute(insert(model.__table__), rows)
    with store.engine.begin() as conn:
        conn.execute(text("ANALYZE"))
        if store.dialect == "postgresql":
            conn.execute(text("SELECT setval(pg_get_serial_sequence('studies', 'id'), (SELECT max(id) FROM studies))"))
            conn.execute(text("SELECT setval(pg_get_serial_sequence('images', 'id'), (SELECT max(id) FROM images))"))
    store.finish_run(run_id, scored=n_studies, skipped=0, failed=0, unchanged=0, seconds=0.0)
    return time.perf_counter() - start


# --- measures ----------------------------------------------------------------------------------
def nightly_run(cfg: Path, folder: Path) -> dict:
    """`batchcxr score` on a folder in a fresh process: wall time from process start, its own peak RSS."""
    return timed_command(cfg, "score", str(folder), "--no-progress")


def timed_command(cfg: Path, *args: str, ok: tuple[int, ...] = (0,)) -> dict:
    """A batchcxr command in a fresh process: wall time from process start, its own peak RSS
    (``ok``: the exit statuses that are no error)."""
    peak = cfg.with_suffix(".peak")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peak", str(peak), "batchcxr.cli", *args,
                           "--config", str(cfg)], capture_output=True, text=True, cwd=PROJECT_ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode not in ok:
        raise RuntimeError(proc.stdout + proc.stderr)
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(float(peak.read_text()))}


def watcher_batch(settings, folder: Path) -> float:
    from batchcxr.ingest.files import walk
    from batchcxr.pipeline import Scorer
    from batchcxr.store.repo import Store
    from batchcxr.worker import Watcher

    store = Store.open(settings.sqlalchemy_url)
    scorer = Scorer.from_settings(settings, store)
    watcher = Watcher(scorer, folder)
    paths = list(walk(folder))
    start = time.perf_counter()
    summary = scorer.score_paths(folder, paths, command="watch")  # results recorded in the outbox too
    watcher._dispose(summary)
    scorer.outbox.send_due()  # the watcher's next send round: the PACS is down, so each is kept for a retry
    seconds = time.perf_counter() - start
    store.close()
    return round(seconds, 3)


def pages(settings) -> dict:
    from werkzeug.security import generate_password_hash

    from batchcxr.settings import WebSettings
    from batchcxr.store.repo import Store
    from batchcxr.web.app import create_app

    import dataclasses
    import re

    settings = dataclasses.replace(settings, web=WebSettings(users={"bench": generate_password_hash("pw")},
                                                             secret_key="x" * 40))
    store = Store.open(settings.sqlalchemy_url)
    app = create_app(settings, store)
    client = app.test_client()
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
    assert client.post("/login", data={"username": "bench", "password": "pw", "csrf_token": token}).status_code == 302
    with store.read_session() as s:
        from sqlalchemy import func, select

        from batchcxr.store.schema import Study

        some = s.scalar(select(func.max(Study.id)))
    urls = {"worklist": "/", "worklist page 100": "/?page=100", "study": f"/study/{some}",
            "filtered worklist": "/?label=PNEUMONIA&review=unreviewed&agreement=disagree",
            "date-filtered worklist": "/?from=2025-03-01&to=2025-03-07"}
    out = {}
    for name, url in urls.items():
        times = []
        for _ in range(5):
            start = time.perf_counter()
            r = client.get(url)
            times.append(time.perf_counter() - start)
            assert r.status_code == 200, (url, r.status_code)
        out[name] = round(statistics.median(times) * 1000, 1)
    store.close()
    return out


def _inputs(work: Path, n: int, tag: str) -> Path:
    """n real CXR DICOM files (the demo's, re-encoded with other pixels so each is new)."""
    from tests.dicoms import chest_like, dicom_file

    folder = work / f"inputs-{tag}"
    if folder.exists():
        shutil.rmtree(folder)
    import zlib

    base = zlib.crc32(tag.encode())
    for i in range(n):
        dicom_file(folder / f"{i}.dcm", chest_like(1024, 900, seed=(base + i) % 10**6),
                   StudyInstanceUID=f"1.2.999.{base}.{i // 2}")
    return folder


def measure(db: str, size: int, work: Path, pg: Postgres | None) -> dict:
    from batchcxr.settings import load_settings
    from batchcxr.store.repo import Store

    tag = f"{db}-{size}"
    url = pg.new_database(f"archive_{size}") if db == "postgresql" else f"sqlite:///{work / f'{tag}.sqlite'}"
    if db == "sqlite":
        Path(url.removeprefix("sqlite:///")).unlink(missing_ok=True)
    reports = work / f"reports-{tag}"
    shutil.rmtree(reports, ignore_errors=True)
    cfg = work / f"{tag}.toml"
    # results go back to a PACS (a port nothing listens on: a send round meets a PACS that is down)
    cfg.write_text(f'[batchcxr]\ndb_url = "{url}"\nreports_dir = "{reports}"\nlock_file = "{work / "lock"}"\n'
                   f'outbox_dir = "{work / f"outbox-{tag}"}"\n[batchcxr.dicom.destinations.pacs]\n'
                   f'kind = "dimse"\nae_title = "PACS"\nport = {free_port()}\nobjects = ["sr"]\n')
    settings = load_settings(cfg)
    store = Store.open(url)
    from batchcxr.pipeline import Scorer

    Scorer.from_settings(settings, store).score_tree(DEMO_DIR)  # real rows and report files first
    versions = {m.name: m.version for m in Scorer.from_settings(settings, store).models}
    build = populate(store, size, versions) if size else 0.0
    store.close()
    result = {"db": db, "studies": size, "build_seconds": round(build, 1)}
    # the list and failure pages of the rows just inserted in bulk, which no run wrote (once: in a real
    # archive each run wrote its own as it grew)
    result["report_catch_up"] = timed_command(cfg, "report")
    result["nightly_10_files"] = nightly_run(cfg, _inputs(work, 10, f"n{tag}"))
    result["nightly_10_files_again"] = nightly_run(cfg, _inputs(work, 10, f"m{tag}"))
    result["watcher_batch_8_files_s"] = watcher_batch(settings, _inputs(work, 8, f"w{tag}"))
    result["pages_ms"] = pages(settings)
    result["status"] = timed_command(cfg, "status", ok=(0, 1, 2))  # no daemon ran: exit 1
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict]) -> str:
    lines = ["| database | studies | 10-file nightly run, s (from process start; first / second) | peak RSS MB "
             "| one watcher batch (8 files), s | worklist ms | study page ms | filtered worklist ms "
             "| date-filtered ms | page 100 ms | `batchcxr status`, s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r["pages_ms"]
        n, first = r["nightly_10_files_again"], r["nightly_10_files"]
        lines.append(f"| {r['db']} | {r['studies']:,} | {first['seconds']:.2f} / {n['seconds']:.2f} "
                     f"| {max(first['peak_rss_mb'], n['peak_rss_mb'])} | "
                     f"{r['watcher_batch_8_files_s']:.2f} | {p['worklist']:.0f} | {p['study']:.0f} | "
                     f"{p['filtered worklist']:.0f} | {p['date-filtered worklist']:.0f} | {p['worklist page 100']:.0f} "
                     f"| {r['status']['seconds']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="0,10000,100000,1000000")
    p.add_argument("--dbs", default="sqlite,postgresql")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "batchcxr-archive")
    p.add_argument("--out", type=Path, default=RESULTS / "archive.json")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    dbs = args.dbs.split(",")
    pg = Postgres(args.work / "pg") if "postgresql" in dbs else None
    results = []
    try:
        for db in dbs:
            for size in sizes:
                results.append(measure(db, size, args.work, pg))
    finally:
        if pg is not None:
            pg.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "cpu": _cpu()}, indent=2) + "\n")
    print(table(results))
    return 0


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return ""


if __name__ == "__main__":
    sys.exit(main())
