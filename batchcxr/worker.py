"""`batchcxr watch`: the drop-folder daemon loop.

One flat loop (after rq's worker): drain file events -> check which files are whole and quiet
-> group them by study -> score ready studies together in batches with the pipeline of
`batchcxr score` -> move inputs to the archive (or leave them) and failed ones to quarantine ->
heartbeat. SIGTERM/SIGINT ask for a warm stop (finish the batch in hand); a second signal, or
``stop_timeout_seconds``, stops at once.

Faults are routine. A full disk, a locked or unreachable database, an archive or quarantine
folder that cannot be written: the batch is put back, the fault is logged and shown by
`batchcxr status`, and the daemon tries again after 1, 2, 4 ... seconds (at most
``retry_max_seconds`` apart) until the fault clears. It never exits for a fault, so there is no
crash loop. Only regular files are read; symlinks, FIFOs, devices and sockets are recorded as
skipped and left where they are. A file is read when it has been quiet, and is checked again
(size, mtime, inode) before it is moved: a file that changed is queued again, never failed.

Crash safety: results are committed before any input is moved, and a file is known by its
identity and its content hash. After a kill -9 the restarted daemon marks its stale runs
``interrupted``, drops its dead claims and temp files, finds unmoved files again, sees they
are recorded, and only moves them: nothing is scored twice or lost.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import os
import queue
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.exc import DBAPIError, OperationalError

from batchcxr import metrics
from batchcxr.errors import FileChanged, FileTooLarge, FileVanished, NotRegularFile
from batchcxr.ingest.complete import is_complete, is_temporary
from batchcxr.ingest.files import FileIdentity, move_into, read_regular, walk
from batchcxr.ingest.watch import start_observer
from batchcxr.logs import escape_controls
from batchcxr.pipeline import FileOutcome, RunSummary, Scorer, folder_key
from batchcxr.report.files import atomic_write
from batchcxr.signals import Stop, StopNow, process_alive
from batchcxr.store.db import sqlite_path
from batchcxr.store.schema import utcnow

log = logging.getLogger(__name__)

TICK_SECONDS = 0.2
CLAIM_TTL_SECONDS = 600.0
HANDLED_MEMORY = 100_000
SEND_EVERY_SECONDS = 2.0


@dataclass
class WaitingFile:
    identity: FileIdentity | None
    changed_at: float
    first_seen: float
    checked: FileIdentity | None = None
    """The identity at which the file was last found incomplete: not read again until it changes."""


@dataclass
class PendingStudy:
    paths: list[Path] = field(default_factory=list)
    last_arrival: float = 0.0


@dataclass
class Fault:
    """What keeps the daemon from working now, and when it tries again."""

    what: str
    since: dt.datetime
    attempts: int = 0
    retry_at: float = 0.0


def describe_fault(exc: BaseException) -> str:
    """A line for the log and `batchcxr status`: which volume or the database, and why."""
    if isinstance(exc, (OperationalError, DBAPIError)):
        text = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
        return f"database: {text}"
    if isinstance(exc, OSError):
        name = errno.errorcode.get(exc.errno or 0, "")
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{' [' + name + ']' if name else ''}{where}"
    return f"{type(exc).__name__}: {exc}"


def is_fault(exc: BaseException) -> bool:
    """Faults of a volume or of the database (retried), as against bugs (logged and retried too)."""
    return isinstance(exc, (OperationalError, DBAPIError, OSError))


def study_key_of(path: Path, data: bytes, root: Path) -> str:
    """StudyInstanceUID of a DICOM file (header only; a Deflated data set is inflated only as far
    as the UID), else the folder key."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        from batchcxr.normalize.prepare import study_uid

        uid = study_uid(data)
        if uid:
            return uid
    return folder_key(path, root)


def safe_text(value: object) -> str:
    """A value for a log line with control characters escaped (a newline in a folder name must not
    forge a log line, whatever formatter a caller uses)."""
    return escape_controls(str(value))


