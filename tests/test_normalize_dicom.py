"""Real DICOM files in each transfer syntax, through the scoring path's normalization."""

from pathlib import Path

import numpy as np
import pydicom
import pytest

from batchcxr.dicomwrite import base_dataset, write_dicom
from batchcxr.domain import FileKind, ImageStatus, PreparedImage, Rejection
from batchcxr.ingest.files import read_source
from batchcxr.normalize.prepare import prepare
from batchcxr.settings import QualitySettings

from tests.dicoms import chest_like, dicom_file

Q = QualitySettings()
LOSSLESS = ["implicit", "explicit", "deflated", "rle", "jpeg-lossless", "jpeg-ls", "j2k-lossless"]
LOSSY = ["jpeg-baseline", "jpeg-extended", "jpeg-ls-near", "j2k"]
# The decoder plugin the README names for each compressed syntax (proves it works without GDCM).
PLUGIN = {"rle": "pylibjpeg", "jpeg-lossless": "pylibjpeg", "jpeg-baseline": "pylibjpeg",
          "jpeg-extended": "pylibjpeg", "jpeg-ls": "pyjpegls", "jpeg-ls-near": "pyjpegls",
          "j2k-lossless": "pylibjpeg", "j2k": "pylibjpeg"}


def _prepare(path: Path):
    source, data = read_source(path)
    return prepare(source, data, Q, "folder:test")


@pytest.mark.parametrize("syntax", LOSSLESS + LOSSY)
def test_each_transfer_syntax_decodes_to_the_same_picture(tmp_path, syntax):
    pixels = chest_like()
    result = _prepare(dicom_file(tmp_path / f"{syntax}.dcm", pixels, syntax))
    assert isinstance(result, PreparedImage), getattr(result, "reason", "")
    assert result.source.kind == FileKind.DICOM
    # no window in the file: min..max stretch, so compare against the stretched original
    lo, hi = int(pixels.min()), int(pixels.max())
    expected = np.rint((pixels.astype(float) - lo) / (hi - lo) * 255)
    err = np.abs(result.display.astype(float) - expected)
    if syntax in LOSSLESS:
        assert err.max() <= 1
    else:  # lossy: same picture, compression noise allowed
        assert np.corrcoef(result.display.ravel(), expected.ravel())[0, 1] > 0.95
    assert result.model_input.shape == (224, 224, 1)


@pytest.mark.parametrize("syntax", sorted(PLUGIN))
def test_named_decoder_plugins_decode_without_gdcm(tmp_path, syntax):
    path = dicom_file(tmp_path / "x.dcm", chest_like(), syntax)
    ds = pydicom.dcmread(path)
    from pydicom.pixels import pixel_array

    arr = pixel_array(ds, decoding_plugin=PLUGIN[syntax])
    assert arr.shape == (320, 280)


def test_sixteen_bit_monochrome1_and_window_all_match(tmp_path):
    pixels = chest_like()
    plain = _prepare(dicom_file(tmp_path / "a.dcm", pixels))
    sixteen = _prepare(dicom_file(tmp_path / "b.dcm", pixels.astype(np.uint16) * 257))
    mono1 = _prepare(dicom_file(tmp_path / "c.dcm", (255 - pixels).astype(np.uint16) * 16, bits_stored=12,
                                photometric="MONOCHROME1"))
    lo, hi = int(pixels.min()), int(pixels.max())
    windowed = _prepare(dicom_file(tmp_path / "d.dcm", pixels.astype(np.uint16) * 16 + 1000, bits_stored=16,
                                   WindowCenter=(lo + hi) / 2 * 16 + 1000 + 8, WindowWidth=(hi - lo) * 16 + 1))
    for other in (sixteen, mono1, windowed):
        assert isinstance(other, PreparedImage), getattr(other, "reason", "")
        assert np.abs(other.display.astype(int) - plain.display.astype(int)).max() <= 2


def test_rescale_slope_intercept_and_signed_pixels(tmp_path):
    pixels = chest_like().astype(np.int16) * 8 - 1024  # signed, like CT-style storage
    ds = base_dataset(pixels, bits_stored=12, RescaleSlope=2, RescaleIntercept=-100)
    result = _prepare(write_dicom(tmp_path / "s.dcm", ds))
    assert isinstance(result, PreparedImage)
    ref = chest_like().astype(float)
    corr = np.corrcoef(result.display.ravel(), ref.ravel())[0, 1]
    assert corr > 0.99


