"""`batchcxr watch`: the drop-folder daemon loop.

One flat loop (after rq's worker): drain file events -> check which files are whole and
quiet -> group them by study -> score ready studies together in batches with the
pipeline of `batchcxr score` -> move inputs to the archive (or leave them) and failed
ones to quarantine -> heartbeat. SIGTERM/SIGINT ask for a warm stop (finish the batch in
hand); a second signal stops at once.

Crash safety: results are committed before any input is moved, and a file is known by
its content hash. After a kill -9 the restarted daemon finds unmoved files again, sees
they are already recorded, and only moves them: nothing is scored twice or lost.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import queue
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from batchcxr.ingest.complete import is_complete, is_temporary
from batchcxr.ingest.files import move_into, walk
from batchcxr.ingest.watch import start_observer
from batchcxr.pipeline import FileOutcome, RunSummary, Scorer, folder_key
from batchcxr.report.render import atomic_write
from batchcxr.store.schema import utcnow

log = logging.getLogger(__name__)

TICK_SECONDS = 0.2


@dataclass
class WaitingFile:
    size: int
    mtime_ns: int
    changed_at: float
    first_seen: float


@dataclass
class PendingStudy:
    paths: list[Path] = field(default_factory=list)
    last_arrival: float = 0.0


def study_key_of(path: Path, data: bytes, root: Path) -> str:
    """StudyInstanceUID of a DICOM file (header only), else the folder key."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        import pydicom

        try:
            ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
            uid = str(ds.get("StudyInstanceUID", "") or "").strip()
            if uid:
                return uid
        except Exception:  # noqa: BLE001 - a broken header fails later, in the pipeline, with its reason
            pass
    return folder_key(path, root)


