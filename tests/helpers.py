"""Helpers for tests that run the real command line and wait on observable events (never a fixed
sleep for readiness)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAST = dict(file_quiet_seconds=0.3, study_quiet_seconds=0.6, batch_wait_seconds=0.2, rescan_seconds=1.0,
            heartbeat_seconds=0.3, poll_seconds=0.2, retry_max_seconds=2.0)


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(interval)


def write_config(tmp_path: Path, *, db_url: str | None = None, top: dict | None = None, **watch) -> Path:
    """A TOML config with everything under tmp_path and the fast watcher timings."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        return json.dumps(str(v))

    settings = {"db_url": db_url or f"sqlite:///{tmp_path / 'r.sqlite'}", "reports_dir": tmp_path / "reports",
                "lock_file": tmp_path / "score.lock", "batch_size": 4, **(top or {})}
    watch = {"archive_dir": tmp_path / "archive", "quarantine_dir": tmp_path / "quarantine", **FAST, **watch}
    lines = ["[batchcxr]", *(f"{k} = {value(v)}" for k, v in settings.items()),
             "[batchcxr.watch]", *(f"{k} = {value(v)}" for k, v in watch.items())]
    cfg = tmp_path / "batchcxr.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchcxr.cli", *args], capture_output=True, text=True,
                          timeout=kwargs.pop("timeout", 300), **kwargs)


_LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_the_tests() -> None:
    """In a daemon started by a test, between fork and exec: SIGKILL when the test run ends, so a
    killed run (a timeout, ^C) leaves no daemon watching a deleted folder."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def daemon(cfg: Path, drop: Path, *extra: str, log: Path | None = None) -> subprocess.Popen:
    """`batchcxr watch` in a subprocess; stderr to ``log`` (a file, so it never blocks) if given."""
    err = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "batchcxr.cli", "watch", str(drop), "--config", str(cfg), *extra],
                            stdout=subprocess.DEVNULL, stderr=err, text=True, preexec_fn=_die_with_the_tests)


def status(cfg: Path) -> dict:
    out = cli("status", "--config", str(cfg), "--json", "--stale-after", "10")
    report = json.loads(out.stdout)
    report["returncode"] = out.returncode
    return report


def handles_sigterm(pid: int) -> bool:
    """Has the process installed a handler for SIGTERM (its SigCgt mask in /proc)?"""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def mount_or_skip(*args: str) -> None:
    """Run mount (or umount) as the tests need it; fail in CI, skip elsewhere when refused."""
    from tests.conftest import _missing

    out = subprocess.run(list(args), capture_output=True, text=True)
    if out.returncode != 0:
        _missing(f"`{' '.join(args)}` refused ({out.stderr.strip()}): this test needs root and mount")