def test_rgb_secondary_capture(tmp_path):
    from batchcxr.dicomwrite import SECONDARY_CAPTURE

    gray = chest_like()
    ds = base_dataset(gray, modality="OT", sop_class=SECONDARY_CAPTURE)
    rgb = np.dstack([gray] * 3)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    result = _prepare(write_dicom(tmp_path / "rgb.dcm", ds))
    assert isinstance(result, PreparedImage), getattr(result, "reason", "")
    assert np.abs(result.display.astype(int) - gray).max() <= 1


@pytest.mark.parametrize(
    "attrs, reason",
    [
        ({"ViewPosition": "LL"}, "lateral view"),
        ({"modality": "CT"}, "modality CT is not chest radiography"),
        ({"NumberOfFrames": 2}, "multi-frame"),
    ],
)
def test_quality_gate_skips(tmp_path, attrs, reason):
    pixels = chest_like()
    if "NumberOfFrames" in attrs:
        pixels = np.concatenate([pixels, pixels])  # two frames' worth of data
        ds = base_dataset(pixels)
        ds.Rows = 320
        ds.NumberOfFrames = 2
        path = write_dicom(tmp_path / "m.dcm", ds)
    else:
        path = dicom_file(tmp_path / "g.dcm", pixels, **attrs)
    result = _prepare(path)
    assert isinstance(result, Rejection) and result.status == ImageStatus.SKIPPED
    assert reason in result.reason


def test_small_image_skipped(tmp_path):
    result = _prepare(dicom_file(tmp_path / "s.dcm", chest_like(40, 300)))
    assert isinstance(result, Rejection) and "too small" in result.reason


def test_pixel_limit_refuses_before_decoding(tmp_path):
    ds = base_dataset(chest_like())
    ds.Rows, ds.Columns = 60000, 60000  # declared 3.6e9 pixels; data is tiny
    result = _prepare(write_dicom(tmp_path / "huge.dcm", ds))
    assert isinstance(result, Rejection) and result.status == ImageStatus.FAILED
    assert "too large" in result.reason and "not decoded" in result.reason


def test_structured_report_is_skipped(tmp_path):
    ds = base_dataset(chest_like())
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    del ds.PixelData
    result = _prepare(write_dicom(tmp_path / "sr.dcm", ds))
    assert isinstance(result, Rejection) and "non-image object (structured report" in result.reason


def test_large_jpeg_baseline_dicom_uses_reduced_decode_and_matches_full(tmp_path):
    import cv2

    big = cv2.resize(chest_like(), (1100, 1200), interpolation=cv2.INTER_CUBIC)
    result = _prepare(dicom_file(tmp_path / "big.dcm", big, "jpeg-baseline"))
    assert isinstance(result, PreparedImage)
    ds = pydicom.dcmread(tmp_path / "big.dcm")
    from batchcxr.normalize.contract import to_model_input
    from batchcxr.normalize.dicom import dataset_to_gray

    full, _ = dataset_to_gray(ds, ds.pixel_array)  # full-size decode by pydicom's plugins
    reference = to_model_input(full).astype(np.float32)
    assert result.image.rows == 1200 and result.image.columns == 1100
    # DCT-scaled decoding smooths the noise extremes, so the min..max stretch differs a little
    assert np.abs(result.model_input.astype(np.float32) - reference).mean() < 4.0
    assert np.corrcoef(result.model_input.ravel().astype(np.float32), reference.ravel())[0, 1] > 0.99
    assert max(result.display.shape) == 512


def test_small_jpeg_baseline_dicom_is_decoded_by_opencv_like_pydicom(tmp_path):
    """A frame too small to decode reduced still goes to OpenCV's libjpeg-turbo (4-5x faster than
    pydicom's libjpeg plugin), not pydicom: its exact values, within 1 level of pydicom's."""
    from batchcxr.normalize.contract import decode_image_bytes
    from batchcxr.normalize.dicom import decode_pixels, first_frame
    from batchcxr.normalize.prepare import KEEP_SHORT

    ds = pydicom.dcmread(dicom_file(tmp_path / "small.dcm", chest_like(), "jpeg-baseline"))
    frame = decode_pixels(ds, KEEP_SHORT, 512)
    assert frame.shape == (320, 280) and frame.dtype == np.uint8
    assert np.array_equal(frame, decode_image_bytes(first_frame(ds)))
    assert np.abs(frame.astype(int) - ds.pixel_array.astype(int)).max() <= 1


