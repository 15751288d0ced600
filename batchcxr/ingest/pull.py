"""`batchcxr pull --since 24h`: ask the PACS for recent chest radiograph studies and fetch them.

DIMSE: C-FIND (Study Root, STUDY level, ModalitiesInStudy CR or DX, StudyDate range), then a
C-MOVE of each study to our own AE title (the PACS must know it: host and port of `listen`).
DICOMweb: QIDO-RS for the studies, WADO-RS for their instances, written into the incoming
folder as `listen` writes them. Studies already in the database with as many images as the PACS
reports are not fetched again.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from batchcxr.ingest.scp import uid_name
from batchcxr.settings import DicomSettings

log = logging.getLogger(__name__)

MODALITIES = ("CR", "DX")


@dataclass
class PullSummary:
    found: int = 0
    skipped: int = 0
    fetched: int = 0
    instances: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def find_studies_dimse(cfg: DicomSettings, since: dt.date) -> list[tuple[str, int]]:
    """(StudyInstanceUID, instances) of the PACS's CR/DX studies from ``since`` on."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ae = AE(ae_title=cfg.ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(cfg.pacs_host, cfg.pacs_port, ae_title=cfg.pacs_ae)
    if not assoc.is_established:
        raise ConnectionError(f"C-FIND: association with {cfg.pacs_ae}@{cfg.pacs_host}:{cfg.pacs_port} failed")
    found: dict[str, int] = {}
    try:
        for modality in MODALITIES:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = ""
            query.StudyDate = f"{since:%Y%m%d}-"
            query.ModalitiesInStudy = modality
            query.NumberOfStudyRelatedInstances = ""
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
                    n = identifier.get("NumberOfStudyRelatedInstances", 0)
                    found[str(identifier.StudyInstanceUID)] = int(n) if str(n).strip() else 0
    finally:
        assoc.release()
    return sorted(found.items())


def move_study(cfg: DicomSettings, study_uid: str) -> tuple[int, str | None]:
    """C-MOVE one study to our own AE title; (instances moved, error or None)."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    ae = AE(ae_title=cfg.ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(cfg.pacs_host, cfg.pacs_port, ae_title=cfg.pacs_ae)
    if not assoc.is_established:
        return 0, f"C-MOVE: association with {cfg.pacs_ae} failed"
    moved, error = 0, None
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        for status, _ in assoc.send_c_move(query, cfg.ae_title, StudyRootQueryRetrieveInformationModelMove):
            if status is None:
                error = "C-MOVE: no response"
                continue
            code = status.Status
            if code == 0x0000:
                moved = int(status.get("NumberOfCompletedSuboperations", moved) or moved)
            elif code not in (0xFF00, 0xB000):
                error = f"C-MOVE status 0x{code:04X} (is {cfg.ae_title} known to the PACS?)"
    finally:
        assoc.release()
    return moved, error


def find_studies_dicomweb(cfg: DicomSettings, since: dt.date) -> list[tuple[str, int]]:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=cfg.dicomweb_url)
    found: dict[str, int] = {}
    for modality in MODALITIES:
        for study in client.search_for_studies(search_filters={"StudyDate": f"{since:%Y%m%d}-",
                                                               "ModalitiesInStudy": modality},
                                               fields=["NumberOfStudyRelatedInstances"]):
            uid = study["0020000D"]["Value"][0]
            n = study.get("00201208", {}).get("Value", [0])[0]
            found[uid] = int(n or 0)
    return sorted(found.items())


def fetch_study_dicomweb(cfg: DicomSettings, study_uid: str, folder: Path) -> int:
    """WADO-RS: each instance of a study, written as `listen` writes received instances."""
    from io import BytesIO

    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=cfg.dicomweb_url)
    n = 0
    for ds in client.retrieve_study(study_uid):
        target = folder / uid_name(study_uid) / f"{uid_name(str(ds.SOPInstanceUID))}.dcm"
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, target)
        n += 1
    return n


def pull(cfg: DicomSettings, store, since: dt.date, folder: Path | None) -> PullSummary:
    """Find and fetch the studies; DICOMweb needs ``folder`` (DIMSE sends to the listener)."""
    summary = PullSummary()
    dicomweb = cfg.pull_via == "dicomweb"
    studies = find_studies_dicomweb(cfg, since) if dicomweb else find_studies_dimse(cfg, since)
    summary.found = len(studies)
    have = store.count_study_images([uid for uid, _ in studies])
    for uid, n in studies:
        if n and have.get(uid, 0) >= n:
            summary.skipped += 1
            continue
        try:
            if dicomweb:
                moved, error = fetch_study_dicomweb(cfg, uid, folder), None
            else:
                moved, error = move_study(cfg, uid)
        except Exception as exc:  # noqa: BLE001 - one study's failure does not stop the pull
            moved, error = 0, f"{type(exc).__name__}: {exc}"
        if error:
            summary.failed[uid] = error
        else:
            summary.fetched += 1
            summary.instances += moved
    return summary
