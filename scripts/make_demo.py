"""Build the bundled demo set in demo/ from ../shared (run once; the output is committed).

Images: Kermany, Zhang, Goldbaum, Chest X-Ray Images (Pneumonia), Mendeley Data v2,
CC BY 4.0 (Kaggle "val" split, not used for training or testing). DICOMs are made
from them here with batchcxr.dicomwrite, in several transfer syntaxes.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
from pydicom.uid import generate_uid

from batchcxr.dicomwrite import CR_IMAGE_STORAGE, base_dataset, write_dicom

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT.parent / "shared" / "data" / "chest_xray_val_fullres"
OUT = ROOT / "demo"
MAX_SIDE = 1024


def load(name: str) -> np.ndarray:
    cls = "NORMAL" if name.startswith(("IM-", "NORMAL2")) else "PNEUMONIA"
    img = cv2.imread(str(SRC / cls / name), cv2.IMREAD_GRAYSCALE)
    if img is None:
        sys.exit(f"{SRC / cls / name}: cannot read")
    scale = MAX_SIDE / max(img.shape)
    if scale < 1:
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return img


def main() -> None:
    if OUT.exists():
        for sub in ("jpeg", "dicom"):
            shutil.rmtree(OUT / sub, ignore_errors=True)
    # JPEG/PNG studies: one folder each (a folder is a study for JPEG/PNG).
    jpeg_dir = OUT / "jpeg"
    for folder, name in (("study-normal-1", "NORMAL2-IM-1427-0001.jpeg"),
                         ("study-pneumonia-1", "person1946_bacteria_4874.jpeg")):
        (jpeg_dir / folder).mkdir(parents=True)
        cv2.imwrite(str(jpeg_dir / folder / name), load(name), [cv2.IMWRITE_JPEG_QUALITY, 90])
    (jpeg_dir / "study-normal-2").mkdir(parents=True)
    cv2.imwrite(str(jpeg_dir / "study-normal-2" / "NORMAL2-IM-1430-0001.png"), load("NORMAL2-IM-1430-0001.jpeg"))

    d = OUT / "dicom"
    # 16-bit uncompressed DX, no window: values spread over 0..65535.
    img = load("NORMAL2-IM-1431-0001.jpeg")
    ds = base_dataset(img.astype(np.uint16) * 257, PatientName="Demo^Normal^Sixteen", PatientID="DEMO-N16",
                      AccessionNumber="ACC-N16")
    write_dicom(d / "dx-16bit-explicit.dcm", ds, "explicit")
    # MONOCHROME1 CR with a VOI window, JPEG 2000 lossless; 12 bits stored.
    img = load("person1947_bacteria_4876.jpeg")
    inverted = ((255 - img).astype(np.uint16) * 16)
    ds = base_dataset(inverted, modality="CR", sop_class=CR_IMAGE_STORAGE, bits_stored=12,
                      photometric="MONOCHROME1", PatientName="Demo^Pneumonia^Mono1", PatientID="DEMO-P1",
                      AccessionNumber="ACC-P1", WindowCenter=2040, WindowWidth=4080)
    write_dicom(d / "cr-mono1-window-j2k-lossless.dcm", ds, "j2k-lossless")
    # A PA and a lateral of one study: JPEG Baseline and RLE; the lateral is skipped by the quality gate.
    study = generate_uid()
    img = load("person1949_bacteria_4880.jpeg")
    ds = base_dataset(img, PatientName="Demo^Pneumonia^TwoViews", PatientID="DEMO-P2", AccessionNumber="ACC-P2",
                      StudyInstanceUID=study)
    write_dicom(d / "two-views" / "pa-jpeg-baseline.dcm", ds, "jpeg-baseline")
    ds = base_dataset(np.ascontiguousarray(img[:, ::-1]), PatientName="Demo^Pneumonia^TwoViews",
                      PatientID="DEMO-P2", AccessionNumber="ACC-P2", StudyInstanceUID=study, ViewPosition="LL")
    write_dicom(d / "two-views" / "lateral-rle.dcm", ds, "rle")
    # JPEG-LS lossless, 8 bit.
    img = load("NORMAL2-IM-1436-0001.jpeg")
    ds = base_dataset(img, PatientName="Demo^Normal^JpegLS", PatientID="DEMO-N2", AccessionNumber="ACC-N2")
    write_dicom(d / "dx-jpeg-ls.dcm", ds, "jpeg-ls")
    print(f"demo set written to {OUT}")


if __name__ == "__main__":
    main()
