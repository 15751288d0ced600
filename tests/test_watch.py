"""The drop-folder daemon: real watchdog observers, real files, real subprocesses and signals."""

from __future__ import annotations

import hashlib
import random
import signal
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
from batchcxr.store.schema import Image, Prediction
from batchcxr.worker import Watcher

from tests.dicoms import chest_like, dicom_file, jpeg_file
from tests.helpers import wait_until

FAST = dict(file_quiet_seconds=0.3, study_quiet_seconds=0.6, batch_wait_seconds=0.2, rescan_seconds=1.0,
            heartbeat_seconds=0.3, poll_seconds=0.2)


@pytest.fixture(scope="module")
def models():
    return [load_scoring_model(MODELS_DIR / "cnn"), load_scoring_model(MODELS_DIR / "mobilenetv2")]


@pytest.fixture
def layout(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    return tmp_path, drop


def _watcher(tmp_path: Path, drop: Path, models, db_url: str | None = None, **watch) -> Watcher:
    settings = Settings(db_url=db_url or str(tmp_path / "r.sqlite"), reports_dir=tmp_path / "reports",
                        watch=WatchSettings(**{"archive_dir": str(tmp_path / "archive"),
                                               "quarantine_dir": str(tmp_path / "quarantine"), **FAST, **watch}))
    return Watcher(Scorer(settings, Store.open(settings.sqlalchemy_url), models), drop)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_slowly(path: Path, data: bytes, chunks: int = 4, pause: float = 0.5) -> None:
    step = len(data) // chunks + 1
    with open(path, "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i : i + step])
            f.flush()
            time.sleep(pause)


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_slow_writes_and_part_renames_are_scored_once(layout, models, polling, db_url):
    tmp_path, drop = layout
    src = tmp_path / "src"
    slow = dicom_file(src / "slow.dcm", chest_like(seed=1)).read_bytes()
    renamed = dicom_file(src / "renamed.dcm", chest_like(seed=2)).read_bytes()
    picture = jpeg_file(src / "pic.jpg", chest_like(seed=3)).read_bytes()
    watcher = _watcher(tmp_path, drop, models, db_url, polling=polling)

    def writer():
        (drop / "a").mkdir()
        _write_slowly(drop / "a" / "slow.dcm", slow)
        part = drop / "renamed.dcm.part"
        _write_slowly(part, renamed)
        part.rename(drop / "renamed.dcm")
        (drop / "j").mkdir()
        _write_slowly(drop / "j" / "pic.jpg", picture)

    t = threading.Thread(target=writer)
    t.start()
    watcher.run(max_idle_seconds=4.0)
    t.join()
    archived = sorted(p.relative_to(tmp_path / "archive").as_posix() for p in (tmp_path / "archive").rglob("*")
                      if p.is_file())
    assert archived == ["a/slow.dcm", "j/pic.jpg", "renamed.dcm"]
    assert not (tmp_path / "quarantine").exists()
    assert [p for p in drop.rglob("*") if p.is_file()] == []
    with watcher.scorer.store.session() as s:
        assert s.scalar(select(func.count(Image.id))) == 3
        assert s.scalar(select(func.count(Prediction.id))) == 6
    assert watcher.scorer.store.errors() == []  # nothing failed for being incomplete


def test_study_arriving_over_time_is_rescored_and_its_report_updated(layout, models, db_url):
    tmp_path, drop = layout
    study = "1.2.826.0.1.3680043.8.498.42"
    watcher = _watcher(tmp_path, drop, models, db_url)
    dicom_file(drop / "one.dcm", chest_like(seed=5), StudyInstanceUID=study, PatientName="Over^Time")
    watcher.run(max_idle_seconds=2.0)
    page = next((tmp_path / "reports" / "studies").glob("*.html"))
    assert page.read_text().count("<section class=\"image") == 1
    dicom_file(drop / "two.dcm", chest_like(seed=6), StudyInstanceUID=study, PatientName="Over^Time")
    watcher.stop_requested = False
    watcher.run(max_idle_seconds=2.0)
    assert page.read_text().count("<section class=\"image") == 2
    studies = watcher.scorer.store.studies()
    assert len(studies) == 1 and len(studies[0].images) == 2


def test_failed_file_is_quarantined_with_error_json(layout, models, db_url):
    tmp_path, drop = layout
    watcher = _watcher(tmp_path, drop, models, db_url, incomplete_timeout_seconds=1.0)
    good = jpeg_file(tmp_path / "g.jpg").read_bytes()
    (drop / "broken.jpg").write_bytes(good[: len(good) // 2])  # never completes
    (drop / "notes.txt").write_text("hello")
    watcher.run(max_idle_seconds=3.0)
    q = tmp_path / "quarantine"
    assert (q / "broken.jpg").read_bytes() == good[: len(good) // 2]
    import json

    error = json.loads((q / "broken.jpg.error.json").read_text())
    assert "truncated JPEG" in error["reason"] and error["stage"] == "decode"
    assert (tmp_path / "archive" / "notes.txt").read_text() == "hello"  # skipped, not lost


def _config(tmp_path: Path, **watch) -> Path:
    cfg = tmp_path / "batchcxr.toml"
    lines = ["[batchcxr]", f'db_url = "{tmp_path / "r.sqlite"}"', f'reports_dir = "{tmp_path / "reports"}"',
             f'lock_file = "{tmp_path / "score.lock"}"', "batch_size = 4", "[batchcxr.watch]",
             f'archive_dir = "{tmp_path / "archive"}"', f'quarantine_dir = "{tmp_path / "quarantine"}"']
    lines += [f"{k} = {v}" for k, v in {**FAST, **watch}.items()]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def _daemon(cfg: Path, drop: Path, *extra: str) -> subprocess.Popen:
    log = open(cfg.parent / "watch.log", "a")  # a file, not a pipe: a chatty daemon never blocks on it
    return subprocess.Popen([sys.executable, "-m", "batchcxr.cli", "watch", str(drop), "--config", str(cfg), *extra],
                            stdout=subprocess.DEVNULL, stderr=log, text=True)


def _log(tmp_path: Path) -> str:
    return (tmp_path / "watch.log").read_text()


def test_sigkill_at_random_points_scores_each_file_exactly_once(layout):
    tmp_path, drop = layout
    cfg = _config(tmp_path)
    n = 14
    inputs = {}
    for i in range(n):
        p = dicom_file(drop / f"s{i % 4}" / f"img{i}.dcm", chest_like(seed=100 + i))
        inputs[_sha(p)] = p.relative_to(drop)
    (drop / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 40)
    rng = random.Random(7)
    for _ in range(6):  # start, let it run a random while, kill -9
        proc = _daemon(cfg, drop)
        time.sleep(rng.uniform(1.0, 4.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = _daemon(cfg, drop, "--max-idle", "4")
    assert proc.wait(timeout=120) == 0, _log(tmp_path)

    archived = [p for p in (tmp_path / "archive").rglob("*") if p.is_file()]
    assert sorted(_sha(p) for p in archived) == sorted(inputs)  # every image once, none lost, none twice
    quarantined = [p.name for p in (tmp_path / "quarantine").rglob("*") if p.is_file()]
    assert sorted(quarantined) == ["bad.dcm", "bad.dcm.error.json"]
    assert [p for p in drop.rglob("*") if p.is_file()] == []
    store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    with store.session() as s:
        assert s.scalar(select(func.count(Prediction.id))) == 2 * n
        assert s.scalar(select(func.count(Image.id)).where(Image.status == "scored")) == n
    reports = tmp_path / "reports"
    assert not [p for p in reports.rglob("*.tmp")] or all(p.name.startswith(".") for p in reports.rglob("*.tmp"))
    for page in reports.rglob("*.html"):
        assert page.read_text().rstrip().endswith("</html>")  # never half-written
    store.close()


def test_sigterm_finishes_and_exits_zero(layout):
    tmp_path, drop = layout
    cfg = _config(tmp_path)
    for i in range(8):
        dicom_file(drop / f"t{i}.dcm", chest_like(seed=200 + i))
    proc = _daemon(cfg, drop)
    wait_until(lambda: "scoring a batch of" in _log(tmp_path), 120, what="a batch in hand")  # a daemon at work
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert time.monotonic() - start < 60
    out = subprocess.run([sys.executable, "-m", "batchcxr.cli", "status", "--config", str(cfg)],
                         capture_output=True, text=True)
    assert "NOT RUNNING (state stopped" in out.stdout


def test_status_reports_a_live_daemon(layout):
    tmp_path, drop = layout
    cfg = _config(tmp_path)
    proc = _daemon(cfg, drop)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run([sys.executable, "-m", "batchcxr.cli", "status", "--config", str(cfg)],
                                 capture_output=True, text=True)
            if "ALIVE" in out.stdout:
                break
            time.sleep(0.5)
        assert "ALIVE" in out.stdout and out.returncode == 0
        assert "files waiting 0" in out.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_watcher_and_nightly_job_share_one_sqlite_file(layout):
    tmp_path, drop = layout
    archive_in = tmp_path / "old-archive"
    for i in range(12):
        dicom_file(archive_in / f"n{i}.dcm", chest_like(seed=300 + i))
    for i in range(12):
        dicom_file(drop / f"w{i}.dcm", chest_like(seed=400 + i))
    cfg = _config(tmp_path)
    watcher = _daemon(cfg, drop, "--max-idle", "4")
    wait_until(lambda: "scoring a batch of" in _log(tmp_path), 120, what="the watcher at work")
    nightly = subprocess.run([sys.executable, "-m", "batchcxr.cli", "score", str(archive_in), "--config", str(cfg),
                              "--since", "24h"], capture_output=True, text=True, timeout=300)
    assert watcher.wait(timeout=300) == 0
    err = _log(tmp_path)
    assert nightly.returncode == 0, nightly.stderr
    assert "database is locked" not in nightly.stderr + err
    assert "scored     12" in nightly.stdout
    store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    with store.session() as s:
        assert s.scalar(select(func.count(Prediction.id))) == 2 * 24
    store.close()
    # a second nightly run finds nothing new
    again = subprocess.run([sys.executable, "-m", "batchcxr.cli", "score", str(archive_in), "--config", str(cfg),
                            "--since", "24h"], capture_output=True, text=True, timeout=300)
    assert "scored     0" in again.stdout and "unchanged  12" in again.stdout


def test_nightly_lock_refuses_a_second_run(tmp_path):
    from filelock import FileLock

    cfg = _config(tmp_path)
    (tmp_path / "in").mkdir()
    with FileLock(str(tmp_path / "score.lock")):
        out = subprocess.run([sys.executable, "-m", "batchcxr.cli", "score", str(tmp_path / "in"), "--config",
                              str(cfg), "--since", "24h"], capture_output=True, text=True)
    assert out.returncode == 3 and "another run holds" in out.stderr


def test_two_watchers_and_a_nightly_job_on_one_postgresql_database(tmp_path, pg_url):
    """Two daemons watching one drop folder (as two machines would on a share) and a nightly run over
    it, all writing one PostgreSQL database while files arrive: every file scored exactly once."""
    from tests.helpers import cli, daemon, write_config

    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = write_config(tmp_path, db_url=pg_url)
    procs = [daemon(cfg, drop, log=tmp_path / f"watch{k}.log") for k in range(2)]
    n = 20
    datas = [dicom_file(tmp_path / "src" / f"p{i}.dcm", chest_like(seed=500 + i)).read_bytes() for i in range(n)]
    try:
        for i, data in enumerate(datas):
            part = drop / f"s{i % 6}" / f"p{i}.dcm.part"
            part.parent.mkdir(exist_ok=True)
            part.write_bytes(data)
            part.rename(part.with_suffix(""))
            if i == n // 2:
                nightly = cli("score", str(drop), "--config", str(cfg), "--since", "24h")
                assert nightly.returncode == 0 and "failed     0" in nightly.stdout, nightly.stdout + nightly.stderr
        wait_until(lambda: len(list((tmp_path / "archive").rglob("*.dcm"))) >= n and not list(drop.rglob("*.dcm")),
                   240, what="all files archived")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    archived = sorted(_sha(p) for p in (tmp_path / "archive").rglob("*.dcm"))
    assert archived == sorted(hashlib.sha256(d).hexdigest() for d in datas)  # each once: no name.1.dcm copies
    store = Store.open(pg_url)
    with store.session() as s:
        assert s.scalar(select(func.count(Prediction.id))) == 2 * n
        assert s.scalar(select(func.count(Image.id)).where(Image.status == "scored")) == n
    assert store.errors() == []
    store.close()


def test_a_restart_never_reads_or_renders_files_it_handled(layout, models, db_url):
    """Inputs left in place (no archive): a restarted watcher knows them by their identity and
    neither reads, decodes nor re-renders them."""
    tmp_path, drop = layout
    for i in range(6):
        dicom_file(drop / f"k{i}.dcm", chest_like(seed=1200 + i))
    first = _watcher(tmp_path, drop, models, db_url, archive_dir="")
    first.run(max_idle_seconds=1.5)
    runs = len(first.store.recent_runs(100))
    images = {p: p.stat().st_mtime_ns for p in (tmp_path / "reports" / "images").iterdir()}
    first.store.close()
    second = _watcher(tmp_path, drop, models, db_url, archive_dir="")
    second.run(max_idle_seconds=2.5)  # several rescans
    assert len(second.store.recent_runs(100)) == runs  # no batch: nothing was read or scored
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "reports" / "images").iterdir()} == images
    assert len(list(drop.glob("*.dcm"))) == 6
    second.store.close()
