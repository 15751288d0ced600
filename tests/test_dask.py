"""Scoring on Dask: a real LocalCluster (2 worker processes, 1 thread each) and a real PostgreSQL;
a worker killed mid-task, a scheduler that goes away."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from batchcxr.store.repo import Store
from batchcxr.store.schema import Image, Prediction, Run

from tests.conftest import free_port, new_pg_database
from tests.dicoms import chest_like, dicom_file, jpeg_file
from tests.helpers import cli, wait_until, write_config

pytest.importorskip("distributed")


def _inputs(folder: Path, n: int, seed: int) -> None:
    for i in range(n):
        if i % 3 == 2:
            jpeg_file(folder / f"j{i // 6}" / f"{i}.jpg", chest_like(seed=seed + i))
        else:
            dicom_file(folder / f"{i}.dcm", chest_like(seed=seed + i), StudyInstanceUID=f"1.2.826.0.1.{seed}.{i // 2}")
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 40)
    old = time.time() - 3600
    os.utime(folder / "broken.dcm", (old, old))


def _counts(url: str) -> tuple[int, int]:
    store = Store.open(url)
    with store.session() as s:
        n = s.scalar(select(func.count(Prediction.id))), s.scalar(
            select(func.count(Image.id)).where(Image.status == "scored"))
    store.close()
    return n


@pytest.fixture
def cluster(tmp_path):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           local_directory=str(tmp_path / "dask"))
    yield cluster
    Client(cluster).close()
    cluster.close()


def test_dask_scores_like_the_process_does(tmp_path, cluster, postgres_server):
    """In-process, on Dask with the client writing, and on Dask with the workers writing: the same
    scores, files and outcomes; a rerun on Dask reads nothing again."""
    import shutil

    from batchcxr.distributed import close_clients
    from batchcxr.pipeline import Scorer
    from batchcxr.settings import Settings

    folder = tmp_path / "in"
    _inputs(folder, 12, 2000)
    shutil.copy(folder / "0.dcm", folder / "copy-of-0.dcm")  # the same content twice: scored once
    results = {}
    try:
        for name, url, scheduler, workers_write in (
                ("local", f"sqlite:///{tmp_path / 'l.sqlite'}", "", False),
                ("dask", new_pg_database(postgres_server), cluster.scheduler_address, False),
                ("workers", new_pg_database(postgres_server), cluster.scheduler_address, True)):
            settings = Settings(db_url=url, reports_dir=tmp_path / f"rep-{name}", scheduler=scheduler, batch_size=4,
                                dask_workers_write=workers_write)
            store = Store.open(url)
            scorer = Scorer.from_settings(settings, store)
            summary = scorer.score_tree(folder)
            again = scorer.score_tree(folder)
            # two files with one content share one image row, which names either path (with workers
            # writing, the one written last): key the scores by the first
            results[name] = (summary, again, {(r["path"].replace("copy-of-0", "0"), r["model_name"]): r["probability"]
                                              for r in store.prediction_rows()})
            store.close()
    finally:
        close_clients()
    local, local_again, local_scores = results["local"]
    for name in ("dask", "workers"):
        summary, again, scores = results[name]
        assert summary.scored == local.scored == 12 and summary.unchanged == local.unchanged == 1, name
        assert summary.failed == local.failed and sum(summary.failed.values()) == 1, name
        assert again.scored == 0 and again.unchanged == local_again.unchanged == 13, name
        assert scores.keys() == local_scores.keys(), name
        assert all(abs(scores[k] - local_scores[k]) < 1e-5 for k in local_scores), name
        images = tmp_path / f"rep-{name}" / "images"
        assert len(list(images.glob("*.jpg"))) == 12 and len(list(images.glob("*.png"))) == 24, name
        assert len(list(images.glob("*-lungs.svg"))) == 12, name
        assert (tmp_path / f"rep-{name}" / "index.html").is_file()  # the client renders the pages


def test_a_task_run_again_counts_what_it_wrote_before_as_scored(tmp_path, cluster, pg_url):
    """A worker that dies after a batch of its task was committed: Dask runs the task again; the
    files it wrote are this run's, so they come back scored (not `unchanged`), written once."""
    from distributed import Client

    from batchcxr.distributed import ModelsPlugin, PLUGIN_NAME, prepare_score_store
    from batchcxr.domain import Stored
    from batchcxr.settings import Settings

    folder = tmp_path / "in"
    _inputs(folder, 6, 5000)
    settings = Settings(db_url=pg_url, reports_dir=tmp_path / "rep", batch_size=4, dask_workers_write=True)
    store = Store.open(pg_url)
    run_id = store.start_run("score", str(folder), [])
    other_run = store.start_run("score", str(folder), [])
    paths = sorted(str(p) for p in folder.rglob("*.*") if p.name != "broken.dcm")
    client = Client(cluster)
    try:
        client.register_plugin(ModelsPlugin([str(p) for p in settings.models], str(settings.lung_model)),
                               name=PLUGIN_NAME)
        first, again, later = (client.submit(prepare_score_store, paths, str(folder), settings, 0.0, run, pure=False)
                               .result() for run in (run_id, run_id, other_run))
    finally:
        client.close()
    for results in (first, again):
        assert [type(p.result) for p in results] == [Stored] * 6
        assert all(not p.result.earlier_status and not p.result.refused for p in results)
    assert [p.result.earlier_status for p in later] == ["scored"] * 6  # another run: known, not rewritten
    assert _counts(pg_url) == (12, 6)
    store.close()