class Watcher:
    """Watches one drop folder and feeds ready studies to a Scorer."""

    def __init__(self, scorer: Scorer, drop_dir: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.scorer = scorer
        self.settings = scorer.settings
        self.cfg = scorer.settings.watch
        self.drop = Path(drop_dir).resolve()
        self.clock = clock
        self.events: queue.Queue[Path] = queue.Queue()
        self.waiting: dict[Path, WaitingFile] = {}
        self.studies: dict[str, PendingStudy] = {}
        self.handled: dict[Path, tuple[int, int]] = {}
        """Files left in place after scoring, by (size, mtime): rescans skip them unless they change."""
        self.stop_requested = False
        self.name = f"watch:{self.drop}"
        self.started_at = utcnow()
        self.last_scored_at: dt.datetime | None = None
        self._last_heartbeat = -1e9
        self._last_rescan = -1e9

    # signals -------------------------------------------------------------
    def request_stop(self, signum: int, _frame) -> None:
        log.info("signal %d: finishing the batch in hand, then stopping", signum)
        self.stop_requested = True
        signal.signal(signum, self.force_stop)
        signal.signal(signal.SIGALRM, self.force_stop)
        signal.alarm(max(1, int(self.cfg.stop_timeout_seconds)))  # bounded: never hang on stop

    def force_stop(self, signum: int, _frame) -> None:
        log.warning("signal %d (second signal or stop timeout): stopping now", signum)
        raise SystemExit(1)

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    # folders -------------------------------------------------------------
    def _dir(self, value: str) -> Path | None:
        if not value:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.drop.parent / p

    # the loop ------------------------------------------------------------
    def run(self, *, max_idle_seconds: float | None = None) -> int:
        """Watch until stopped (or idle that long with nothing waiting). Returns the exit code."""
        observer = start_observer(self.drop, self.events, self.cfg.polling, self.cfg.poll_seconds)
        log.info("watching %s (%s)", self.drop, "polling" if self.cfg.polling else "inotify")
        idle_since = self.clock()
        try:
            while not self.stop_requested:
                now = self.clock()
                if now - self._last_rescan >= self.cfg.rescan_seconds:
                    self._rescan()
                self._drain(timeout=TICK_SECONDS)
                self._check_files()
                batch = self._ready_batch()
                if batch:
                    self._process(batch)
                    idle_since = self.clock()
                elif self.waiting or self.studies:
                    idle_since = self.clock()
                self._heartbeat()
                if max_idle_seconds is not None and self.clock() - idle_since >= max_idle_seconds:
                    break
        finally:
            observer.stop()
            observer.join(timeout=10)
            self._heartbeat(state="stopped", force=True)
        log.info("stopped")
        return 0

    def _rescan(self) -> None:
        self._last_rescan = self.clock()
        for path in walk(self.drop):
            if not self._excluded(path):
                self.events.put(path)

    def _excluded(self, path: Path) -> bool:
        if is_temporary(path.name):
            return True
        for folder in (self._dir(self.cfg.archive_dir), self._dir(self.cfg.quarantine_dir)):
            if folder is not None and folder.resolve() in path.resolve().parents:
                return True
        return False

    def _drain(self, timeout: float) -> None:
        try:
            path = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if path not in self.waiting and not self._excluded(path) and not self._queued(path):
                self.waiting[path] = WaitingFile(-1, -1, self.clock(), self.clock())
            try:
                path = self.events.get_nowait()
            except queue.Empty:
                return

    def _queued(self, path: Path) -> bool:
        return any(path in s.paths for s in self.studies.values())

    def _check_files(self) -> None:
        now = self.clock()
        for path, w in list(self.waiting.items()):
            try:
                st = path.stat()
            except FileNotFoundError:
                del self.waiting[path]  # renamed or removed by its writer
                continue
            if self.handled.get(path) == (st.st_size, st.st_mtime_ns):
                del self.waiting[path]
                continue
            if (st.st_size, st.st_mtime_ns) != (w.size, w.mtime_ns):
                w.size, w.mtime_ns, w.changed_at = st.st_size, st.st_mtime_ns, now
                continue
            if now - w.changed_at < self.cfg.file_quiet_seconds:
                continue
            try:
                data = path.read_bytes()
            except OSError:
                data = b""
            timed_out = now - w.changed_at >= self.cfg.incomplete_timeout_seconds
            if not timed_out and (st.st_size == 0 or not is_complete(data)):
                continue  # still being written: wait, never fail it for that
            del self.waiting[path]
            study = self.studies.setdefault(study_key_of(path, data, self.drop), PendingStudy())
            study.paths.append(path)
            study.last_arrival = now

    def _ready_batch(self) -> list[Path]:
        now = self.clock()
        ready = [k for k, s in self.studies.items() if now - s.last_arrival >= self.cfg.study_quiet_seconds]
        if not ready:
            return []
        n_ready = sum(len(self.studies[k].paths) for k in ready)
        oldest = min(self.studies[k].last_arrival for k in ready) + self.cfg.study_quiet_seconds
        if n_ready < self.settings.batch_size and now - oldest < self.cfg.batch_wait_seconds and not self.stop_requested:
            return []  # a little longer: more studies may fill the batch
        paths: list[Path] = []
        for key in sorted(ready, key=lambda k: self.studies[k].last_arrival):
            if paths and len(paths) + len(self.studies[key].paths) > self.settings.batch_size:
                break
            paths += self.studies.pop(key).paths
        return paths

    def _process(self, paths: list[Path]) -> None:
        summary = self.scorer.score_paths(self.drop, paths, command="watch")
        if summary.scored:
            self.last_scored_at = utcnow()
        self._dispose(summary)
        log.info("batch of %d files: %d scored, %d skipped, %d failed, %d unchanged",
                 len(paths), summary.scored, sum(summary.skipped.values()), sum(summary.failed.values()),
                 summary.unchanged)

    def _dispose(self, summary: RunSummary) -> None:
        """Archive or leave scored/skipped inputs; quarantine failed ones with an error file."""
        unchanged = [o.sha256 for o in summary.files.values() if o.status == "unchanged" and o.sha256]
        known = self.scorer.store.outcomes(unchanged) if unchanged else {}
        archive, quarantine = self._dir(self.cfg.archive_dir), self._dir(self.cfg.quarantine_dir)
        for path, outcome in summary.files.items():
            if outcome.status == "unchanged":
                status, reason, stage, detail = known.get(outcome.sha256, ("scored", "", "", ""))
                outcome = FileOutcome(outcome.sha256, status, reason, stage, detail)
            if not path.exists():
                continue
            if outcome.status != "failed" and archive is None:
                st = path.stat()
                self.handled[path] = (st.st_size, st.st_mtime_ns)
                continue
            rel = path.resolve().relative_to(self.drop)
            if outcome.status == "failed" and quarantine is not None:
                self._quarantine(path, rel, quarantine, outcome)
            elif outcome.status != "failed" and archive is not None:
                move_into(path, archive, rel)

    def _quarantine(self, path: Path, rel: Path, quarantine: Path, outcome: FileOutcome) -> None:
        target = move_into(path, quarantine, rel)
        error = {
            "file": str(rel),
            "original_path": str(path),
            "status": outcome.status,
            "stage": outcome.stage,
            "reason": outcome.reason,
            "traceback_digest": outcome.detail,
            "sha256": outcome.sha256,
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write(target.with_name(target.name + ".error.json"), json.dumps(error, indent=2) + "\n")
        log.warning("%s quarantined: %s", rel, outcome.reason)

    def _heartbeat(self, state: str = "running", force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_heartbeat < self.cfg.heartbeat_seconds:
            return
        self._last_heartbeat = now
        try:
            self.scorer.store.heartbeat(
                self.name, pid=os.getpid(), host=socket.gethostname(), state=state, started_at=self.started_at,
                files_waiting=len(self.waiting), studies_pending=len(self.studies),
                last_scored_at=self.last_scored_at)
        except Exception:  # noqa: BLE001 - a missed heartbeat must not stop the daemon
            log.exception("heartbeat failed")
