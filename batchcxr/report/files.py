"""Files in the reports folder: private folders, atomic writes, clean-up of what a crashed writer
left. Standard library only: the decode workers write display images with it."""

from __future__ import annotations

import os
from pathlib import Path

TMP_DIR = ".tmp"
"""Temporary files of atomic writes in the reports folder live here (one place to clean up)."""


def private_dir(path: Path) -> None:
    """Create a folder (and its parents) readable by its owner only: report files hold PHI."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def atomic_write(path: Path, data: bytes | str, tmp_dir: Path | None = None) -> None:
    """Write via a temp file and rename, so no reader sees a half-written file. The file is
    created 0600 (owner only). ``tmp_dir`` (same file system) holds the temp file; default: a
    dot-name beside ``path``."""
    folder = tmp_dir or path.parent
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    raw = data.encode() if isinstance(data, str) else data
    for attempt in (1, 2):
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            break
        except FileNotFoundError:  # first file in a new folder (one syscall less for all the others)
            if attempt == 2:
                raise
            private_dir(folder)
            private_dir(path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        try:
            os.replace(tmp, path)
        except FileNotFoundError:
            private_dir(path.parent)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temp(folder: Path, alive) -> int:
    """Delete temp files of atomic writes left in ``folder`` by processes that are gone
    (``alive(pid)`` false); return how many."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        try:
            pid = int(name.rsplit(".", 2)[-2])
        except (ValueError, IndexError):
            continue
        if not alive(pid):
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed
