"""Faults made for real: hostile files, files that change or vanish, full disks, locked databases,
unwritable folders, signals at any moment, crash leftovers. The daemon never dies of them,
records a reason, loses nothing and scores nothing twice."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from batchcxr.infer.runtime import load_scoring_model
from batchcxr.paths import MODELS_DIR
from batchcxr.pipeline import Scorer
from batchcxr.settings import Settings, WatchSettings
from batchcxr.store.repo import Store
from batchcxr.store.schema import ErrorRecord, Prediction, Run
from batchcxr.worker import Watcher

from tests.dicoms import chest_like, dicom_file, jpeg_file
from tests.helpers import (FAST, alive, children, cli, daemon, handles_sigterm, mount_or_skip, status, wait_until,
                           write_config)


@pytest.fixture(scope="module")
def models():
    return [load_scoring_model(MODELS_DIR / "cnn"), load_scoring_model(MODELS_DIR / "mobilenetv2")]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _watcher(tmp_path: Path, drop: Path, models, db_url: str | None = None, **watch) -> Watcher:
    settings = Settings(db_url=db_url or str(tmp_path / "r.sqlite"), reports_dir=tmp_path / "reports",
                        watch=WatchSettings(archive_dir=str(tmp_path / "archive"),
                                            quarantine_dir=str(tmp_path / "quarantine"), **{**FAST, **watch}))
    return Watcher(Scorer(settings, Store.open(settings.sqlalchemy_url), models), drop)


def _count(store: Store, model, *where) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where)) or 0


def _hostile_drop(tmp_path: Path) -> tuple[Path, Path]:
    """A drop folder with one good file and every kind of non-regular entry."""
    drop = tmp_path / "drop"
    drop.mkdir()
    outside = dicom_file(tmp_path / "elsewhere" / "phi.dcm", chest_like(seed=41), PatientName="Not^Ours")
    dicom_file(drop / "good.dcm", chest_like(seed=42))
    (drop / "link-outside.dcm").symlink_to(outside)
    (drop / "loop-a.dcm").symlink_to(drop / "loop-b.dcm")
    (drop / "loop-b.dcm").symlink_to(drop / "loop-a.dcm")
    (drop / "zero.dcm").symlink_to("/dev/zero")
    (drop / "folder-link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    os.mkfifo(drop / "pipe.dcm")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(drop / "sock.dcm"))
    sock.close()
    try:
        os.mknod(drop / "null.dcm", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pass  # not allowed here: the other kinds still run
    return drop, outside


def test_score_reads_only_regular_files_and_records_why_it_skipped_the_rest(tmp_path):
    drop, outside = _hostile_drop(tmp_path)
    before = {p.name: os.lstat(p) for p in drop.iterdir()}
    out = cli("score", str(drop), "--db", str(tmp_path / "r.sqlite"), "--reports", str(tmp_path / "rep"), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "scored     1" in out.stdout
    store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    reasons = {Path(e.path).name: (e.status, e.reason) for e in store.errors()}
    assert reasons["link-outside.dcm"] == ("skipped", "symbolic link: not read (only regular files are)")
    assert reasons["zero.dcm"][1].startswith("symbolic link") and reasons["loop-a.dcm"][1].startswith("symbolic link")
    assert reasons["folder-link"][1].startswith("symbolic link")
    assert reasons["pipe.dcm"] == ("skipped", "FIFO (named pipe): not read (only regular files are)")
    assert reasons["sock.dcm"][1].startswith("socket")
    if "null.dcm" in before:
        assert reasons["null.dcm"][1].startswith("device file")
    assert _sha(outside) not in {i.content_sha256 for s in store.studies() for i in s.images}  # never read
    assert {p.name: os.lstat(p) for p in drop.iterdir()}.keys() == before.keys()  # left untouched
    store.close()


def test_watcher_leaves_non_regular_files_alone_and_never_blocks(tmp_path, models):
    drop, outside = _hostile_drop(tmp_path)
    watcher = _watcher(tmp_path, drop, models)
    start = time.monotonic()
    watcher.run(max_idle_seconds=2.0)
    assert time.monotonic() - start < 60  # a FIFO or /dev/zero never blocks the loop
    assert (tmp_path / "archive" / "good.dcm").is_file()
    assert os.path.islink(drop / "link-outside.dcm") and stat.S_ISFIFO(os.lstat(drop / "pipe.dcm").st_mode)
    assert not (tmp_path / "quarantine").exists()
    skipped = {Path(e.path).name for e in watcher.store.errors() if e.status == "skipped"}
    assert {"link-outside.dcm", "pipe.dcm", "zero.dcm", "sock.dcm"} <= skipped
    n_errors = len(watcher.store.errors())
    watcher.stop_requested = False
    watcher.run(max_idle_seconds=1.5)  # rescans do not record them again
    assert len(watcher.store.errors()) == n_errors
    watcher.store.close()


def test_a_file_rewritten_in_place_is_read_again_never_failed(tmp_path, models):
    drop = tmp_path / "drop"
    drop.mkdir()
    first = jpeg_file(tmp_path / "src" / "a.jpg", chest_like(seed=51)).read_bytes()
    second = jpeg_file(tmp_path / "src" / "b.jpg", chest_like(seed=52)).read_bytes()
    watcher = _watcher(tmp_path, drop, models)
    target = drop / "x" / "study.jpg"
    target.parent.mkdir()
    target.write_bytes(first)

    def rewrite():  # a second writer truncates the file and rewrites it slowly, twice
        for data in (second, first + b"", second):
            wait_until(lambda: watcher.scorer.store.count_studies() or not target.exists(), 60, what="a score")
            with open(target, "wb") as f:
                for i in range(0, len(data), len(data) // 4 + 1):
                    f.write(data[i : i + len(data) // 4 + 1])
                    f.flush()
                    time.sleep(0.25)

    t = threading.Thread(target=rewrite)
    t.start()
    watcher.run(max_idle_seconds=4.0)
    t.join()
    store = watcher.store
    assert [e for e in store.errors() if e.status == "failed"] == []  # nothing failed for being rewritten
    assert not (tmp_path / "quarantine").exists()
    archived = sorted((tmp_path / "archive").rglob("*.jpg"))
    assert archived and {_sha(p) for p in archived} <= {hashlib.sha256(d).hexdigest() for d in (first, second)}
    scored = {i.content_sha256 for s in store.studies() for i in s.images if i.status == "scored"}
    assert {_sha(p) for p in archived} <= scored
    assert not any(drop.rglob("*.jpg"))
    store.close()


def _fill(folder: Path) -> Path:
    """Fill the file system holding ``folder``; return the filler file."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    return filler


