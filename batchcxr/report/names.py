"""Human names for studies and formatted DICOM values (pure: text in, text out).

Every page and export names a study the same way: the patient's name, ID, study date and
accession for DICOM; the folder path for JPEG/PNG studies (whose key is ``folder:<path>``).
"""

from __future__ import annotations

import re

FOLDER_PREFIX = "folder:"


def person_name(value: str) -> str:
    """DICOM PN ``Family^Given^Middle^Prefix^Suffix`` as ``Family, Prefix Given Middle, Suffix``
    (the alphabetic group only; empty components left out). Text without ``^`` is kept."""
    text = (value or "").strip()
    if "^" not in text:
        return text
    text = text.split("=")[0].strip()
    parts = [p.strip() for p in text.split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    rest = " ".join(p for p in (prefix, given, middle) if p)
    name = ", ".join(p for p in (family, rest) if p)
    return f"{name}, {suffix}" if suffix else name


def dicom_date(value: str) -> str:
    """DICOM DA ``YYYYMMDD`` as ``YYYY-MM-DD`` (other text unchanged)."""
    text = (value or "").strip()
    if re.fullmatch(r"\d{8}", text):
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text


def dicom_time(value: str) -> str:
    """DICOM TM ``HHMMSS.FFFFFF`` as ``HH:MM:SS`` (or ``HH:MM``; other text unchanged)."""
    text = (value or "").strip()
    m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d+)?", text)
    if not m:
        return text
    return ":".join(p for p in m.groups()[:3] if p) if m.group(2) else text


def folder_of(study_key: str) -> str:
    """The folder path of a JPEG/PNG study ('' for DICOM studies)."""
    return study_key[len(FOLDER_PREFIX):] if study_key.startswith(FOLDER_PREFIX) else ""


def study_title(study_key: str, patient_name: str = "", patient_id: str = "", study_date: str = "",
                accession_number: str = "") -> str:
    """One line that names a study for a person: ``Family, Given · ID 123 · 2026-11-25 · Acc. A1``
    for DICOM, the folder path for JPEG/PNG, the UID when a DICOM study has none of those."""
    folder = folder_of(study_key)
    if folder:
        return folder
    parts = [person_name(patient_name), f"ID {patient_id}" if patient_id else "", dicom_date(study_date),
             f"Acc. {accession_number}" if accession_number else ""]
    title = " · ".join(p for p in parts if p)
    return title or study_key
