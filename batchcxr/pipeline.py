"""The one module that composes the stages: ingest -> normalize -> infer -> store -> report.

`Scorer.score_paths` streams files in batches, so memory stays flat however large the folder
is. Before a file is read, its identity (path, device, inode, size, mtime) is looked up: a file
handled before is not read again. Each file then ends as scored, skipped or failed with its
reason, or - when that is not the file's fault - deferred (it vanished, changed while being
read, is still being written, or another process holds its claim). No exception from one file
stops the run; a fault of a volume or of the database does, and the caller (the watcher)
retries later.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import os
import socket
import stat
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from batchcxr import metrics
from batchcxr.domain import Deferred, FailStage, FileKind, ImageStatus, PreparedImage, Rejection, SourceFile, Stored
from batchcxr.errors import InputError, ModelLoadError
from batchcxr.infer.lungs import LungModel, load_lung_model
from batchcxr.infer.runtime import RUN_CHUNK, LoadingSession, ScoringModel, load_scoring_model
from batchcxr.ingest.files import FileIdentity, read_regular, walk
from batchcxr.normalize.contract import finish_batch
from batchcxr.normalize.lungfield import check_lungs
from batchcxr.prepare_stage import (  # noqa: F401 - also imported from here (distributed, worker, tests)
    Prepared, _digest, _init_decode_worker, _lstat_source, display_file, folder_key, prepare_file, prepare_files,
    start_decoders,
)
from batchcxr.report.overlay import (
    LAYER_SUFFIX,
    OUTLINE_SUFFIX,
    boxed_heatmap,
    encode_layer,
    heatmap_layer,
    lung_outline_svg,
)
from batchcxr.report.render import TMP_DIR, ReportWriter, atomic_write
from batchcxr.settings import Settings
from batchcxr.signals import Stop, process_alive
from batchcxr.store.repo import Known, ScoredImage, Store
from batchcxr.store.schema import utcnow

log = logging.getLogger(__name__)

TASK_FILES = 8
"""Files per decode-worker task."""
EARLIER = {"scored": "unchanged", "skipped": "skipped earlier", "failed": "failed earlier"}
"""The outcome reported for a file an earlier run handled, by what that run recorded."""


@dataclass(frozen=True)
class FileOutcome:
    """What became of one file in a run."""

    sha256: str
    status: str
    """scored, skipped, failed; unchanged (scored earlier), skipped earlier, failed earlier;
    deferred (not handled now: read it again later); vanished."""
    reason: str = ""
    stage: str = ""
    detail: str = ""
    identity: tuple[int, int, int] | None = None
    """(inode, size, mtime_ns) when the file was read or looked up: the watcher moves a file
    only if it is still that file."""


@dataclass
class RunSummary:
    run_id: int
    files: dict[Path, FileOutcome] = field(default_factory=dict)
    """Each file's outcome (kept only when the caller asks: the watcher does, `score` does not)."""
    scored: int = 0
    unchanged: int = 0
    skipped: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    earlier: Counter = field(default_factory=Counter)
    """(skipped earlier | failed earlier, reason) -> files."""
    deferred: Counter = field(default_factory=Counter)
    vanished: int = 0
    status: str = "running"
    seconds: float = 0.0
    stages: Counter = field(default_factory=Counter)
    """Seconds per stage: prepare (read + decode + normalize, summed over workers), infer,
    images (display JPEGs and Grad-CAM layers), store, report."""
    index_path: Path | None = None

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


