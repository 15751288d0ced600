"""Write grayscale images as DICOM files in a chosen transfer syntax.

Used to build the bundled demo set and by the tests ("real DICOM files
written with pydicom"). Encoders: pydicom's own (uncompressed, deflated, RLE),
pyjpegls (JPEG-LS), pylibjpeg-openjpeg (JPEG 2000), OpenCV (JPEG Baseline,
encapsulated by pydicom) and GDCM (JPEG Lossless, JPEG Extended 12-bit).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

DX_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")

TRANSFER_SYNTAXES = {
    "implicit": ImplicitVRLittleEndian,
    "explicit": ExplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg-baseline": JPEGBaseline8Bit,
    "jpeg-extended": JPEGExtended12Bit,
    "jpeg-lossless": JPEGLosslessSV1,
    "jpeg-ls": JPEGLSLossless,
    "jpeg-ls-near": JPEGLSNearLossless,
    "j2k-lossless": JPEG2000Lossless,
    "j2k": JPEG2000,
}


def base_dataset(pixels: np.ndarray, *, modality: str = "DX", sop_class: UID = DX_IMAGE_STORAGE,
                 bits_stored: int | None = None, photometric: str = "MONOCHROME2", **attrs) -> Dataset:
    """A single-frame grayscale image dataset around ``pixels`` (uint8 or uint16/int16 2-D)."""
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2-D, found {pixels.shape}")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = "Demo^Patient"
    ds.PatientID = "DEMO-0001"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDate = dt.date.today().strftime("%Y%m%d")
    ds.StudyDescription = "CHEST PA"
    ds.ViewPosition = "PA"
    ds.BodyPartExamined = "CHEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    return ds


def _gdcm_transcode(path: Path, syntax: UID) -> None:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise ValueError(f"{path}: GDCM cannot read the uncompressed file")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(syntax))))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise ValueError(f"{path}: GDCM cannot encode {syntax.name}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise ValueError(f"{path}: GDCM cannot write {syntax.name}")


def write_dicom(path: Path, ds: Dataset, syntax: str | UID = "explicit") -> Path:
    """Encode ``ds`` (uncompressed PixelData) in the named transfer syntax and save it."""
    uid = UID(TRANSFER_SYNTAXES.get(str(syntax), syntax))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if uid in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = uid
        ds.save_as(path, enforce_file_format=True)
    elif uid == JPEGBaseline8Bit:
        if ds.BitsAllocated != 8:
            raise ValueError("JPEG Baseline needs 8-bit pixels")
        pixels = np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, ds.Columns)
        ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise ValueError("OpenCV JPEG encoding failed")
        ds.PixelData = encapsulate([buf.tobytes()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = uid
        ds.LossyImageCompression = "01"
        ds.save_as(path, enforce_file_format=True)
    elif uid in (JPEGLosslessSV1, JPEGExtended12Bit):
        if uid == JPEGExtended12Bit and ds.BitsAllocated != 8:
            raise ValueError("JPEG Extended is written here for 8-bit pixels only (GDCM's 12-bit lossy encoder fails)")
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
        _gdcm_transcode(path, uid)
    else:
        kwargs = {}
        if uid == JPEG2000:
            kwargs = {"j2k_cr": [20]}
        elif uid == JPEGLSNearLossless:
            kwargs = {"jls_error": 2}
        ds.compress(uid, **kwargs)
        ds.save_as(path, enforce_file_format=True)
    return path
