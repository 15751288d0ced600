"""Walk a folder tree, read regular files safely, identify them by content, move them atomically.

Only regular files are ever read: every path is ``lstat``-ed, opened with ``O_NOFOLLOW`` and
``O_NONBLOCK`` (a FIFO swapped in after the lstat cannot block the open) and checked with
``S_ISREG`` on the opened descriptor. The file's identity (device, inode, size, mtime) is taken
before and after the read; a file that changed meanwhile raises FileChanged (read it again
later), one that disappeared raises FileVanished (not a failure).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from batchcxr.domain import FileKind, SourceFile
from batchcxr.errors import FileChanged, FileTooLarge, FileVanished, NotRegularFile

log = logging.getLogger(__name__)

JPEG_SOI = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
READ_CHUNK = 1 << 20


def sniff(data: bytes) -> FileKind:
    """What a file is by its first bytes: DICOM preamble, JPEG SOI or PNG signature.

    A DICOM file without the 128-byte preamble (raw data set) is OTHER here;
    ``normalize`` tries to parse OTHER files as DICOM before giving up.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        return FileKind.DICOM
    if data.startswith(JPEG_SOI):
        return FileKind.JPEG
    if data.startswith(PNG_SIGNATURE):
        return FileKind.PNG
    return FileKind.OTHER


@dataclass(frozen=True)
class FileIdentity:
    """What tells one version of a file from another without reading it."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def file_type(mode: int) -> str:
    """A reader's name for what a non-regular file is."""
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    if stat.S_ISDIR(mode):
        return "folder"
    return "not a regular file"


def identity(path: Path) -> FileIdentity:
    """The identity of a regular file at ``path`` (never following a symlink).

    Raises
    ------
    FileVanished
        Nothing is there any more.
    NotRegularFile
        A symlink, FIFO, device, socket or folder.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError as exc:
        raise FileVanished(path, "file no longer there") from exc
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(path, f"{file_type(st.st_mode)}: not read (only regular files are)")
    return FileIdentity.of(st)


def walk(root: Path, ignore: Sequence[str] = ()) -> Iterator[Path]:
    """Every entry under root that is not a folder (or root itself), sorted, skipping hidden names
    and names matching ``ignore`` (shell patterns, e.g. ``README*``). Symbolic links (to files or
    folders), FIFOs, sockets and devices are yielded too, so a run can record why it skipped them;
    links to folders are never followed."""
    root = Path(root)
    try:
        st = os.lstat(root)
    except OSError as exc:
        log.warning("%s: %s", root, exc.strerror or exc)
        return
    if not stat.S_ISDIR(st.st_mode):
        yield root
        return
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            log.warning("%s: %s", folder, exc.strerror or exc)
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith(".") or any(fnmatch.fnmatch(entry.name, p) for p in ignore):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                subfolders.append(Path(entry.path))
            else:
                yield Path(entry.path)
        stack.extend(reversed(subfolders))


def read_regular(path: Path, max_bytes: int) -> tuple[SourceFile, bytes, FileIdentity]:
    """Read a whole regular file once: its kind, hash, bytes and identity.

    Raises
    ------
    FileVanished, NotRegularFile, FileChanged, FileTooLarge
        See the module docstring; each carries the reason a run records.
    OSError
        Any other read error (permissions, I/O errors).
    """
    before = identity(path)
    if before.size > max_bytes:
        raise FileTooLarge(path, f"file too large ({before.size:,} bytes > max_file_bytes {max_bytes:,}); not read")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise FileVanished(path, "file no longer there") from exc
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: replaced by a symlink after the lstat
            raise NotRegularFile(path, "symbolic link: not read (only regular files are)") from exc
        raise
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise NotRegularFile(path, f"{file_type(opened.st_mode)}: not read (only regular files are)")
        if FileIdentity.of(opened) != before:
            raise FileChanged(path, "changed while being opened")
        chunks, total = [], 0
        chunk_size = max(READ_CHUNK, before.size + 1)  # the whole file in one read: no join copy
        while True:
            chunk = os.read(fd, min(chunk_size, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise FileTooLarge(path, f"file grew past max_file_bytes ({max_bytes:,}); not read")
        after = FileIdentity.of(os.fstat(fd))
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if after != before or len(data) != before.size:
        raise FileChanged(path, "changed while being read")
    source = SourceFile(path, sniff(data), hashlib.sha256(data).hexdigest(), len(data), before.device, before.inode,
                        before.mtime_ns)
    return source, data, before


def read_source(path: Path, max_bytes: int = 1 << 40) -> tuple[SourceFile, bytes]:
    """``read_regular`` without the identity."""
    source, data, _ = read_regular(path, max_bytes)
    return source, data


def move_into(path: Path, dest_dir: Path, rel: Path) -> Path:
    """Move ``path`` to ``dest_dir/rel`` with one atomic rename, never overwriting.

    An existing file of that name gets a numbered sibling (``name.1.dcm``): input is never lost.
    ``dest_dir`` must be on the same file system as ``path``.
    """
    target = dest_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = target, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = target.with_name(f"{target.stem}.{n}{target.suffix}")
    os.rename(path, candidate)
    return candidate
