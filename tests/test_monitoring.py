"""Prometheus metrics, scraped for real from the watcher's port, the review app and the nightly
job's textfile."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.dicoms import chest_like, dicom_file
from tests.helpers import cli, daemon, wait_until, write_config


def _samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_the_watcher_serves_metrics_on_a_loopback_port(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    port = free_port()
    cfg = write_config(tmp_path, metrics_port=port)
    for i in range(3):
        dicom_file(drop / f"m{i}.dcm", chest_like(seed=1300 + i))
    (drop / "notes.txt").write_text("not an image")
    proc = daemon(cfg, drop, log=tmp_path / "watch.log")
    try:
        def scraped():
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except requests.ConnectionError:
                return None
            s = _samples(text)
            return s if s.get(("batchcxr_end_to_end_seconds_count", ())) == 4 else None
        s = wait_until(scraped, 120, what="4 files done")
        assert s[("batchcxr_images_scored_total", ())] == 3
        assert s[("batchcxr_files_total", (("outcome", "scored"), ("reason", "-")))] == 3
        assert s[("batchcxr_files_total", (("outcome", "skipped"), ("reason", "not a DICOM, JPEG or PNG file")))] == 1
        assert s[("batchcxr_fault_active", ())] == 0 and ("batchcxr_files_waiting", ()) in s
        assert s[("batchcxr_batch_seconds_count", ())] >= 1
        assert any(k[0] == "batchcxr_model_info" for k in s) and any(k[0] == "batchcxr_disk_free_ratio" for k in s)
        assert time.time() - s[("batchcxr_heartbeat_timestamp_seconds", ())] < 60
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_the_nightly_job_writes_a_textfile_and_the_review_app_needs_its_token(tmp_path):
    from werkzeug.security import generate_password_hash

    from batchcxr.settings import Settings, WebSettings
    from batchcxr.store.repo import Store
    from batchcxr.web.app import create_app

    folder = tmp_path / "in"
    dicom_file(folder / "a.dcm", chest_like(seed=1400))
    out = cli("score", str(folder), "--db", str(tmp_path / "r.sqlite"), "--reports", str(tmp_path / "rep"),
              "--metrics-file", str(tmp_path / "batchcxr.prom"))
    assert out.returncode == 0, out.stderr
    s = _samples((tmp_path / "batchcxr.prom").read_text())
    assert s[("batchcxr_images_scored_total", ())] == 1
    settings = Settings(db_url=str(tmp_path / "r.sqlite"), reports_dir=tmp_path / "rep",
                        web=WebSettings(users={"a": generate_password_hash("x" * 12)}, secret_key="s" * 40,
                                        metrics_token="t0ken-for-prometheus"))
    store = Store.open(settings.sqlalchemy_url)
    client = create_app(settings, store).test_client()
    assert client.get("/metrics").status_code == 404
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 404
    client.get("/login")
    r = client.get("/metrics", headers={"Authorization": "Bearer t0ken-for-prometheus"})
    assert r.status_code == 200 and "batchcxr_web_requests_total" in r.text and "batchcxr_web_sessions" in r.text
    store.close()
