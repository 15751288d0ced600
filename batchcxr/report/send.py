"""Results back to the PACS: build the DICOM objects of scored studies into the outbox, then send
what is due by C-STORE (pynetdicom) or STOW-RS (dicomweb-client).

Every object is written to the outbox folder and recorded in the outbox table before any send;
it is marked sent only on a success status, and retried with back-off while its destination is
down. Its UID is derived from its content, so sending it twice (a crash after the PACS stored it
and before we marked it) replaces, never duplicates.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2

from batchcxr import metrics
from batchcxr.logs import escape_controls
from batchcxr.report.files import atomic_write, private_dir
from batchcxr.settings import Destination, Settings

if TYPE_CHECKING:
    from batchcxr.report.dicom_results import Finding

log = logging.getLogger(__name__)

STORAGE = {"sr": "1.2.840.10008.5.1.4.1.1.88.33", "sc": "1.2.840.10008.5.1.4.1.1.7",
           "gsps": "1.2.840.10008.5.1.4.1.1.11.1"}
"""Comprehensive SR, Secondary Capture, Grayscale Softcopy Presentation State."""
SUCCESS_STATUSES = {0x0000, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}
"""C-STORE success and warning statuses (the object was stored)."""


@dataclass
class SendSummary:
    sent: int = 0
    failed: int = 0
    errors: dict | None = None


class Outbox:
    """Builds results into the outbox and sends them."""

    def __init__(self, settings: Settings, store) -> None:
        self.settings = settings
        self.cfg = settings.dicom
        self.store = store
        self.folder = Path(settings.outbox_dir)

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.destinations)

    # building -----------------------------------------------------------------
    def enqueue_since(self, since: dt.datetime) -> int:
        """Build and record the results of every DICOM study changed since ``since``."""
        if not self.enabled:
            return 0
        ids, added = self.store.dicom_study_ids_touched_since(since), 0
        for study in self.store.iter_studies_by_id(ids):
            try:
                added += self.enqueue_study(study)
            except Exception:  # noqa: BLE001 - one study's objects must not stop the others
                log.exception("results of study %s not built", escape_controls(study.study_key))
        return added

    def _findings(self, study) -> list[Finding]:
        from batchcxr.report.dicom_results import Finding, SourceImage  # pydicom: only a process that sends

        lateral = {v.upper() for v in self.settings.quality.lateral_views}
        findings = []
        for img in study.images:
            if img.status != "scored" or not img.sop_instance_uid or not img.sop_class_uid:
                continue
            if (img.view_position or "").upper() in lateral:
                continue
            source = SourceImage(img.sop_class_uid, img.sop_instance_uid, img.series_instance_uid or
                                 f"{img.sop_instance_uid}.1", img.rows, img.columns, img.patient_orientation or "")
            latest = {}
            for p in sorted(img.predictions, key=lambda p: (p.created_at, p.id)):
                latest[p.model_name] = p
            for p in latest.values():
                findings.append(Finding(source, p.model_name, p.model_version, p.probability, p.threshold, p.label,
                                        p.calibrated))
        return findings

    def enqueue_study(self, study) -> int:
        from batchcxr.report.dicom_results import (
            StudyRecord,
            gradcam_gsps,
            gradcam_sc,
            heat_contour,
            overlay_rgb,
            pneumonia_sr,
        )

        findings = self._findings(study)
        if not findings:
            return 0
        record = StudyRecord(study.study_key, study.patient_name, study.patient_id, study.accession_number,
                             study.study_date)
        root = self.cfg.uid_root
        objects: dict[str, tuple[str, object]] = {}
        wanted = {o for d in self.cfg.destinations.values() for o in d.objects}
        if "sr" in wanted:
            objects["sr"] = ("sr", [pneumonia_sr(record, findings, root)])
        reports = Path(self.settings.reports_dir)
        images = {i.sop_instance_uid: i for i in study.images}
        derived: dict[str, list] = {"sc": [], "gsps": []}
        for f in findings:
            if not ({"sc", "gsps"} & wanted):
                break
            img = images[f.image.sop_instance_uid]
            pred = next((p for p in img.predictions if p.model_version == f.model_version), None)
            display = cv2.imread(str(reports / img.display_path), cv2.IMREAD_GRAYSCALE) if img.display_path else None
            layer = (cv2.imread(str(reports / pred.heatmap_path), cv2.IMREAD_UNCHANGED)
                     if pred is not None and pred.heatmap_path else None)
            if display is None or layer is None:
                continue
            shown = (f"P(pneumonia) {f.calibrated:.2f}" if f.calibrated is not None  # as the study page says it
                     else f"score {f.probability:.2f}")
            text = f"{f.model_name}: {shown} -> {f.label}"
            if "sc" in wanted:
                derived["sc"].append(gradcam_sc(record, f, overlay_rgb(display, layer, text), root))
            if "gsps" in wanted and f.image.rows and f.image.columns:
                derived["gsps"].append(gradcam_gsps(record, f, heat_contour(layer, f.image.rows, f.image.columns), root))
        rows = []
        for kind, datasets in [*objects.values(), *derived.items()]:
            for ds in datasets:
                path = self._write(ds)
                for name, dest in self.cfg.destinations.items():
                    if kind in dest.objects:
                        rows.append(dict(destination=name, kind=kind, study_key=study.study_key,
                                         sop_instance_uid=str(ds.SOPInstanceUID), path=str(path)))
        return self.store.enqueue_outbox(rows)

    def _write(self, ds) -> Path:
        """The encoded object in the outbox folder, named by its UID (written once)."""
        from io import BytesIO

        path = self.folder / f"{ds.SOPInstanceUID}.dcm"
        if not path.exists():
            private_dir(self.folder)
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            atomic_write(path, buf.getvalue())
        return path

    # sending ------------------------------------------------------------------
    def send_due(self, limit: int = 100) -> SendSummary:
        """Send what is due, one association (or one STOW request) per destination."""
        summary = SendSummary(errors={})
        due = self.store.outbox_due(limit)
        by_destination = defaultdict(list)
        for item in due:
            by_destination[item.destination].append(item)
        for name, items in by_destination.items():
            dest = self.cfg.destinations.get(name)
            if dest is None:
                self.store.outbox_retry([i.id for i in items], f"destination {name} is not configured",
                                        self.cfg.send_retry_max_seconds)
                continue
            try:
                results = (self._stow if dest.kind == "stow" else self._c_store)(dest, items)
            except Exception as exc:  # noqa: BLE001 - a destination down is routine: retried
                results = {i.id: f"{type(exc).__name__}: {exc}" for i in items}
            ok = [i for i, err in results.items() if err is None]
            self.store.outbox_sent(ok)
            summary.sent += len(ok)
            metrics.OUTBOX_SENT.labels(name).inc(len(ok))
            failed = {i: e for i, e in results.items() if e is not None}
            for error in set(failed.values()):
                self.store.outbox_retry([i for i, e in failed.items() if e == error], error,
                                        self.cfg.send_retry_max_seconds)
                log.warning("send to %s failed: %s", name, escape_controls(error))
            summary.failed += len(failed)
            if failed:
                summary.errors[name] = next(iter(failed.values()))
        metrics.OUTBOX.set(self.store.outbox_pending())
        return summary

    def _c_store(self, dest: Destination, items) -> dict[int, str | None]:
        from pydicom import dcmread
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        ae = AE(ae_title=self.cfg.ae_title)
        for kind in {i.kind for i in items}:
            ae.add_requested_context(STORAGE[kind], [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            return {i.id: f"association with {dest.ae_title}@{dest.host}:{dest.port} refused or failed" for i in items}
        results: dict[int, str | None] = {}
        try:
            for item in items:
                status = assoc.send_c_store(dcmread(item.path))
                code = getattr(status, "Status", None)
                results[item.id] = None if code in SUCCESS_STATUSES else (
                    f"C-STORE status 0x{code:04X}" if code is not None else "no C-STORE response")
        finally:
            assoc.release()
        return results

    def _stow(self, dest: Destination, items) -> dict[int, str | None]:
        from dicomweb_client.api import DICOMwebClient
        from pydicom import dcmread

        client = DICOMwebClient(url=dest.url)
        client.store_instances([dcmread(i.path) for i in items])  # raises on a failure status
        return {i.id: None for i in items}


def send_loop(outbox: Outbox, stop, interval: float = 5.0) -> None:
    """`batchcxr send --daemon`: send what is due until stopped."""
    while not stop.requested:
        outbox.send_due()
        deadline = time.monotonic() + interval
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.2)
