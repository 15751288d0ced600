"""`batchcxr listen`: a C-STORE SCP (pynetdicom) that receives studies into a folder the watcher reads.

Only the configured calling AE titles may associate. CR, DX (for presentation and for
processing) and Secondary Capture images are accepted in every transfer syntax scoring decodes,
as sent (no conversion). Each instance is written as received - ``encoded_dataset(include_meta=
True)``, the bytes the sender sent - to a dot-name, then renamed to
``<StudyInstanceUID>/<SOPInstanceUID>.dcm``: the watcher never sees a partial file, and an
aborted association leaves none (pynetdicom hands over a data set only once it is complete).
Optional TLS with a certificate pair (and a CA to require client certificates).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import ssl
import threading
from pathlib import Path

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from batchcxr import metrics
from batchcxr.errors import ConfigError
from batchcxr.logs import escape_controls
from batchcxr.settings import DicomSettings

log = logging.getLogger(__name__)

STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
TRANSFER_SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                     ExplicitVRBigEndian, RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
                     JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000]
"""Every syntax pydicom and its plugins decode (what scoring reads), accepted as sent."""
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def uid_name(uid: str) -> str:
    """A file or folder name for a UID: the UID itself when it is one (digits and dots), else a hash."""
    uid = (uid or "").strip().rstrip("\0")
    if _UID.match(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha256(uid.encode()).hexdigest()[:32]


def tls_context(cfg: DicomSettings) -> ssl.SSLContext | None:
    if not cfg.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_ca:
        context.load_verify_locations(cfg.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class Receiver:
    """The C-STORE SCP: ``start()`` serves in background threads, ``stop()`` ends it."""

    def __init__(self, cfg: DicomSettings, folder: Path) -> None:
        if not cfg.allowed_calling:
            raise ConfigError("[batchcxr.dicom] allowed_calling is empty: name the modalities and PACS "
                              "(their calling AE titles) that may send")
        if bool(cfg.tls_cert) != bool(cfg.tls_key):
            raise ConfigError("[batchcxr.dicom] tls_cert and tls_key go together")
        self.cfg = cfg
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.server = None
        self.received = 0
        self._lock = threading.Lock()

    def _ae(self):
        from pynetdicom import AE

        ae = AE(ae_title=self.cfg.ae_title)
        ae.require_calling_aet = list(self.cfg.allowed_calling)
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        from pynetdicom.sop_class import Verification

        ae.add_supported_context(Verification)
        return ae

    def remove_stale(self) -> int:
        """Temp files left by a receiver that died mid-write."""
        removed = 0
        for path in self.folder.rglob(".*.part"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def handle_store(self, event) -> int:
        """Write one instance as received: temp name, fsync, rename into <study>/<sop>.dcm."""
        from batchcxr.normalize.prepare import study_uid

        try:  # the bytes as sent; never the decoded data set (decoding the pixels would cost more than the rest)
            data = event.encoded_dataset(include_meta=True)
            sop = uid_name(str(event.request.AffectedSOPInstanceUID))
            study = uid_name(study_uid(data))
        except Exception:  # noqa: BLE001 - a request we cannot even read
            metrics.RECEIVED.labels("refused").inc()
            return CANNOT_UNDERSTAND
        folder = self.folder / study
        target = folder / f"{sop}.dcm"
        tmp = folder / f".{sop}.{os.getpid()}.{threading.get_ident()}.part"
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("cannot store %s from %s: %s", sop, escape_controls(event.assoc.requestor.ae_title),
                        exc.strerror or exc)
            metrics.RECEIVED.labels("out of resources").inc()
            return OUT_OF_RESOURCES
        with self._lock:
            self.received += 1
        metrics.RECEIVED.labels("stored").inc()
        return SUCCESS

    def start(self) -> None:
        from pynetdicom import evt

        removed = self.remove_stale()
        if removed:
            log.info("removed %d partial files of an earlier receiver", removed)
        handlers = [(evt.EVT_C_STORE, self.handle_store),
                    (evt.EVT_REJECTED, lambda e: log.warning("association from %s rejected",
                                                             escape_controls(e.assoc.requestor.ae_title)))]
        self.server = self._ae().start_server((self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers,
                                              ssl_context=tls_context(self.cfg))
        log.info("receiving DICOM as %s on %s:%d into %s", self.cfg.ae_title, self.cfg.host, self.port,
                 escape_controls(str(self.folder)))

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else self.cfg.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