def test_jpeg_baseline_label_on_a_stream_opencv_cannot_decode_falls_back_to_pydicom(tmp_path):
    """A JPEG-LS stream filed under the JPEG Baseline transfer syntax (a mislabelled archive
    file): OpenCV refuses it, pydicom's libjpeg plugin decodes it, so the file is scored."""
    import cv2
    from pydicom.uid import JPEGBaseline8Bit

    big = cv2.resize(chest_like(), (1100, 1200), interpolation=cv2.INTER_CUBIC)
    ds = pydicom.dcmread(dicom_file(tmp_path / "ls.dcm", big, "jpeg-ls"))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(tmp_path / "mislabelled.dcm", enforce_file_format=True)
    result = _prepare(tmp_path / "mislabelled.dcm")
    assert isinstance(result, PreparedImage), getattr(result, "reason", "")
    assert result.model_input.shape == (224, 224, 1) and max(result.display.shape) == 512


def test_truncated_jpeg_frame_in_a_dicom_is_refused_not_scored_half_grey(tmp_path):
    """libjpeg decodes a JPEG stream cut short as a picture whose missing part is flat grey:
    a frame without its end marker is refused with the reason, as a truncated JPEG file is."""
    from pydicom.encaps import encapsulate

    from batchcxr.normalize.dicom import first_frame

    ds = pydicom.dcmread(dicom_file(tmp_path / "whole.dcm", chest_like(), "jpeg-baseline"))
    frame = first_frame(ds)
    cut = frame[: len(frame) * 2 // 3]
    ds.PixelData = encapsulate([cut + b"\x00" * (len(cut) % 2)])
    ds.save_as(tmp_path / "cut.dcm", enforce_file_format=True)
    result = _prepare(tmp_path / "cut.dcm")
    assert isinstance(result, Rejection) and result.status == ImageStatus.FAILED
    assert "truncated JPEG frame (no end marker)" in result.reason


def test_large_jpeg_file_is_decoded_reduced(tmp_path):
    import cv2

    from batchcxr.normalize.contract import decode_image_bytes, to_model_input

    big = cv2.resize(chest_like(), (1000, 1800), interpolation=cv2.INTER_CUBIC)
    path = tmp_path / "big.jpg"
    cv2.imwrite(str(path), big, [cv2.IMWRITE_JPEG_QUALITY, 95])
    result = _prepare(path)
    assert isinstance(result, PreparedImage)
    assert "decoded at 1/2 size" in result.qc_notes[0]
    assert (result.image.rows, result.image.columns) == (1800, 1000)
    reference = to_model_input(decode_image_bytes(path.read_bytes())).astype(np.float32)
    assert np.abs(result.model_input.astype(np.float32) - reference).mean() < 2.0


def test_odd_sided_sixteen_bit_frame_is_shrunk_by_blocks_and_matches_full_size(tmp_path):
    """A 1201 x 1001 frame is shrunk by 2 before windowing: whole blocks plus the cut-off last row
    and column (not OpenCV's general-ratio resize), and the model input still matches the
    full-size processing."""
    import cv2

    from batchcxr.normalize.contract import to_model_input
    from batchcxr.normalize.dicom import dataset_to_gray

    big = cv2.resize(chest_like(), (1001, 1201), interpolation=cv2.INTER_CUBIC).astype(np.uint16) * 16
    path = dicom_file(tmp_path / "odd.dcm", big, bits_stored=12)
    result = _prepare(path)
    assert isinstance(result, PreparedImage), getattr(result, "reason", "")
    ds = pydicom.dcmread(path)
    full, _ = dataset_to_gray(ds, ds.pixel_array)
    reference = to_model_input(full).astype(np.float32)
    err = np.abs(result.model_input.astype(np.float32) - reference)
    assert err.mean() < 0.5 and np.percentile(err, 99.9) <= 2
    assert max(result.display.shape) == 512 and result.display.shape[1] in (426, 427)


@pytest.mark.parametrize("syntax", ["explicit", "implicit"])
def test_native_frame_reads_the_file_bytes_in_place(tmp_path, syntax):
    from batchcxr.normalize.dicom import native_frame
    from batchcxr.normalize.prepare import parse_dicom

    pixels = chest_like().astype(np.uint16) * 16
    data = dicom_file(tmp_path / "a.dcm", pixels, syntax, bits_stored=12).read_bytes()
    frame = native_frame(parse_dicom(data, force=False), data)
    assert frame is not None and not frame.flags.owndata  # a view of the bytes, no copy
    assert np.array_equal(frame, pydicom.dcmread(tmp_path / "a.dcm").pixel_array)
    truncated = data[: len(data) - 10]
    assert native_frame(parse_dicom(truncated, force=False), truncated) is None


def test_bits_above_bits_stored_are_masked_as_pydicom_does(tmp_path):
    """Old modalities keep overlay planes in the unused high bits: those files take pydicom's
    masking path and show the same picture as a clean file."""
    from batchcxr.normalize.dicom import native_frame
    from batchcxr.normalize.prepare import parse_dicom

    pixels = chest_like().astype(np.uint16) * 16
    clean = _prepare(dicom_file(tmp_path / "clean.dcm", pixels, bits_stored=12))
    dirty_path = dicom_file(tmp_path / "dirty.dcm", pixels | 0x8000, bits_stored=12)
    data = dirty_path.read_bytes()
    assert native_frame(parse_dicom(data, force=False), data) is None
    dirty = _prepare(dirty_path)
    assert np.array_equal(dirty.display, clean.display)
    assert np.array_equal(dirty.model_input, clean.model_input)


def test_large_frames_shrunk_before_windowing_match_full_size_processing(tmp_path):
    """A 1600 x 1400 16-bit frame is area-shrunk as stored integers before the value transforms.
    That equals shrinking exact float averages (within 1 level), and transforming the full frame
    first except at a few pixels where the window clips (within 3 levels there)."""
    import cv2

    from batchcxr.normalize.contract import to_model_input
    from batchcxr.normalize.dicom import dataset_to_gray

    pixels = cv2.resize(chest_like(), (1400, 1600), interpolation=cv2.INTER_CUBIC).astype(np.uint16) * 16 + 7
    path = dicom_file(tmp_path / "big.dcm", pixels, bits_stored=12, WindowCenter=2000, WindowWidth=3000)
    result = _prepare(path)
    ds = pydicom.dcmread(path)
    exact = cv2.resize(ds.pixel_array.astype(np.float32), (700, 800), interpolation=cv2.INTER_AREA)
    shrunk_exact = to_model_input(dataset_to_gray(ds, exact)[0]).astype(int)
    assert np.abs(result.model_input.astype(int) - shrunk_exact).max() <= 1
    full = to_model_input(dataset_to_gray(ds, ds.pixel_array)[0]).astype(int)
    diff = np.abs(result.model_input.astype(int) - full)
    assert diff.max() <= 3 and (diff > 1).mean() < 0.005


@pytest.mark.parametrize("syntax", ["j2k-lossless", "j2k"])
def test_large_jpeg2000_frames_decode_at_a_lower_resolution_level(tmp_path, syntax, monkeypatch, openjpeg):
    """OpenJPEG (glymur) stops one wavelet level early for a frame twice the needed size. The
    wavelet's low-pass is not a box average, so the model input differs from decoding in full
    and area-shrinking by about a grey level on average (scores: tests/test_fidelity.py)."""
    import cv2

    from batchcxr.normalize import j2k

    pixels = cv2.resize(chest_like(), (1100, 1300), interpolation=cv2.INTER_CUBIC).astype(np.uint16) * 16
    path = dicom_file(tmp_path / "big.dcm", pixels, syntax, bits_stored=12)
    reduced = _prepare(path)
    assert any("decoded at 1/2 size" in n for n in reduced.qc_notes), reduced.qc_notes
    monkeypatch.setattr(j2k, "available", lambda: False)
    full = _prepare(path)
    assert not any("decoded at" in n for n in full.qc_notes)
    diff = np.abs(reduced.model_input.astype(int) - full.model_input.astype(int))
    assert diff.mean() < 2.5 and np.percentile(diff, 95) <= 6
    assert np.corrcoef(reduced.model_input.ravel(), full.model_input.ravel())[0, 1] > 0.995
