"""watchdog glue: events from the drop folder become paths on a queue, nothing more."""

from __future__ import annotations

import queue
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from batchcxr.ingest.complete import is_temporary


class DropHandler(FileSystemEventHandler):
    """Puts the path of each created, written, closed or renamed-in file on a queue."""

    def __init__(self, paths: queue.Queue[Path]) -> None:
        self.paths = paths

    def _put(self, path: str | bytes) -> None:
        p = Path(path.decode() if isinstance(path, bytes) else path)
        if not is_temporary(p.name):
            self.paths.put(p)

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._put(event.src_path)

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._put(event.src_path)

    def on_closed(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._put(event.src_path)

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._put(event.dest_path)


def start_observer(folder: Path, paths: queue.Queue[Path], polling: bool, poll_seconds: float):
    """Start watching ``folder`` recursively; polling for network shares where inotify sees nothing."""
    observer = PollingObserver(timeout=poll_seconds) if polling else Observer()
    observer.schedule(DropHandler(paths), str(folder), recursive=True)
    observer.start()
    return observer