def test_workers_writing_the_store_refuse_sqlite(tmp_path):
    from batchcxr.settings import ConfigError, load_settings

    with pytest.raises(ConfigError, match="PostgreSQL"):
        load_settings(overrides={"scheduler": "local:2", "dask_workers_write": True,
                                 "db_url": str(tmp_path / "r.sqlite")}, environ={})
    cfg = write_config(tmp_path, top={"dask_workers_write": True})
    out = cli("score", str(tmp_path), "--config", str(cfg), "--scheduler", "local:1")
    assert out.returncode == 2 and "not SQLite" in out.stderr, out.stdout + out.stderr


@pytest.mark.parametrize("workers_write", [False, True], ids=["client-writes", "workers-write"])
def test_a_worker_killed_mid_task_loses_and_duplicates_nothing(tmp_path, cluster, pg_url, workers_write):
    from distributed import Client

    from batchcxr.distributed import close_clients
    from batchcxr.pipeline import Scorer
    from batchcxr.settings import Settings

    folder = tmp_path / "in"
    _inputs(folder, 40, 3000)
    settings = Settings(db_url=pg_url, reports_dir=tmp_path / "rep", scheduler=cluster.scheduler_address, batch_size=4,
                        dask_tasks_in_flight=2, dask_workers_write=workers_write)
    store = Store.open(pg_url)
    scorer = Scorer.from_settings(settings, store)
    client = Client(cluster)
    box = {}

    def run():
        box["summary"] = scorer.score_tree(folder)

    t = threading.Thread(target=run)
    t.start()
    try:
        def busy_worker():
            processing = client.processing()
            busy = [w for w, tasks in processing.items() if tasks]
            return busy[0] if busy else None
        worker = wait_until(busy_worker, 120, interval=0.05, what="a worker with a task")
        pid = client.run(os.getpid, workers=[worker])[worker]
        os.kill(pid, signal.SIGKILL)  # mid-task; its nanny starts a new one and Dask reschedules the task
        t.join(timeout=600)
    finally:
        client.close()
        close_clients()
    assert not t.is_alive()
    summary = box["summary"]
    assert summary.status == "finished" and summary.scored == 40 and sum(summary.failed.values()) == 1
    assert _counts(pg_url) == (80, 40)  # every image once, two models each
    store.close()


def test_the_scheduler_going_away_interrupts_the_run_and_a_rerun_finishes(tmp_path, pg_url):
    folder = tmp_path / "in"
    _inputs(folder, 60, 4000)
    cfg = write_config(tmp_path, db_url=pg_url, top={"batch_size": 4, "dask_tasks_in_flight": 2})

    def start_cluster():
        port = free_port()
        env = dict(os.environ, DASK_DISTRIBUTED__WORKER__DAEMON="False")
        scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                      "--port", str(port), "--no-dashboard"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", f"tcp://127.0.0.1:{port}",
                                   "--nthreads", "1", "--nworkers", "1", "--no-dashboard", "--local-directory",
                                   str(tmp_path / f"w{port}")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env=env)
        return port, scheduler, worker

    port, scheduler, worker = start_cluster()
    try:
        score = subprocess.Popen([sys.executable, "-m", "batchcxr.cli", "score", str(folder), "--config", str(cfg),
                                  "--scheduler", f"tcp://127.0.0.1:{port}"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        wait_until(lambda: _counts(pg_url)[0] >= 8, 300, interval=0.2, what="some images scored on Dask")
        scheduler.send_signal(signal.SIGKILL)  # the scheduler machine goes away
        out, err = score.communicate(timeout=300)
        assert score.returncode == 3, out + err
        assert "Dask scheduler" in err
        store = Store.open(pg_url)
        with store.session() as s:
            assert s.scalars(select(Run.status).order_by(Run.id.desc())).first() == "interrupted"
        store.close()
    finally:
        for p in (scheduler, worker):
            p.kill()
            p.wait()
    port, scheduler, worker = start_cluster()
    try:
        again = cli("score", str(folder), "--config", str(cfg), "--scheduler", f"tcp://127.0.0.1:{port}", timeout=600)
        assert again.returncode == 1, again.stdout + again.stderr  # 1: broken.dcm failed (recorded), nothing else
    finally:
        for p in (scheduler, worker):
            p.kill()
            p.wait()
    assert _counts(pg_url) == (120, 60)


def test_without_a_scheduler_dask_is_never_imported(tmp_path):
    code = ("import sys; from batchcxr.cli import main\n"
            "try:\n main(['score', sys.argv[1], '--db', sys.argv[2], '--reports', sys.argv[3]])\n"
            "except SystemExit:\n pass\n"
            "print('dask' in sys.modules or 'distributed' in sys.modules)")
    jpeg_file(tmp_path / "in" / "a.jpg", chest_like(seed=5))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in"), str(tmp_path / "r.sqlite"),
                          str(tmp_path / "rep")], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