class Watcher:
    """Watches one drop folder and feeds ready studies to a Scorer."""

    def __init__(self, scorer: Scorer, drop_dir: Path, clock: Callable[[], float] = time.monotonic,
                 stop: Stop | None = None) -> None:
        self.scorer = scorer
        self.store = scorer.store
        self.settings = scorer.settings
        self.cfg = scorer.settings.watch
        self.drop = Path(drop_dir).resolve()
        self.clock = clock
        self.stop = stop or Stop()
        self.events: queue.Queue[Path] = queue.Queue()
        self.waiting: dict[Path, WaitingFile] = {}
        self.studies: dict[str, PendingStudy] = {}
        self.handled: dict[Path, FileIdentity] = {}
        """Files left in place after handling, by identity: rescans skip them unless they change
        (at most HANDLED_MEMORY; beyond that the database's file records answer)."""
        self.to_move: dict[Path, FileOutcome] = {}
        """Handled files whose move failed (a fault): moved when the fault clears."""
        self.fault: Fault | None = None
        self.arrived: dict[Path, float] = {}
        """When each file not yet done was first seen (for the end-to-end time)."""
        self.name = f"watch:{self.drop}"
        self.host = socket.gethostname()
        self.started_at = utcnow()
        self.last_scored_at: dt.datetime | None = None
        self._last_heartbeat = -1e9
        self._last_rescan = -1e9
        self._next_send = -1e9
        self.status_file = self._status_file()

    @property
    def stop_requested(self) -> bool:
        return self.stop.requested

    @stop_requested.setter
    def stop_requested(self, value: bool) -> None:
        self.stop.requested = value

    def install_signal_handlers(self) -> None:
        self.stop.install()

    # folders -------------------------------------------------------------
    def _dir(self, value: str) -> Path | None:
        if not value:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.drop.parent / p

    def _status_file(self) -> Path | None:
        if self.cfg.status_file:
            return self._dir(self.cfg.status_file)
        db = sqlite_path(self.settings.sqlalchemy_url)
        if db is None:
            return None
        return db.with_name(f"{db.name}.watch-{hashlib.sha256(str(self.drop).encode()).hexdigest()[:8]}.json")

    # the loop ------------------------------------------------------------
    def run(self, *, max_idle_seconds: float | None = None) -> int:
        """Watch until stopped (or idle that long with nothing waiting). Returns the exit code."""
        self.stop.set_timeout(self.cfg.stop_timeout_seconds)
        observer = None
        receiver = None
        try:
            self._start_up()
            if self.settings.dicom.listen_in_watch:
                from batchcxr.ingest.scp import Receiver

                incoming = self._dir(self.settings.dicom.incoming_dir) or self.drop
                receiver = Receiver(self.settings.dicom, incoming)
                receiver.start()
            observer = start_observer(self.drop, self.events, self.cfg.polling, self.cfg.poll_seconds)
            log.info("watching %s (%s)", safe_text(self.drop), "polling" if self.cfg.polling else "inotify")
            idle_since = self.clock()
            while not self.stop.requested:
                if self._tick():
                    idle_since = self.clock()
                if max_idle_seconds is not None and self.clock() - idle_since >= max_idle_seconds:
                    break
        except StopNow as exc:
            log.warning("%s", exc)
        finally:
            self.stop.disarm()  # no stop alarm during the clean-up (or after it)
            try:
                if receiver is not None:
                    receiver.stop()
                if observer is not None:
                    observer.stop()
                    observer.join(timeout=10)
                self._heartbeat(state="stopped", force=True)
                self._release_claims()
            except StopNow:
                log.warning("second signal during the clean-up: stopping now")
        log.info("stopped")
        return 0

    def _start_up(self) -> None:
        """Clear what a crashed predecessor left: runs left ``running``, its claims, temp files.
        Retried like any fault until the database answers (or a stop is requested)."""
        metrics.set_models(self.scorer.models)
        if self.cfg.metrics_port:
            metrics.serve(self.cfg.metrics_port)
            log.info("metrics on http://127.0.0.1:%d/metrics", self.cfg.metrics_port)
        while not self.stop.requested:
            try:
                self.store.upgrade()
                stale = self.store.interrupt_stale_runs(self.host, process_alive)
                dropped = len(self.scorer.adopt_dead_claims())
                removed = self.scorer.reports.clean_temp(process_alive)
                if stale or dropped or removed:
                    log.info("start: %d stale runs marked interrupted, %d dead claims dropped, %d temp files removed",
                             len(stale), dropped, removed)
                self._clear_fault()
                return
            except Exception as exc:  # noqa: BLE001 - faults at start are retried too
                self._set_fault(exc)
                self._heartbeat()
                self._sleep_until(self.fault.retry_at)

    def _sleep_until(self, when: float) -> None:
        while not self.stop.requested and self.clock() < when:
            time.sleep(min(TICK_SECONDS, max(0.0, when - self.clock())))

    def _tick(self) -> bool:
        """One turn of the loop; True when there was work. No exception leaves it: a fault puts
        the work back and waits; anything else is logged and retried the same way."""
        busy = False
        try:
            now = self.clock()
            if now - self._last_rescan >= self.cfg.rescan_seconds:
                self._rescan()
            self._drain(timeout=TICK_SECONDS)
            self._check_files()
            if self.fault is None or now >= self.fault.retry_at:
                if self.to_move:
                    self._retry_moves()
                batch = self._ready_batch()
                if batch:
                    self._process(batch)
                    busy = True
                if self.fault is not None and not self.to_move:
                    self._clear_fault()  # what failed before worked this time
                self._send_results(now)
            busy = busy or bool(self.waiting or self.studies or self.to_move)
        except StopNow:
            raise
        except Exception as exc:  # noqa: BLE001 - the daemon never dies of one fault
            if not is_fault(exc):
                log.exception("unexpected error in the watch loop")
            self._set_fault(exc)
            busy = True
        self._heartbeat()
        return busy

    def _send_results(self, now: float) -> None:
        """Results due for the PACS (each destination's back-off is kept in the outbox table)."""
        if not self.scorer.outbox.enabled or now < self._next_send:
            return
        self._next_send = now + SEND_EVERY_SECONDS
        self.scorer.outbox.send_due()

    def _rescan(self) -> None:
        self._last_rescan = self.clock()
        for path in walk(self.drop, self.settings.ignore):
            if not self._excluded(path):
                self.events.put(path)

    def _excluded(self, path: Path) -> bool:
        if is_temporary(path.name):
            return True
        where = Path(os.path.abspath(path))
        for folder in (self._dir(self.cfg.archive_dir), self._dir(self.cfg.quarantine_dir)):
            if folder is not None and Path(os.path.abspath(folder)) in where.parents:
                return True
        return False

    def _drain(self, timeout: float) -> None:
        try:
            path = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if path not in self.waiting and not self._excluded(path) and not self._queued(path):
                self.waiting[path] = WaitingFile(None, self.clock(), self.clock())
                if len(self.arrived) < HANDLED_MEMORY:
                    self.arrived.setdefault(path, self.clock())
            try:
                path = self.events.get_nowait()
            except queue.Empty:
                return

    def _queued(self, path: Path) -> bool:
        return path in self.to_move or any(path in s.paths for s in self.studies.values())

    def _check_files(self) -> None:
        """Move quiet, whole files from ``waiting`` into their studies. Files already handled with
        this identity (restarts, files left in place) are dropped without being read."""
        now = self.clock()
        quiet: list[tuple[Path, WaitingFile, FileIdentity, int]] = []
        for path, w in list(self.waiting.items()):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                del self.waiting[path]  # renamed or removed by its writer
                self.arrived.pop(path, None)
                continue
            ident = FileIdentity.of(st)
            if self.handled.get(path) == ident:
                del self.waiting[path]
                self.arrived.pop(path, None)
                continue
            if not stat.S_ISREG(st.st_mode):
                quiet.append((path, w, ident, st.st_mode))  # never read: the pipeline records why
                continue
            if ident != w.identity:
                w.identity, w.changed_at = ident, now
                continue
            if now - w.changed_at < self.cfg.file_quiet_seconds:
                continue
            if w.checked == ident:
                if not self._timed_out(path, ident):
                    continue
            quiet.append((path, w, ident, st.st_mode))
        if not quiet:
            return
        known = self.store.known_paths([(str(p), i) for p, _, i, _ in quiet])
        for path, w, ident, mode in quiet:
            if str(path) in known:  # handled before (a restart, or left in place): moved, never read
                del self.waiting[path]
                k = known[str(path)]
                self.to_move[path] = FileOutcome(k.sha256, k.status, k.reason, k.stage,
                                                 identity=(ident.inode, ident.size, ident.mtime_ns))
                continue
            data = b""
            if stat.S_ISREG(mode):
                try:
                    _, data, _ = read_regular(path, self.settings.quality.max_file_bytes)
                except FileVanished:
                    del self.waiting[path]
                    self.arrived.pop(path, None)
                    continue
                except FileChanged:
                    w.identity, w.changed_at = None, now
                    continue
                except (NotRegularFile, FileTooLarge, OSError):
                    data = b""  # taken as is: the pipeline records the reason
                else:
                    if (ident.size == 0 or not is_complete(data, self.settings.quality)) and not self._timed_out(
                            path, ident):
                        w.checked = ident
                        continue  # still being written: wait, never fail it for that
            if w.checked is not None:
                self.store.forget_incomplete([str(path)])
            del self.waiting[path]
            study = self.studies.setdefault(study_key_of(path, data, self.drop), PendingStudy())
            study.paths.append(path)
            study.last_arrival = now

    def _timed_out(self, path: Path, ident: FileIdentity) -> bool:
        """Has this file been incomplete and unchanged for ``incomplete_timeout_seconds``? The
        start of that time is kept in the database, so restarts do not reset it."""
        since = self.store.incomplete_since(str(path), ident.size, ident.mtime_ns)
        return (utcnow() - since).total_seconds() >= self.cfg.incomplete_timeout_seconds

    def _ready_batch(self) -> list[Path]:
        now = self.clock()
        ready = [k for k, s in self.studies.items() if now - s.last_arrival >= self.cfg.study_quiet_seconds]
        if not ready:
            return []
        n_ready = sum(len(self.studies[k].paths) for k in ready)
        oldest = min(self.studies[k].last_arrival for k in ready) + self.cfg.study_quiet_seconds
        if n_ready < self.settings.batch_size and now - oldest < self.cfg.batch_wait_seconds and not self.stop.requested:
            return []  # a little longer: more studies may fill the batch
        paths: list[Path] = []
        for key in sorted(ready, key=lambda k: self.studies[k].last_arrival):
            if paths and len(paths) + len(self.studies[key].paths) > self.settings.batch_size:
                break
            paths += self.studies.pop(key).paths
        return paths

    def _process(self, paths: list[Path]) -> None:
        log.info("scoring a batch of %d files", len(paths))
        start = time.perf_counter()
        try:
            summary = self.scorer.score_paths(self.drop, paths, command="watch")
        except Exception as exc:
            self._requeue(paths)
            raise exc
        metrics.BATCH_SECONDS.observe(time.perf_counter() - start)
        if summary.scored:
            self.last_scored_at = utcnow()
        self._clear_fault()
        log.info("batch of %d files: %d scored, %d skipped, %d failed, %d unchanged, %d deferred",
                 len(paths), summary.scored, sum(summary.skipped.values()), sum(summary.failed.values()),
                 summary.unchanged + sum(summary.earlier.values()), sum(summary.deferred.values()))
        self._dispose(summary)

    def _requeue(self, paths) -> None:
        """Put files back to wait (a fault stopped their batch, or they changed, or another process
        held them): they go round the quiet period and completeness check again."""
        now = self.clock()
        for path in paths:
            self.waiting.setdefault(path, WaitingFile(None, now, self.arrived.get(path, now)))

    def _done(self, path: Path) -> None:
        """A file has its result stored and is where it belongs: the end-to-end time."""
        first = self.arrived.pop(path, None)
        if first is not None:
            metrics.END_TO_END.observe(self.clock() - first)

    def _dispose(self, summary: RunSummary) -> None:
        """Archive or leave scored/skipped inputs; quarantine failed ones with an error file."""
        for path, outcome in summary.files.items():
            if outcome.status == "vanished":
                continue
            if outcome.status == "deferred":
                self._requeue([path])
                continue
            self.to_move[path] = outcome
        self._retry_moves()

    def _remember(self, path: Path, ident: FileIdentity) -> None:
        if len(self.handled) >= HANDLED_MEMORY:
            self.handled.clear()  # memory stays flat; the file records in the database still know them
        self.handled[path] = ident

    def _retry_moves(self) -> None:
        archive, quarantine = self._dir(self.cfg.archive_dir), self._dir(self.cfg.quarantine_dir)
        moves: list[tuple[str, str]] = []
        try:
            for path, outcome in list(self.to_move.items()):
                failed = outcome.status in ("failed", "failed earlier")
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    del self.to_move[path]
                    continue
                ident = FileIdentity.of(st)
                if not stat.S_ISREG(st.st_mode):  # symlinks, FIFOs, devices: left untouched
                    self._remember(path, ident)
                    del self.to_move[path]
                    self._done(path)
                    continue
                if outcome.identity is not None and outcome.identity != (ident.inode, ident.size, ident.mtime_ns):
                    del self.to_move[path]  # changed since it was read: read it again
                    self._requeue([path])
                    continue
                target_dir = quarantine if failed else archive
                if target_dir is None:
                    self._remember(path, ident)
                    del self.to_move[path]
                    self._done(path)
                    continue
                rel = Path(os.path.abspath(path)).relative_to(self.drop)
                try:
                    target = move_into(path, target_dir, rel)
                except FileNotFoundError:
                    if os.path.lexists(path):
                        raise  # the target folder's file system is the problem
                    del self.to_move[path]  # another watcher of this folder moved it first
                    continue
                del self.to_move[path]
                self._done(path)
                moves.append((str(path), str(target)))
                if failed:
                    self._error_note(target, rel, path, outcome)
        finally:
            if moves:
                self.store.record_moves(moves)

    def _error_note(self, target: Path, rel: Path, path: Path, outcome: FileOutcome) -> None:
        error = {
            "file": str(rel),
            "original_path": str(path),
            "status": "failed",
            "stage": outcome.stage,
            "reason": outcome.reason,
            "traceback_digest": outcome.detail,
            "sha256": outcome.sha256,
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write(target.with_name(target.name + ".error.json"), json.dumps(error, indent=2) + "\n")
        log.warning("%s quarantined: %s", safe_text(rel), safe_text(outcome.reason))

    # faults ----------------------------------------------------------------
    def _set_fault(self, exc: BaseException) -> None:
        what = describe_fault(exc)
        metrics.FAULTS.labels("database" if what.startswith("database") else
                              "filesystem" if isinstance(exc, OSError) else "other").inc()
        now = self.clock()
        if self.fault is None or self.fault.what != what:
            since = self.fault.since if self.fault else utcnow()
            self.fault = Fault(what, since, self.fault.attempts if self.fault else 0)
        self.fault.attempts += 1
        delay = min(self.cfg.retry_max_seconds, 2.0 ** (self.fault.attempts - 1))
        self.fault.retry_at = now + delay
        log.warning("fault: %s; retrying in %.0f s (attempt %d)", safe_text(what), delay, self.fault.attempts)

    def _clear_fault(self) -> None:
        if self.fault is not None:
            log.warning("fault cleared after %d attempts: %s", self.fault.attempts, safe_text(self.fault.what))
            self.fault = None
            self._last_heartbeat = -1e9  # tell status at once

    def _release_claims(self) -> None:
        try:
            self.store.release_all(self.scorer.owner)
        except Exception:  # noqa: BLE001 - they expire anyway
            log.debug("could not release claims", exc_info=True)

    # heartbeat ---------------------------------------------------------------
    def _heartbeat(self, state: str = "running", force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_heartbeat < self.cfg.heartbeat_seconds:
            return
        self._last_heartbeat = now
        waited = [now - w.first_seen for w in self.waiting.values()]
        waited += [now - s.last_arrival for s in self.studies.values()]
        record = dict(pid=os.getpid(), host=self.host, state=state, started_at=self.started_at,
                      oldest_waiting_s=round(max(waited, default=0.0), 1),
                      files_waiting=len(self.waiting) + len(self.to_move),
                      studies_pending=len(self.studies), last_scored_at=self.last_scored_at,
                      fault=self.fault.what if self.fault else "", fault_since=self.fault.since if self.fault else None)
        metrics.WAITING.set(record["files_waiting"])
        metrics.PENDING.set(record["studies_pending"])
        metrics.OLDEST.set(record["oldest_waiting_s"])
        metrics.FAULT_ACTIVE.set(1 if self.fault else 0)
        metrics.beat()
        metrics.disk_free({k: v for k, v in (("drop", self.drop), ("reports", self.settings.reports_dir),
                                             ("archive", self._dir(self.cfg.archive_dir))) if v is not None})
        try:
            self.store.heartbeat(self.name, **record)
            self.store.renew_claims(self.scorer.owner, CLAIM_TTL_SECONDS)
        except Exception as exc:  # noqa: BLE001 - a missed heartbeat must not stop the daemon
            log.debug("heartbeat not written to the database: %s", exc)
        self._write_status_file(record)

    def _write_status_file(self, record: dict) -> None:
        if self.status_file is None:
            return
        data = {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in record.items()}
        data.update(name=self.name, heartbeat_at=utcnow().isoformat())
        try:
            atomic_write(self.status_file, json.dumps(data) + "\n")
        except OSError as exc:
            log.debug("status file %s not written: %s", self.status_file, exc)