def _read_ahead(path: Path) -> None:
    """Ask the kernel to start reading a file the workers will soon need (Linux; no-op elsewhere),
    so a cold disk read overlaps the decoding of the files before it. Regular files only."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # the worker will record why
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def write_layers(item: PreparedImage, outputs, lungs, reports_dir: Path, alpha: float) -> tuple[dict[str, str], str]:
    """One Grad-CAM layer per model and the lung outline into ``reports_dir`` (prepare_file wrote
    the display JPEG). Returns (overlay path per model, outline path), relative to reports_dir; a
    model that found no evidence for pneumonia anywhere (an empty map) gets no layer, and its
    report says so instead of showing a transparent one."""
    tmp = reports_dir / TMP_DIR
    shape = (item.image.rows, item.image.columns) if item.image.rows and item.image.columns else (1, 1)
    overlays = {}
    for o in outputs:
        if not o.heatmap.any():
            continue
        rel = f"images/{item.source.sha256[:24]}-{o.model_name}{LAYER_SUFFIX}"
        layer = heatmap_layer(boxed_heatmap(o.heatmap, o.box), shape, alpha)
        atomic_write(reports_dir / rel, encode_layer(layer), tmp)
        overlays[o.model_name] = rel
    boxes = {o.box for o in outputs if o.box != (0.0, 0.0, 1.0, 1.0)}
    rel = f"images/{item.source.sha256[:24]}-lungs{OUTLINE_SUFFIX}"
    atomic_write(reports_dir / rel, lung_outline_svg(lungs, shape, next(iter(boxes), None)), tmp)
    return overlays, rel


CRASHED = "the decoder crashed on this file (the process reading it died); not decoded"


def prepare_isolated(paths: list[Path], args: tuple, ctx) -> Iterator[Prepared]:
    """``prepare_file`` for each path, one at a time in a decode worker of its own, after a worker
    died: a file that kills its process again is recorded as failed (and kept) instead of taking
    the run with it, and the others are prepared as usual."""
    pool = None
    try:
        for path in paths:
            if pool is None:
                pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_init_decode_worker,
                                           initargs=(os.getpid(),))
            try:
                yield pool.submit(prepare_file, path, *args).result()
            except BrokenProcessPool:
                pool.shutdown(wait=True)
                pool = None
                log.error("%s: %s", path, CRASHED)
                try:
                    source = read_regular(path, args[1].max_file_bytes)[0]  # its hash: known as failed
                except (OSError, InputError):
                    source = _lstat_source(path)
                yield Prepared(source, Rejection(source, ImageStatus.FAILED, FailStage.DECODE, CRASHED), 0.0)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def infer_threads(settings: Settings) -> int:
    """Threads that run infer_batch at once, each on a share of the batch: the setting, or (0)
    one per core. Splitting the batch keeps every core busy for the whole batch; running the two
    models side by side leaves a core idle once the smaller model is done (benchmarks/run.py
    measures the three packings)."""
    return settings.infer_threads if settings.infer_threads > 0 else (os.cpu_count() or 1)


def model_threads(settings: Settings) -> int:
    """ONNX Runtime threads inside each model run: the setting, or (0) the cores shared among the
    infer threads; at least one."""
    if settings.model_threads > 0:
        return settings.model_threads
    return max(1, (os.cpu_count() or 1) // infer_threads(settings))


def infer_batch(models: list[ScoringModel], lungs: LungModel, batch: list[PreparedImage], require_chest: bool,
                pool: ThreadPoolExecutor | None = None):
    """The infer stage for one batch: segment the lungs, refuse what is not a frontal chest
    radiograph, put each model's input under its lung contract and run the models (side by side
    in ``pool`` when given). Returns (kept items, outputs per kept item, lung mask per kept item,
    rejections). Pure but for the models: the same function runs in the scorer and on Dask workers."""
    import numpy as np

    x = np.stack([p.model_input for p in batch])
    probs = lungs.probabilities(x)
    checks = [check_lungs(p) for p in probs]
    keep, rejected = [], []
    for k, (item, (_, check)) in enumerate(zip(batch, checks)):
        reason = check.reason() if require_chest else None
        if reason:
            rejected.append(Rejection(item.source, ImageStatus.SKIPPED, FailStage.QUALITY,
                                      f"not a frontal chest radiograph: {reason}", item.study, item.image))
        else:
            keep.append(k)
    if not keep:
        return [], [], [], rejected
    kept = [batch[k] for k in keep]
    x, probs, masks = x[keep], probs[keep], [checks[k][0] for k in keep]
    inputs = {}
    for mode in {m.lungs for m in models}:
        xm, boxes, _ = lungs.transform(x, mode, probs) if mode != "none" else (x, None, None)
        for eq in {m.equalize for m in models if m.lungs == mode}:
            inputs[mode, eq] = (finish_batch(xm, eq), boxes)
    run = lambda m: m.run_finished(*inputs[m.lungs, m.equalize])  # noqa: E731
    outs = list(pool.map(run, models)) if pool is not None else [run(m) for m in models]
    return kept, [list(o) for o in zip(*outs)], masks, rejected


def submit_split(models: list[ScoringModel], lungs: LungModel, batch: list[PreparedImage], require_chest: bool,
                 pool: ThreadPoolExecutor, parts: int) -> list[Future]:
    """``infer_batch`` on ``parts`` contiguous shares of the batch, each a task of ``pool`` (ONNX
    Runtime sessions run concurrently and free the GIL); ``gather_split`` joins them. A thread
    that finishes its share starts on whatever share is queued next - the next batch's, when
    the caller has submitted it - instead of idling until its partner's share is done."""
    size = -(-len(batch) // max(1, parts))
    return [pool.submit(_timed, infer_batch, models, lungs, batch[i : i + size], require_chest)
            for i in range(0, len(batch), size)]


def _timed(fn, *args):
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def gather_split(shares: list[Future]):
    """The answer of the shares ``submit_split`` made, as one ``infer_batch`` call's, in batch
    order, and the seconds of the slowest share. Re-raises a share's error."""
    kept, per_image, masks, rejected, seconds = [], [], [], [], 0.0
    for share in shares:
        (k, o, m, r), took = share.result()
        kept += k
        per_image += o
        masks += m
        rejected += r
        seconds = max(seconds, took)
    return (kept, per_image, masks, rejected), seconds


def infer_split(models: list[ScoringModel], lungs: LungModel, batch: list[PreparedImage], require_chest: bool,
                pool: ThreadPoolExecutor | None, parts: int):
    """``infer_batch`` on ``parts`` contiguous shares of the batch at once, one per thread of
    ``pool``. Same answer as one call, in batch order."""
    if pool is None or parts < 2 or len(batch) < 2:
        return infer_batch(models, lungs, batch, require_chest)
    return gather_split(submit_split(models, lungs, batch, require_chest, pool, parts))[0]


@dataclass
class InFlight:
    """A batch whose inference the infer threads are running (or will run next)."""

    batch: list[PreparedImage]
    shares: list[Future]


IN_FLIGHT = 2
"""Batches whose inference is submitted at once: the next batch's shares wait in the queue, so
no infer thread idles at a batch's end (benchmarks/run.py measures this packing too)."""


class Scorer:
    """Holds the loaded models and settings; scores folder trees into the Store."""

    def __init__(self, settings: Settings, store: Store, models: list[ScoringModel],
                 lungs: LungModel | None = None) -> None:
        if not models:
            raise ValueError("at least one model is needed")
        self.settings = settings
        self.store = store
        self.models = models
        self.lungs = lungs if lungs is not None else load_lung_model(settings.lung_model)
        """The lung segmenter: quality gate, the classifiers' lung contracts, report outlines."""
        for m in models:
            if m.lungs != "none" and m.lung_version and m.lung_version != self.lungs.version:
                raise ValueError(f"{m.name} was trained with lung segmenter {m.lung_version}, but "
                                 f"{settings.lung_model} is {self.lungs.version}")
        self.reports = ReportWriter(settings.reports_dir, settings.quality.lateral_views)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        """Who holds this process's claims (host:pid)."""
        from batchcxr.report.send import Outbox

        self.outbox = Outbox(settings, store)
        """DICOM results for the PACS (when destinations are configured)."""
        self._writer: ThreadPoolExecutor | None = None
        """Per run: the thread that writes a batch's images and rows while the next batch is scored."""
        self._writing = None
        self._infer: ThreadPoolExecutor | None = None
        """Per run: the infer threads, each running the models on its share of a batch."""
        self.suspects: set[str] = set()
        """Paths a process of this host held when it died (adopt_dead_claims): one of them may
        have killed it, so each is prepared in a decode worker of its own (prepare_isolated)."""

    @classmethod
    def from_settings(cls, settings: Settings, store: Store) -> Scorer:
        """The Scorer of ``settings``' models. Their cards and hashes are checked now; their ONNX
        Runtime sessions are made on a thread of their own (~0.1 s), so a run claims and reads its
        first files meanwhile: the first inference waits for them (``wait_for_models``)."""
        threads = model_threads(settings)
        loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchcxr-load")
        try:
            return cls(settings, store, [load_scoring_model(p, threads, loader) for p in settings.models],
                       load_lung_model(settings.lung_model, threads, loader))
        finally:
            loader.shutdown(wait=False)  # the sessions already submitted are still made

    def wait_for_models(self) -> None:
        """Wait until every model's session is made.

        Raises
        ------
        ModelLoadError
            ONNX Runtime could not open one of the graphs.
        """
        for session in [m.session for m in self.models] + [self.lungs.session]:
            if isinstance(session, LoadingSession):
                session.ready()

    def adopt_dead_claims(self) -> list[str]:
        """Take over the claims of this host's dead processes (a crash, kill -9, the OOM killer);
        their files become suspects. Returns their paths."""
        paths = self.store.release_dead_claims(socket.gethostname(), process_alive)
        self.suspects.update(paths)
        return paths

    @property
    def versions(self) -> list[str]:
        return [m.version for m in self.models]

    # stage helpers ---------------------------------------------------------
    def _prepare_here(self, paths: Iterable[Path], args: tuple) -> Iterator[Prepared]:
        """prepare_file in this process, but for suspects (adopt_dead_claims): those go to a decode
        worker of their own, so a file that crashes its decoder costs that file, not a crash loop."""
        for path in paths:
            if str(path) in self.suspects:
                yield from prepare_isolated([path], args, multiprocessing.get_context("spawn"))
                self.suspects.discard(str(path))
            else:
                yield prepare_file(path, *args)

    def _prepared_stream(self, root: Path, paths: Iterator[Path], incomplete_seconds: float,
                         decoders: ProcessPoolExecutor | None = None) -> Iterator[Prepared]:
        """prepare_file over paths, in order; in worker processes when configured and worth it
        (at least twice a batch to read): ``decoders`` (start_decoders) when given, else a new pool.
        The pool is shut down at the end."""
        args = (root, self.settings.quality, self.settings.display_size, self.settings.reports_dir,
                incomplete_seconds)
        size = self.settings.batch_size
        first = list(itertools.islice(paths, 2 * size))
        if self.settings.decode_workers < 1 or len(first) < 2 * size:
            if decoders is not None:
                decoders.shutdown(wait=False, cancel_futures=True)
            yield from self._prepare_here(itertools.chain(first, paths), args)
            return
        # a new pool's workers take ~0.35 s to start: the first batch is prepared here meanwhile; workers the
        # caller started early are ready, and this process then never imports the decoders (pydicom: ~0.3 s)
        head = first[:size] if decoders is None else []
        paths = itertools.chain(first[len(head):], paths)

        def tasks() -> Iterator[list[Path]]:
            while True:
                task = [p for _, p in zip(range(TASK_FILES), paths)]
                if not task:
                    return
                yield task

        task_iter = tasks()
        window = max(1, 4 * self.settings.batch_size // TASK_FILES)  # bounded look-ahead: memory stays flat
        ctx = multiprocessing.get_context("spawn")  # workers are our children: they die with us

        def new_pool() -> ProcessPoolExecutor:
            return start_decoders(self.settings.decode_workers)

        pool = decoders or new_pool()
        pending: deque[tuple[Future | None, list[Path]]] = deque()

        def submit_next() -> None:
            task = next(task_iter, None)
            if task is None:
                return
            for path in task:
                _read_ahead(path)
            try:
                pending.append((pool.submit(prepare_files, task, *args), task))
            except BrokenProcessPool:
                pending.append((None, task))  # a worker died since the last result: recovered below

        try:
            for _ in range(window):
                submit_next()
            yield from self._prepare_here(head, args)
            while pending:
                future, task = pending.popleft()
                try:
                    if future is None:
                        raise BrokenProcessPool("a decode worker died")
                    done = future.result()
                except BrokenProcessPool:
                    # a decoder ended its worker process (a native crash): which file did it is not known,
                    # so every file in flight is prepared again on its own, then the pool starts afresh
                    lost = task + [path for _, t in pending for path in t]
                    pending.clear()
                    pool.shutdown(wait=True, cancel_futures=True)
                    yield from prepare_isolated(lost, args, ctx)
                    pool = new_pool()
                    for _ in range(window):
                        submit_next()
                    continue
                submit_next()
                yield from done
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _start_batch(self, batch: list[PreparedImage]) -> InFlight:
        """Submit one batch's inference (segment the lungs, gate, both models) to the infer threads,
        unless a Dask worker did it already."""
        if batch and batch[0].inferred is not None:
            return InFlight(batch, [])
        return InFlight(batch, submit_split(self.models, self.lungs, batch, self.settings.quality.require_chest,
                                            self._infer, infer_threads(self.settings)))

    def _finish_batch(self, run_id: int, done: InFlight, summary: RunSummary) -> None:
        """Wait for a batch's inference, record what it refused, then hand its images and rows to the
        writer thread, so the next batches' inference overlaps this batch's images and rows."""
        batch = done.batch
        if not done.shares:
            kept = batch
            per_image = [item.inferred[0] for item in batch]
            masks = [item.inferred[1] for item in batch]
        else:
            try:
                (kept, per_image, masks, rejected), seconds = gather_split(done.shares)
            except ModelLoadError:
                raise  # no model to run: not these files' fault, and no batch after them can be scored
            except Exception as exc:  # noqa: BLE001
                log.exception("inference failed for a batch of %d", len(batch))
                rejections = [Rejection(p.source, ImageStatus.FAILED, FailStage.INFER, f"inference failed: {exc}",
                                        p.study, p.image, _digest(exc)) for p in batch]
                self._record_rejections(run_id, rejections, summary)
                return
            summary.stages["infer"] += seconds
            if rejected:
                self._record_rejections(run_id, rejected, summary)
        if not kept:
            return
        self._wait_for_writer()  # at most one batch waits to be written: memory stays flat
        self._writing = self._writer.submit(self._write_batch, run_id, kept, per_image, masks, summary)

    def _wait_for_writer(self) -> None:
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.result()  # re-raises a writer error here

    def _write_batch(self, run_id: int, batch: list[PreparedImage], per_image, masks, summary: RunSummary) -> None:
        """Overlays and JPEGs first, then the rows: the database never names a missing file."""
        scored = []
        t0 = time.perf_counter()
        for k, item in enumerate(batch):
            if item.display_jpeg is not None:  # prepared on a Dask worker
                rel = display_file(item.source.sha256)
                atomic_write(self.settings.reports_dir / rel, item.display_jpeg, self.reports.tmp)
                batch[k] = dataclasses.replace(item, display_jpeg=None, display_file=rel)
        for item, outputs, lungs in zip(batch, per_image, masks):
            overlays, outline = write_layers(item, outputs, lungs, self.settings.reports_dir,
                                             self.settings.overlay_alpha)
            scored.append(ScoredImage(item, list(outputs), item.display_file, overlays, outline))
        t1 = time.perf_counter()
        refused = self.store.record_scored(run_id, scored)
        summary.stages["images"] += t1 - t0
        summary.stages["store"] += time.perf_counter() - t1
        refused_paths = {r.item.prepared.source.path for r in refused}
        for item in batch:
            if item.source.path not in refused_paths:
                summary.scored += 1
                metrics.IMAGES.inc()
                self._note(summary, item.source.path, FileOutcome(item.source.sha256, ImageStatus.SCORED.value),
                           item.source)
        if refused:
            self._record_rejections(run_id, [
                Rejection(r.item.prepared.source, ImageStatus.FAILED, FailStage.STORE, r.reason, r.item.prepared.study,
                          r.item.prepared.image) for r in refused], summary)

    def _record_rejections(self, run_id: int, rejections: list[Rejection], summary: RunSummary) -> None:
        t0 = time.perf_counter()
        refused = {r.item.source.path: r.reason for r in self.store.record_rejections(run_id, rejections)}
        summary.stages["store"] += time.perf_counter() - t0
        for r in rejections:
            reason = r.reason + (f" ({refused[r.source.path]})" if r.source.path in refused else "")
            failed = r.status == ImageStatus.FAILED or r.source.path in refused
            self._note(summary, r.source.path, FileOutcome(r.source.sha256, "failed" if failed else r.status.value,
                                                           reason, r.stage.value, r.detail), r.source)
            (summary.failed if failed else summary.skipped)[reason] += 1
            log.debug("%s: %s (%s)", r.source.path, r.status.value, reason)

    def _note(self, summary: RunSummary, path: Path, outcome: FileOutcome, source: SourceFile | None = None) -> None:
        metrics.count_outcome(outcome.status, outcome.reason)
        if self._keep_files:
            if source is not None and source.inode:
                outcome = dataclasses.replace(outcome, identity=(source.inode, source.size, source.mtime_ns))
            summary.files[path] = outcome

    def _admit(self, paths: Iterable[Path], summary: RunSummary, rejections: list[Rejection],
               claimed: list[str], *, rescore: bool, retry_failed: bool) -> Iterator[Path]:
        """The paths that must be read, in order: files handled before with the same identity are
        reported from their records (never read), non-regular files are skipped with their
        reason, paths another process has claimed are deferred; the rest are claimed."""
        from batchcxr.ingest.files import file_type

        batch: list[Path] = []

        def flush() -> Iterator[Path]:
            found: list[tuple[Path, FileIdentity, int]] = []
            for path in batch:
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    summary.vanished += 1
                    self._note(summary, path, FileOutcome("", "vanished", "file no longer there"))
                    continue
                except OSError as exc:
                    rejections.append(Rejection(SourceFile(path, FileKind.OTHER, "", 0), ImageStatus.FAILED,
                                                FailStage.READ, f"unreadable: {exc.strerror or exc}"))
                    continue
                found.append((path, FileIdentity.of(st), st.st_mode))
            known = {} if rescore else self.store.known_paths([(str(p), i) for p, i, _ in found])
            done = self.store.already_done([k.sha256 for k in known.values() if k.status == "scored" and k.sha256],
                                           self.versions) if known else {}
            to_claim: list[Path] = []
            for path, ident, mode in found:
                k = known.get(str(path))
                if k is not None and not (k.status == "failed" and retry_failed) and (
                        k.status != "scored" or k.sha256 in done):
                    src = SourceFile(path, FileKind.OTHER, k.sha256, ident.size, ident.device, ident.inode, ident.mtime_ns)
                    self._earlier(summary, src, Known(k.status, k.reason, k.stage))
                elif not stat.S_ISREG(mode):
                    src = SourceFile(path, FileKind.OTHER, "", ident.size, ident.device, ident.inode, ident.mtime_ns)
                    rejections.append(Rejection(src, ImageStatus.SKIPPED, FailStage.READ,
                                                f"{file_type(mode)}: not read (only regular files are)"))
                else:
                    to_claim.append(path)
            held = self.store.claim([str(p) for p in to_claim], self.owner)
            others = self.store.claim_owners([str(p) for p in to_claim if str(p) not in held])
            for path in to_claim:
                if str(path) in held:
                    claimed.append(str(path))
                    yield path
                else:
                    reason = f"being handled by {others.get(str(path), 'another process')}"
                    summary.deferred[reason] += 1
                    self._note(summary, path, FileOutcome("", "deferred", reason))
            batch.clear()

        for path in paths:
            batch.append(path)
            if len(batch) >= self.settings.batch_size:
                yield from flush()
        yield from flush()

    def _earlier(self, summary: RunSummary, source: SourceFile, known: Known) -> None:
        status = EARLIER.get(known.status, "unchanged")
        if status == "unchanged":
            summary.unchanged += 1
        else:
            summary.earlier[status, known.reason] += 1
        self._note(summary, source.path, FileOutcome(source.sha256, status, known.reason, known.stage, known.detail),
                   source)

    # the run ------------------------------------------------------------------
    def score_paths(self, root: Path, paths: Iterable[Path], *, rescore: bool = False, retry_failed: bool = False,
                    command: str = "score", progress: Callable[[int], None] | None = None,
                    stop: Stop | None = None, keep_files: bool = True,
                    incomplete_seconds: float | None = None,
                    decoders: ProcessPoolExecutor | None = None) -> RunSummary:
        """Score the given files (found under root) as one run.

        ``decoders``: decode workers the caller started early (start_decoders); this run shuts
        them down.

        ``stop`` (set by a signal handler) ends the run after the batch in hand: the run row says
        ``interrupted`` and the files not reached are left for the next run. ``incomplete_seconds``
        defaults to the watcher's ``incomplete_timeout_seconds`` (see prepare_file).
        """
        start = time.monotonic()
        started_at = utcnow()
        paths = list(paths)
        self._keep_files = keep_files
        run_id = self.store.start_run(command, str(root), self.versions, host=socket.gethostname(), pid=os.getpid())
        summary = RunSummary(run_id)
        seen: set[str] = set()
        pending: list[PreparedImage] = []
        chunk: list[tuple[SourceFile, PreparedImage | Rejection]] = []
        early: list[Rejection] = []
        claimed: list[str] = []
        inflight: deque[InFlight] = deque()
        batch_size = self.settings.batch_size
        # infer threads with nothing to do (the run's start, or decoding behind) take a batch as soon as
        # each can have a full ONNX Runtime chunk, instead of idling until a whole batch is read
        idle_batch = min(batch_size, infer_threads(self.settings) * RUN_CHUNK)
        wait = self.settings.watch.incomplete_timeout_seconds if incomplete_seconds is None else incomplete_seconds

        def flush_chunk() -> None:
            done = {} if rescore else self.store.already_done(
                [s.sha256 for s, r in chunk if s.sha256 and not isinstance(r, Rejection)], self.versions)
            rejections = early[:]
            early.clear()
            for source, result in chunk:
                if source.sha256 and source.sha256 in done and not (retry_failed and done[source.sha256].status ==
                                                                    "failed"):
                    self._earlier(summary, source, done[source.sha256])
                    continue
                if source.sha256 and source.sha256 in seen:
                    summary.unchanged += 1
                    self._note(summary, source.path, FileOutcome(source.sha256, "unchanged"), source)
                    continue
                if source.sha256:
                    seen.add(source.sha256)
                (rejections if isinstance(result, Rejection) else pending).append(result)
            if rejections:
                self._record_rejections(run_id, rejections, summary)
            chunk.clear()

        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchcxr-writer")
        self._infer = ThreadPoolExecutor(max_workers=infer_threads(self.settings), thread_name_prefix="batchcxr-infer")
        self._writing = None
        admitted = self._admit(paths, summary, early, claimed, rescore=rescore, retry_failed=retry_failed)
        if self.settings.scheduler:  # read, decode and both models on Dask workers; rows and reports here
            from batchcxr.distributed import remote_stream

            stream = remote_stream(self, root, admitted, wait, run_id, rescore, retry_failed)
        else:
            stream = self._prepared_stream(root, admitted, wait, decoders)
        try:
            for prepared in stream:
                summary.stages["prepare"] += prepared.seconds
                if isinstance(prepared.result, Deferred):
                    self._defer(summary, prepared.result)
                elif isinstance(prepared.result, Stored):  # a Dask worker wrote it (dask_workers_write)
                    self._stored(run_id, summary, prepared.result, seen)
                else:
                    chunk.append((prepared.source, prepared.result))
                if progress:
                    progress(1)
                if len(chunk) >= batch_size or len(early) >= batch_size or (not inflight and len(chunk) >= idle_batch):
                    flush_chunk()
                while len(pending) >= batch_size or (not inflight and len(pending) >= idle_batch):
                    inflight.append(self._start_batch(pending[:batch_size]))
                    del pending[:batch_size]
                    if len(inflight) >= IN_FLIGHT:
                        self._finish_batch(run_id, inflight.popleft(), summary)
                if stop is not None and stop.requested:
                    break
            else:
                flush_chunk()
                if pending:
                    inflight.append(self._start_batch(pending))
            while inflight:  # the batches in hand, also after a stop
                self._finish_batch(run_id, inflight.popleft(), summary)
            self._wait_for_writer()
            summary.status = "interrupted" if stop is not None and stop.requested else "finished"
        except BaseException:
            summary.status = "interrupted"
            raise
        finally:
            if decoders is not None:
                decoders.shutdown(wait=False, cancel_futures=True)  # a Dask run, or no files to read
            self._writer.shutdown(wait=True)
            self._infer.shutdown(wait=True, cancel_futures=True)  # a stop or an error: the queued batch is not run
            summary.seconds = time.monotonic() - start
            self._finish(run_id, summary, claimed)
        t0 = time.perf_counter()
        if self.outbox.enabled and summary.scored:
            self.outbox.enqueue_since(started_at)  # before any send: recorded, then sent (watcher, batchcxr send)
        summary.index_path = self.reports.write_pending(self.store, run_id)
        summary.stages["report"] += time.perf_counter() - t0
        summary.seconds = time.monotonic() - start  # the run row holds the time before reports
        return summary

    def _stored(self, run_id: int, summary: RunSummary, done: Stored, seen: set[str]) -> None:
        """Count a file a Dask worker scored and wrote (or found scored by an earlier run)."""
        source = done.source
        if done.earlier_status:
            self._earlier(summary, source, Known(done.earlier_status, done.earlier_reason))
        elif source.sha256 in seen:  # the same content twice in this run: one set of rows
            summary.unchanged += 1
            self._note(summary, source.path, FileOutcome(source.sha256, "unchanged"), source)
        elif done.refused:
            seen.add(source.sha256)
            self._record_rejections(run_id, [Rejection(source, ImageStatus.FAILED, FailStage.STORE, done.refused,
                                                       done.study, done.image)], summary)
        else:
            seen.add(source.sha256)
            summary.scored += 1
            metrics.IMAGES.inc()
            self._note(summary, source.path, FileOutcome(source.sha256, ImageStatus.SCORED.value), source)

    def _defer(self, summary: RunSummary, d: Deferred) -> None:
        if d.vanished:
            summary.vanished += 1
            self._note(summary, d.source.path, FileOutcome("", "vanished", d.reason))
        else:
            summary.deferred[d.reason.split(":")[0]] += 1
            self._note(summary, d.source.path, FileOutcome(d.source.sha256, "deferred", d.reason), d.source)
        log.debug("%s: %s", d.source.path, d.reason)

    def _finish(self, run_id: int, summary: RunSummary, claimed: list[str]) -> None:
        """Release this run's claims and close its run row; best effort when the database is the
        fault (the next start marks a run left ``running`` as ``interrupted``)."""
        try:
            self.store.release(claimed, self.owner)
            self.store.finish_run(run_id, scored=summary.scored, skipped=sum(summary.skipped.values()),
                                  failed=sum(summary.failed.values()), unchanged=summary.unchanged,
                                  seconds=summary.seconds, status=summary.status)
        except Exception:  # noqa: BLE001 - do not hide the error that stopped the run
            log.warning("run #%d: could not record its end (database unavailable?)", run_id)
            if summary.status == "finished":
                raise

    def score_tree(self, root: Path, **kwargs) -> RunSummary:
        paths = list(walk(root, self.settings.ignore))
        return self.score_paths(root, paths, **kwargs)