def test_disk_full_is_a_fault_that_clears_by_itself(tmp_path):
    """Reports and database on a small tmpfs that fills up: the daemon keeps running, says why in
    `batchcxr status`, keeps the files, and finishes them once space is freed."""
    volume = tmp_path / "volume"
    volume.mkdir()
    mount_or_skip("mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(volume))
    proc = None
    try:
        drop = tmp_path / "drop"
        drop.mkdir()
        cfg = write_config(tmp_path, db_url=f"sqlite:///{volume / 'r.sqlite'}",
                           top={"reports_dir": volume / "reports"}, status_file=tmp_path / "status.json")
        proc = daemon(cfg, drop, log=tmp_path / "watch.log")
        wait_until(lambda: status(cfg)["state"] == "ok", 120, what="the daemon up")
        filler = _fill(volume)
        for i in range(6):
            dicom_file(drop / f"f{i}.dcm", chest_like(seed=600 + i))
        report = wait_until(lambda: (lambda r: r if r["daemons"] and r["daemons"][0]["problems"] else None)(
            status(cfg)), 120, what="the fault in status")
        fault = report["daemons"][0]["fault"]
        assert report["returncode"] == 2 and ("No space left on device" in fault or "disk is full" in fault), fault
        assert proc.poll() is None  # still running
        assert len(list(drop.glob("*.dcm"))) == 6 and not (tmp_path / "quarantine").exists()
        filler.unlink()
        wait_until(lambda: not list(drop.glob("*.dcm")), 180, what="the files handled after the disk was freed")
        wait_until(lambda: status(cfg)["returncode"] == 0, 60, what="status healthy again")
        store = Store.open(f"sqlite:///{volume / 'r.sqlite'}")
        assert _count(store, Prediction) == 12 and _count(store, ErrorRecord, ErrorRecord.status == "failed") == 0
        store.close()
        assert sorted(p.name for p in (tmp_path / "archive").iterdir()) == [f"f{i}.dcm" for i in range(6)]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0
        subprocess.run(["umount", "-l", str(volume)], capture_output=True)


def _hold_lock(db: Path) -> subprocess.Popen:
    """A second process holding SQLite's write lock (BEGIN EXCLUSIVE) until its stdin closes."""
    code = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_locked_database_at_start_and_while_running_is_waited_out(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    db = tmp_path / "r.sqlite"
    cfg = write_config(tmp_path, top={"db_busy_timeout_seconds": 0.5})
    assert cli("status", "--config", str(cfg)).returncode == 1  # creates nothing; no daemon ever ran
    Store.open(f"sqlite:///{db}").close()
    holder = _hold_lock(db)
    proc = daemon(cfg, drop, log=tmp_path / "watch.log")
    try:
        report = wait_until(lambda: (lambda r: r if r["daemons"] and r["daemons"][0].get("fault") else None)(
            status(cfg)), 120, what="the lock reported")
        assert "database is locked" in report["daemons"][0]["fault"] and proc.poll() is None
        holder.communicate("")  # release
        wait_until(lambda: status(cfg)["returncode"] == 0, 120, what="the daemon up once the lock is gone")
        for i in range(4):
            dicom_file(drop / f"l{i}.dcm", chest_like(seed=700 + i))
        wait_until(lambda: len(list((tmp_path / "archive").glob("*.dcm"))) == 4, 120, what="a first batch")
        holder = _hold_lock(db)  # locked again while it runs
        for i in range(4, 8):
            dicom_file(drop / f"l{i}.dcm", chest_like(seed=700 + i))
        wait_until(lambda: "database is locked" in (status(cfg)["daemons"][0].get("fault") or ""), 120,
                   what="the second lock reported")
        assert proc.poll() is None
        holder.communicate("")
        wait_until(lambda: len(list((tmp_path / "archive").glob("*.dcm"))) == 8, 180, what="all files handled")
    finally:
        if holder.poll() is None:
            holder.communicate("")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    store = Store.open(f"sqlite:///{db}")
    assert _count(store, Prediction) == 16 and _count(store, ErrorRecord) == 0
    store.close()


def test_unwritable_archive_keeps_files_until_it_is_writable(tmp_path):
    """The archive folder made immutable (chattr +i: not even root may write it): files are scored
    once, stay in the drop folder, the fault shows in status, and they move once it is writable."""
    drop, archive = tmp_path / "drop", tmp_path / "archive"
    drop.mkdir()
    archive.mkdir()
    mount_or_skip("chattr", "+i", str(archive))
    proc = None
    try:
        cfg = write_config(tmp_path)
        proc = daemon(cfg, drop, log=tmp_path / "watch.log")
        for i in range(3):
            dicom_file(drop / f"r{i}.dcm", chest_like(seed=800 + i))
        report = wait_until(lambda: (lambda r: r if r["daemons"] and r["daemons"][0].get("fault") else None)(
            status(cfg)), 120, what="the unwritable archive reported")
        assert "Operation not permitted" in report["daemons"][0]["fault"] and proc.poll() is None
        assert len(list(drop.glob("*.dcm"))) == 3  # kept in place, already scored
        subprocess.run(["chattr", "-i", str(archive)], check=True)
        wait_until(lambda: len(list(archive.glob("*.dcm"))) == 3, 120, what="the moves once it is writable")
        wait_until(lambda: status(cfg)["returncode"] == 0, 60, what="status healthy again")
        store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
        assert _count(store, Prediction) == 6 and _count(store, ErrorRecord) == 0  # scored once each
        store.close()
    finally:
        subprocess.run(["chattr", "-i", str(archive)], capture_output=True)
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0


def test_sigterm_at_random_moments_exits_zero_and_closes_its_runs(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = write_config(tmp_path)
    rng = random.Random(11)
    for i in range(12):
        dicom_file(drop / f"t{i}.dcm", chest_like(seed=900 + i))
    for attempt in range(6):
        proc = daemon(cfg, drop, log=tmp_path / f"watch{attempt}.log")
        wait_until(lambda: handles_sigterm(proc.pid) or proc.poll() is not None, 30, interval=0.005,
                   what="the SIGTERM handler")
        time.sleep(rng.uniform(0, 0.3) if attempt < 3 else rng.uniform(0.5, 4))  # start-up, then mid-batch
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / f"watch{attempt}.log").read_text()
    store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    with store.session() as s:
        assert s.scalars(select(Run.status).where(Run.status == "running")).all() == []
    store.close()


def test_stop_timeout_stops_a_stuck_batch_cleanly_and_its_run_is_closed_later(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    db = tmp_path / "r.sqlite"
    cfg = write_config(tmp_path, top={"db_busy_timeout_seconds": 5}, stop_timeout_seconds=1)
    Store.open(f"sqlite:///{db}").close()
    proc = daemon(cfg, drop, log=tmp_path / "watch.log")
    wait_until(lambda: status(cfg)["returncode"] == 0, 120, what="the daemon up")
    holder = _hold_lock(db)
    for i in range(2):
        dicom_file(drop / f"s{i}.dcm", chest_like(seed=950 + i))
    wait_until(lambda: "scoring a batch of" in (tmp_path / "watch.log").read_text(), 60,
               what="the batch taken (and stuck on the lock)")
    proc.send_signal(signal.SIGTERM)  # stuck on the lock; the stop timeout is 1 s
    rc = proc.wait(timeout=30)
    assert rc == 0  # never 142 (SIGALRM) or killed by the signal
    holder.communicate("")
    proc = daemon(cfg, drop, "--max-idle", "3", log=tmp_path / "watch2.log")
    assert proc.wait(timeout=120) == 0
    store = Store.open(f"sqlite:///{db}")
    with store.session() as s:
        statuses = s.scalars(select(Run.status)).all()
    assert "running" not in statuses
    assert _count(store, Prediction) == 4  # the rest was finished by the next start
    store.close()


def test_kill_9_of_score_takes_its_decode_workers_with_it(tmp_path):
    folder = tmp_path / "in"
    for i in range(40):
        dicom_file(folder / f"k{i}.dcm", chest_like(rows=1200, cols=1000, seed=1000 + i))
    cfg = write_config(tmp_path, top={"decode_workers": 1, "batch_size": 4})
    proc = subprocess.Popen([sys.executable, "-m", "batchcxr.cli", "score", str(folder), "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids = wait_until(lambda: [c for c in children(proc.pid) if "spawn_main" in _cmdline(c)] and children(proc.pid),
                      120, interval=0.05, what="decode worker processes")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_until(lambda: not [k for k in kids if alive(k)], 30, what=f"children {kids} gone")


def test_a_decode_worker_that_dies_costs_no_file(tmp_path):
    """The kernel's OOM killer, or a decoder crashing on a file, ends a decode worker mid-task: the
    files it held are prepared again one at a time in a fresh worker, the run goes on, every file
    is scored once (one that kills its worker again would be recorded as failed, and kept)."""
    folder = tmp_path / "in"
    for i in range(40):
        dicom_file(folder / f"w{i}.dcm", chest_like(rows=1200, cols=1000, seed=1100 + i))
    cfg = write_config(tmp_path, top={"decode_workers": 1, "batch_size": 4})
    proc = subprocess.Popen([sys.executable, "-m", "batchcxr.cli", "score", str(folder), "--config", str(cfg),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (worker,) = wait_until(lambda: [c for c in children(proc.pid) if "spawn_main" in _cmdline(c)
                                    and "resource_tracker" not in _cmdline(c)], 120, interval=0.02,
                           what="the decode worker")
    os.kill(worker, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "scored     40" in out and "failed     0" in out, out
    store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    assert _count(store, Prediction) == 80 and _count(store, ErrorRecord) == 0
    store.close()


def test_a_file_whose_worker_dies_is_recorded_as_failed_and_the_rest_go_on(tmp_path):
    """prepare_isolated, what a restarted scorer uses for the files a dead process held: the worker
    dies while it has the first file (killed here, as a crashing decoder would end it); that file
    comes back as failed with its hash, the next one is prepared in a fresh worker."""
    import multiprocessing

    from batchcxr.domain import PreparedImage, Rejection
    from batchcxr.pipeline import CRASHED, prepare_isolated
    from batchcxr.settings import QualitySettings

    first = dicom_file(tmp_path / "in" / "a.dcm", chest_like(seed=1201))
    second = dicom_file(tmp_path / "in" / "b.dcm", chest_like(seed=1202))
    args = (tmp_path / "in", QualitySettings(), 256, tmp_path / "reports", 0.0)
    (tmp_path / "reports").mkdir()
    me, killed = os.getpid(), []

    def kill_the_first_worker() -> None:
        worker = wait_until(lambda: [c for c in children(me) if "spawn_main" in _cmdline(c)
                                     and "resource_tracker" not in _cmdline(c)], 60, interval=0.005,
                            what="the isolated decode worker")[0]
        os.kill(worker, signal.SIGKILL)
        killed.append(worker)

    killer = threading.Thread(target=kill_the_first_worker)
    killer.start()
    results = prepare_isolated([first, second], args, multiprocessing.get_context("spawn"))
    a = next(results)
    killer.join()
    b = next(results)
    assert killed and isinstance(a.result, Rejection) and a.result.reason == CRASHED
    assert a.source.sha256 == _sha(first)  # known by its content: reported as failed earlier next time
    assert isinstance(b.result, PreparedImage) and b.source.path == second


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_crash_leftovers_are_cleared_at_start(tmp_path, models):
    drop = tmp_path / "drop"
    drop.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    watcher = _watcher(tmp_path, drop, models)
    store = watcher.store
    stale = store.start_run("watch", str(drop), watcher.scorer.versions, host=socket.gethostname(), pid=dead.pid)
    tmp = tmp_path / "reports" / ".tmp"
    tmp.mkdir(parents=True)
    (tmp / f".index.html.{dead.pid}.tmp").write_text("half")
    (tmp / f".index.html.{os.getpid()}.tmp").write_text("ours, alive")
    store.claim([str(drop / "x.dcm")], f"{socket.gethostname()}:{dead.pid}")
    watcher.run(max_idle_seconds=0.5)
    assert store.get_run(stale).status == "interrupted"
    assert not (tmp / f".index.html.{dead.pid}.tmp").exists() and (tmp / f".index.html.{os.getpid()}.tmp").exists()
    assert store.claim_owners([str(drop / "x.dcm")]) == {}
    store.close()


def test_the_incomplete_file_timer_survives_restarts(tmp_path, models):
    drop = tmp_path / "drop"
    drop.mkdir()
    good = jpeg_file(tmp_path / "g.jpg", chest_like(seed=61)).read_bytes()
    (drop / "cut.jpg").write_bytes(good[: len(good) // 2])  # never completes
    first = _watcher(tmp_path, drop, models, incomplete_timeout_seconds=6.0)
    t0 = time.time()

    def crash_after_the_timer_started():
        from batchcxr.store.schema import IncompleteFile

        wait_until(lambda: _count(first.store, IncompleteFile), 30, what="the timer recorded")
        wait_until(lambda: time.time() - t0 > 2.5, 10)
        first.stop_requested = True

    t = threading.Thread(target=crash_after_the_timer_started)
    t.start()
    first.run()
    t.join()
    first.store.close()
    assert (drop / "cut.jpg").exists()
    second = _watcher(tmp_path, drop, models, incomplete_timeout_seconds=6.0)
    t1 = time.time()
    second.run(max_idle_seconds=2.0)
    assert (tmp_path / "quarantine" / "cut.jpg").is_file()
    error = json.loads((tmp_path / "quarantine" / "cut.jpg.error.json").read_text())
    assert "truncated JPEG" in error["reason"]
    import datetime as dt

    quarantined = dt.datetime.fromisoformat(error["time"]).timestamp()
    assert quarantined - t0 >= 5.0  # (whole seconds) not before its time
    assert quarantined - t1 < 6.0  # restarted with the second life, the timer alone would take 6 s
    second.store.close()


def test_nightly_job_on_the_drop_folder_while_the_daemon_runs(tmp_path):
    """`score --since` over the very folder the daemon watches, while files are still arriving
    (slow writes, renames): no false failures, every file scored exactly once, all archived."""
    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = write_config(tmp_path)
    src = tmp_path / "src"
    datas = [dicom_file(src / f"n{i}.dcm", chest_like(seed=1100 + i)).read_bytes() for i in range(16)]
    proc = daemon(cfg, drop, log=tmp_path / "watch.log")

    def arrive():
        for i, data in enumerate(datas):
            target = drop / f"s{i % 5}" / f"n{i}.dcm"
            target.parent.mkdir(exist_ok=True)
            part = target.with_name(target.name + ".part") if i % 2 else target
            with open(part, "wb") as f:
                for k in range(0, len(data), len(data) // 3 + 1):
                    f.write(data[k : k + len(data) // 3 + 1])
                    f.flush()
                    time.sleep(0.15)
            if part != target:
                part.rename(target)

    t = threading.Thread(target=arrive)
    t.start()
    nightly = []
    try:
        while t.is_alive() or not nightly:
            nightly.append(cli("score", str(drop), "--config", str(cfg), "--since", "24h", timeout=300))
        t.join()
        wait_until(lambda: len(list((tmp_path / "archive").rglob("*.dcm"))) == 16, 180, what="all files archived")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    for run in nightly:
        assert run.returncode == 0, run.stdout + run.stderr
        assert "failed     0" in run.stdout
    store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    assert _count(store, Prediction) == 32  # 16 files x 2 models: none scored twice
    assert _count(store, ErrorRecord) == 0
    store.close()
    archived = sorted(_sha(p) for p in (tmp_path / "archive").rglob("*.dcm"))
    assert archived == sorted(hashlib.sha256(d).hexdigest() for d in datas)


def _peak_rss_mb(args: list[str], tmp_path: Path) -> tuple[int, float, str]:
    """Run ``python -m batchcxr.cli ARGS``; its exit code, its own peak RSS in MB (VmHWM, through
    benchmarks.peak) and its output."""
    out_file = tmp_path / "peak.txt"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peak", str(out_file), "batchcxr.cli", *args],
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, float(out_file.read_text()), proc.stdout + proc.stderr


def test_bombs_are_refused_before_decoding_and_memory_stays_under_1_gb(tmp_path):
    from tests.bombs import deflate_bomb, dicom_frame_bomb, jpeg_bomb, png_bomb

    folder = tmp_path / "bombs"
    png_bomb(folder / "png" / "huge.png")
    jpeg_bomb(folder / "jpg" / "junk-before-sof.jpg")
    dicom_frame_bomb(folder / "frame-lies.dcm")
    deflate_bomb(folder / "deflated.dcm")
    old = time.time() - 3600  # old files: failures, not "still being written"
    for p in folder.rglob("*"):
        os.utime(p, (old, old))
    assert max(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 2_000_000
    rc, rss, out = _peak_rss_mb(["score", str(folder), "--db", str(tmp_path / "r.sqlite"), "--reports",
                                 str(tmp_path / "rep")], tmp_path)
    assert rc == 1, out  # failed files, recorded
    assert rss < 1024, f"peak RSS {rss:.0f} MB"
    store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    reasons = {Path(e.path).name: e.reason for e in store.errors()}
    store.close()
    assert "30000x30000 = 900,000,000 pixels" in reasons["huge.png"] and "not decoded" in reasons["huge.png"]
    assert "30000x30000" in reasons["junk-before-sof.jpg"] and "not decoded" in reasons["junk-before-sof.jpg"]
    assert reasons["frame-lies.dcm"].startswith("frame header says 30000x30000 but Rows/Columns say 512x512")
    assert "inflates to more than" in reasons["deflated.dcm"]
    # the watcher checks completeness without inflating the bomb into memory either
    (tmp_path / "drop").mkdir()
    for p in folder.rglob("*"):
        if p.is_file():
            os.rename(p, tmp_path / "drop" / p.name)
    cfg = write_config(tmp_path, db_url=f"sqlite:///{tmp_path / 'w.sqlite'}")
    rc, rss, out = _peak_rss_mb(["watch", str(tmp_path / "drop"), "--config", str(cfg), "--max-idle", "3"],
                                tmp_path)
    assert rc == 0, out
    assert rss < 1024, f"watcher peak RSS {rss:.0f} MB"
    assert len(list((tmp_path / "quarantine").glob("*.error.json"))) == 4
