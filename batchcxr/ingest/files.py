"""Walk a folder tree and identify files by their content, not their names."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from batchcxr.domain import FileKind, SourceFile

log = logging.getLogger(__name__)

JPEG_SOI = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


def walk(root: Path) -> Iterator[Path]:
    """Every regular file under root (or root itself), sorted, skipping hidden names."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: log.warning("%s", e)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                path = Path(dirpath) / name
                if path.is_file() and not path.is_symlink():
                    yield path


def read_source(path: Path) -> tuple[SourceFile, bytes]:
    """Read a whole file once: its kind, hash and bytes. Raises OSError if unreadable."""
    data = path.read_bytes()
    return SourceFile(path, sniff(data), hashlib.sha256(data).hexdigest(), len(data)), data


def move_into(path: Path, dest_dir: Path, rel: Path) -> Path:
    """Move ``path`` to ``dest_dir/rel`` with one atomic rename, never overwriting.

    An existing file of that name gets a numbered sibling (``name.1.dcm``): input is never lost.
    ``dest_dir`` must be on the same file system as ``path``.
    """
    target = dest_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = target, 0
    while candidate.exists():
        n += 1
        candidate = target.with_name(f"{target.stem}.{n}{target.suffix}")
    os.replace(path, candidate)
    return candidate
