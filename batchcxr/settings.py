"""One typed settings object, built once at the edge and passed down.

Sources, later ones win: defaults < TOML config file (table ``[batchcxr]``,
sub-table ``[batchcxr.quality]``) < environment (``BATCHCXR_<FIELD>``) <
command-line options. Sub-tables ``[batchcxr.watch]`` and ``[batchcxr.web]`` hold the daemon's and the review app's settings.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from batchcxr.errors import ConfigError
from batchcxr.paths import MODELS_DIR

SECONDARY_CAPTURE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    }
)


@dataclass(frozen=True)
class QualitySettings:
    """The quality gate run before scoring; a failed check marks the image "skipped"."""

    modalities: tuple[str, ...] = ("CR", "DX")
    """DICOM Modality values scored as chest radiographs."""
    accept_secondary_capture: bool = True
    """Score DICOM Secondary Capture images whatever their Modality."""
    lateral_views: tuple[str, ...] = ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD")
    """ViewPosition values skipped as lateral views."""
    min_size: int = 64
    """Images with fewer rows or columns are skipped."""
    max_pixels: int = 50_000_000
    """Refuse (fail) images whose declared rows x columns (x frames) exceed this, before decoding."""
    max_decoded_bytes: int = 200_000_000
    """Refuse (fail) images whose full-size decoded frame would exceed this many bytes."""
    max_file_bytes: int = 256 * 1024 * 1024
    """Refuse (fail) files larger than this before reading them (and deflated data sets that
    inflate to more)."""
    allow_multiframe: bool = False
    require_chest: bool = True
    """Skip images that do not look like a frontal chest radiograph: colour pictures, and images
    where the lung segmenter finds no plausible pair of lung fields (normalize.lungfield)."""
    max_colourfulness: float = 12.0
    """Colour images more colourful than this (Hasler-Suesstrunk, 0..255 scale; grey is 0, a
    colour photo 20-100) are skipped as not radiographs, when require_chest is on."""


@dataclass(frozen=True)
class WatchSettings:
    """The drop-folder daemon (`batchcxr watch`)."""

    archive_dir: str = ""
    """Where scored and skipped inputs are moved; empty: leave them in place."""
    quarantine_dir: str = "quarantine"
    """Where failed inputs go, each with <name>.error.json beside it (relative paths: under the drop folder's parent)."""
    polling: bool = False
    """Poll the folder instead of inotify (network shares: CIFS/NFS send no events)."""
    poll_seconds: float = 2.0
    rescan_seconds: float = 30.0
    """Walk the whole drop folder this often, to find files whose events were missed."""
    file_quiet_seconds: float = 2.0
    """A file must keep its size and mtime this long before it is read."""
    study_quiet_seconds: float = 5.0
    """A study is scored once no new file of it has arrived for this long."""
    batch_wait_seconds: float = 1.0
    """Wait this long for more ready studies to fill a batch."""
    incomplete_timeout_seconds: float = 900.0
    """A file that stays incomplete (unchanged) this long is taken anyway, and fails as truncated."""
    heartbeat_seconds: float = 5.0
    stop_timeout_seconds: float = 60.0
    """On SIGTERM/SIGINT: finish the batch in hand, then exit; a second signal exits at once."""
    retry_max_seconds: float = 60.0
    """While a volume or the database is at fault (disk full, locked, unreachable, not writable),
    retry after 1, 2, 4 ... seconds, at most this long apart, until the fault clears."""
    metrics_port: int = 0
    """Serve Prometheus metrics on 127.0.0.1:PORT/metrics (0: off)."""
    status_file: str = ""
    """A JSON copy of the heartbeat for `batchcxr status`, readable when the database is not
    (relative paths: under the drop folder's parent); empty: beside a SQLite database file."""


@dataclass(frozen=True)
class WebSettings:
    """The review app (`batchcxr serve`)."""

    host: str = "127.0.0.1"
    port: int = 8080
    users: dict = field(default_factory=dict)
    """Reviewer name -> password hash (make one with `batchcxr hash-password`)."""
    session_minutes: int = 30
    """Idle sessions expire after this many minutes."""
    secret_key: str = ""
    """Signs session cookies (at least 32 bytes); empty: a random key per start (everyone logs in again
    after a restart)."""
    session_max_hours: float = 12.0
    """A session ends this long after login, however active (idle sessions end after session_minutes)."""
    page_size: int = 50
    tls_cert: str = ""
    """PEM certificate (chain) to serve HTTPS directly; with tls_key."""
    tls_key: str = ""
    behind_tls_proxy: bool = False
    """A TLS-terminating proxy is in front: cookies are Secure and HSTS is sent (needed to bind to a
    non-loopback address without tls_cert/tls_key)."""
    login_attempts: int = 5
    """Failed logins (per user name and per client address) before each further try must wait."""
    lockout_max_seconds: float = 900.0
    """The wait after repeated failures doubles up to this."""
    threads: int = 8
    metrics_token: str = ""
    """Bearer token that Prometheus sends to read /metrics (empty: /metrics is off)."""


@dataclass(frozen=True)
class Destination:
    """Where results go back to (`[batchcxr.dicom.destinations.NAME]`)."""

    kind: str = "dimse"
    """dimse (C-STORE) or stow (DICOMweb STOW-RS)."""
    ae_title: str = ""
    host: str = "127.0.0.1"
    port: int = 104
    url: str = ""
    """DICOMweb base URL (kind stow), e.g. http://pacs:8042/dicom-web."""
    objects: tuple[str, ...] = ("sr", "sc")
    """What to send: sr (the TID 1500 report), sc (a Grad-CAM secondary capture per image and
    model), gsps (the Grad-CAM contour as a presentation state instead of sc)."""


@dataclass(frozen=True)
class DicomSettings:
    """DICOM networking (`[batchcxr.dicom]`): receive (listen), pull, send results back."""

    ae_title: str = "BATCHCXR"
    host: str = "127.0.0.1"
    """Address the C-STORE SCP binds."""
    port: int = 11112
    allowed_calling: tuple[str, ...] = ()
    """Calling AE titles allowed to associate; all others are rejected at association (listen
    refuses to start while this is empty)."""
    incoming_dir: str = ""
    """Where received instances are written (temp name, then renamed); empty: the drop folder
    when the watcher runs the listener (listen_in_watch)."""
    listen_in_watch: bool = False
    """`batchcxr watch` runs the C-STORE SCP in-process, writing into its drop folder."""
    tls_cert: str = ""
    """PEM certificate and key for DICOM TLS (both, or neither); tls_ca: accept only clients with
    a certificate signed by it."""
    tls_key: str = ""
    tls_ca: str = ""
    metrics_port: int = 0
    """Prometheus metrics of `batchcxr listen` on 127.0.0.1 (0: off)."""
    pacs_ae: str = ""
    """The PACS to pull from (C-FIND, C-MOVE to ae_title)."""
    pacs_host: str = "127.0.0.1"
    pacs_port: int = 104
    pull_via: str = "dimse"
    """dimse (C-FIND + C-MOVE) or dicomweb (QIDO-RS + WADO-RS at dicomweb_url)."""
    dicomweb_url: str = ""
    destinations: dict = field(default_factory=dict)
    """NAME -> Destination: where each scored DICOM study's results are sent."""
    uid_root: str = "1.2.826.0.1.3680043.8.498."
    """Prefix of the UIDs of the objects sent (derived from the source instance and model version)."""
    send_retry_max_seconds: float = 300.0
    """A destination that is down is retried after 10, 20, 40 ... s, at most this long apart."""


@dataclass(frozen=True)
class Settings:
    """Everything `batchcxr score` needs."""

    db_url: str = "sqlite:///batchcxr.sqlite"
    """SQLAlchemy URL or a plain file path (taken as SQLite)."""
    reports_dir: Path = Path("batchcxr-reports")
    models: tuple[Path, ...] = (MODELS_DIR / "cnn", MODELS_DIR / "mobilenetv2")
    batch_size: int = 32
    display_size: int = 512
    """Longest side of the images shown in reports, in pixels."""
    overlay_alpha: float = 0.45
    quality: QualitySettings = field(default_factory=QualitySettings)
    watch: WatchSettings = field(default_factory=WatchSettings)
    web: WebSettings = field(default_factory=WebSettings)
    dicom: DicomSettings = field(default_factory=DicomSettings)
    outbox_dir: Path = Path("batchcxr-outbox")
    """DICOM results waiting to be sent (the outbox table names each file)."""
    scheduler: str = ""
    """Dask: tcp://HOST:8786 (a running dask scheduler) or local:N (a LocalCluster of N workers) runs
    reading, decoding and both models on Dask workers; empty: in this process (Dask is not imported)."""
    dask_tasks_in_flight: int = 0
    """Tasks (of 8 files) in flight at once; 0: 3 per worker thread. Bounds memory on client and workers."""
    dask_workers_write: bool = False
    """Dask workers write the display JPEGs, Grad-CAM layers and rows of what they score themselves
    (the client records rejections and renders the reports). Needs a server database (PostgreSQL)
    and a reports folder every worker sees at the same path."""
    decode_workers: int = 1
    """Processes that read and decode files while the main process runs the models (0: none)."""
    infer_threads: int = 0
    """Threads that run the models at once, each on its share of a batch (0: one per core)."""
    model_threads: int = 0
    """ONNX Runtime threads inside each model run (0: the cores shared among the infer threads,
    at least one)."""
    lung_model: Path = MODELS_DIR / "lungs"
    """The lung-field segmenter (quality gate, lung contracts of the classifiers, report outlines)."""
    lock_file: Path = Path("batchcxr-score.lock")
    """`batchcxr score --since` (the nightly job) holds this lock so two runs never overlap."""
    ignore: tuple[str, ...] = ("README*", "*.md", "Thumbs.db", "desktop.ini")
    """File names never looked at (shell patterns): notes that travel with exported folders."""
    db_busy_timeout_seconds: float = 5.0
    """SQLite: how long a write waits for another process's lock before it counts as a fault (the
    watcher then retries with back-off). Signals wait for the end of such a wait, so keep it short."""

    @property
    def sqlalchemy_url(self) -> str:
        if "://" in self.db_url:
            return self.db_url
        return f"sqlite:///{Path(self.db_url).expanduser().resolve()}"


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Convert a config or environment value to the type of the field's default."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            kind = type(default[0]) if default else str
            return tuple(kind(v.strip()) if isinstance(v, str) else kind(v) for v in items if str(v).strip())
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise TypeError("expected a table")
            return {str(k): str(v) for k, v in value.items()}
        if isinstance(default, Path):
            return Path(value).expanduser()
        return type(default)(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: cannot use {value!r} ({exc})") from exc


def _merge(obj: Any, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in known:
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(known))})")
        current = getattr(obj, key)
        if key == "models":
            changes[key] = tuple(Path(v).expanduser() for v in (value.split(",") if isinstance(value, str) else value))
        elif key == "lung_model":
            changes[key] = Path(value).expanduser()
        elif key == "destinations":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise ConfigError(f"{where}: destinations must be tables [batchcxr.dicom.destinations.NAME]")
            changes[key] = {name: _merge(Destination(), v, f"{where} [destinations.{name}]") for name, v in value.items()}
        elif isinstance(current, (QualitySettings, WatchSettings, WebSettings, DicomSettings)):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key} must be a table")
            changes[key] = _merge(current, value, f"{where} [{key}]")
        else:
            changes[key] = _coerce(key, value, current)
    return replace(obj, **changes)


def load_settings(
    config: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build Settings from defaults, a TOML file, the environment and overrides (None values ignored)."""
    settings = Settings()
    if config is not None:
        try:
            data = tomllib.loads(Path(config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{config}: {exc}") from exc
        settings = _merge(settings, data.get("batchcxr", {}), str(config))
    env = os.environ if environ is None else environ
    from_env = {
        f.name: env[f"BATCHCXR_{f.name.upper()}"]
        for f in fields(Settings)
        if f"BATCHCXR_{f.name.upper()}" in env and f.name not in ("quality", "watch", "web", "dicom")
    }
    settings = _merge(settings, from_env, "environment")
    settings = _merge(settings, {k: v for k, v in (overrides or {}).items() if v is not None}, "command line")
    if settings.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, found {settings.batch_size}")
    if settings.dask_workers_write and settings.scheduler and settings.sqlalchemy_url.startswith("sqlite"):
        raise ConfigError("dask_workers_write: Dask workers writing the store need a server database "
                          f"(PostgreSQL), not SQLite ({settings.db_url})")
    return settings
