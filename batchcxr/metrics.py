"""Prometheus metrics (prometheus_client): what an operator graphs and alerts on.

The watcher serves them on a loopback port (``[batchcxr.watch] metrics_port``), `listen` too
(``[batchcxr.dicom] metrics_port``), the review app under /metrics with a bearer token
(``[batchcxr.web] metrics_token``); `score --metrics-file` writes them for node_exporter's
textfile collector (the nightly job). jobs/batchcxr-alerts.yml holds example alert rules.

Reasons are reduced to their kind (the text before the first parenthesis, colon or digit), so
the number of label values stays small whatever the files say.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server, write_to_textfile

FILES = Counter("batchcxr_files", "Files handled, by outcome and kind of reason", ["outcome", "reason"])
IMAGES = Counter("batchcxr_images_scored", "Images scored by both models")
BATCH_SECONDS = Histogram("batchcxr_batch_seconds", "Seconds to score one batch (reports included)",
                          buckets=(0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128))
END_TO_END = Histogram("batchcxr_end_to_end_seconds", "Seconds from a file first seen to its result stored and moved",
                       buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600))
WAITING = Gauge("batchcxr_files_waiting", "Files waiting to be whole, quiet or moved")
PENDING = Gauge("batchcxr_studies_pending", "Studies waiting for their quiet period")
OLDEST = Gauge("batchcxr_oldest_waiting_seconds", "How long the longest-waiting file has waited")
FAULTS = Counter("batchcxr_faults", "Faults met (each retry counts), by kind", ["kind"])
FAULT_ACTIVE = Gauge("batchcxr_fault_active", "1 while a fault keeps the daemon from working")
DISK_FREE = Gauge("batchcxr_disk_free_ratio", "Free share of the file system holding each folder", ["folder"])
MODEL = Gauge("batchcxr_model_info", "Models in use (value 1)", ["model", "version"])
HEARTBEAT = Gauge("batchcxr_heartbeat_timestamp_seconds", "Unix time of the last heartbeat")
RECEIVED = Counter("batchcxr_dicom_received", "DICOM instances received by the C-STORE SCP, by status", ["status"])
OUTBOX = Gauge("batchcxr_outbox_pending", "Results waiting to be sent to the PACS")
OUTBOX_SENT = Counter("batchcxr_outbox_sent", "Results sent to the PACS, by destination", ["destination"])
WEB_REQUESTS = Counter("batchcxr_web_requests", "Review-app requests, by endpoint and status", ["endpoint", "status"])
WEB_SECONDS = Histogram("batchcxr_web_request_seconds", "Review-app request latency", ["endpoint"],
                        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
LOGIN_FAILURES = Counter("batchcxr_login_failures", "Failed or refused logins")
SESSIONS = Gauge("batchcxr_web_sessions", "Live review-app sessions")

_KIND = re.compile(r"[(:\d]")


def reason_kind(reason: str) -> str:
    """'image too large (30000x30000 ...)' -> 'image too large'."""
    return _KIND.split(reason, 1)[0].strip()[:60] or "-"


def count_outcome(outcome: str, reason: str = "") -> None:
    FILES.labels(outcome, reason_kind(reason) if reason else "-").inc()


def set_models(models) -> None:
    for m in models:
        MODEL.labels(m.name, m.version).set(1)


def disk_free(folders: dict[str, Path]) -> None:
    for name, folder in folders.items():
        try:
            usage = shutil.disk_usage(folder)
        except OSError:
            continue
        DISK_FREE.labels(name).set(usage.free / usage.total if usage.total else 0.0)


def beat() -> None:
    HEARTBEAT.set(time.time())


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Serve /metrics on a loopback port (a thread)."""
    start_http_server(port, addr=host)


def write_textfile(path: Path) -> None:
    """For node_exporter's textfile collector (written atomically by prometheus_client)."""
    write_to_textfile(str(path), REGISTRY)
