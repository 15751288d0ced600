import cv2
import numpy as np
import pytest

from batchcxr.normalize.contract import Cover, area_shrink, block_shrink, to_model_input
from batchcxr.normalize.window import apply_window, rescale_to_unit, rgb_to_gray, to_uint8


def test_linear_window_matches_dicom_formula():
    # PS3.3 C.11.2.1.2.1: x <= c - 0.5 - (w-1)/2 -> 0; x > c - 0.5 + (w-1)/2 -> 1
    c, w = 100.0, 51.0
    x = np.array([0, 74.5, 100, 124.5, 200], dtype=float)
    out = apply_window(x, c, w)
    assert out[0] == 0 and out[-1] == 1
    assert out[1] == pytest.approx(0.0)
    assert out[2] == pytest.approx(((100 - 99.5) / 50) + 0.5)
    assert out[3] == pytest.approx(1.0)


def test_linear_exact_and_sigmoid():
    x = np.array([0.0, 50.0, 100.0])
    assert apply_window(x, 50, 100, "LINEAR_EXACT").tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert apply_window(x, 50, 100, "SIGMOID")[1] == pytest.approx(0.5)


@pytest.mark.parametrize("width", [0, -5])
def test_bad_width(width):
    with pytest.raises(ValueError, match="window width"):
        apply_window(np.zeros(3), 10, width)


def test_monochrome1_inversion_twice_is_identity():
    unit = rescale_to_unit(np.arange(256))
    once = to_uint8(unit, invert=True)
    assert once[0] == 255 and once[-1] == 0
    assert np.array_equal(to_uint8(1 - unit, invert=True), to_uint8(unit))


def test_rescale_flat_image_is_zero():
    assert rescale_to_unit(np.full((4, 4), 7)).max() == 0


def test_rgb_to_gray_on_grey_pixels():
    rgb = np.dstack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3)
    assert np.array_equal(rgb_to_gray(rgb), rgb[..., 0])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
@pytest.mark.parametrize("window", [None, (1000.0, 600.0, "LINEAR"), (90.0, 40.0, "LINEAR_EXACT")])
@pytest.mark.parametrize("invert", [False, True])
def test_one_pass_range_mapping_equals_the_float_path(dtype, window, invert):
    from batchcxr.normalize.window import linear_range, range_to_uint8

    rng = np.random.default_rng(1)
    top = 255 if dtype == np.uint8 else 2000
    arr = rng.integers(0, top, (64, 80)).astype(dtype)
    if window is None:
        low, high = float(arr.min()), float(arr.max())
        unit = rescale_to_unit(arr)
    else:
        low, high = linear_range(*window)
        unit = apply_window(arr, *window)
    fast = range_to_uint8(arr, low, high, invert)
    slow = to_uint8(unit, invert)
    assert fast.dtype == np.uint8 and np.abs(fast.astype(int) - slow.astype(int)).max() <= 1
    assert (fast == slow).mean() > 0.95  # the rest are exact .5 ties, rounded the other way


@pytest.mark.parametrize("shape", [(224, 224), (225, 224), (448, 448), (230, 300), (1152, 1422), (1963, 2172),
                                   (3000, 2500), (224, 1900)])
def test_area_shrink_equals_opencv_area_resize(shape):
    rng = np.random.default_rng(sum(shape))
    noise = rng.integers(0, 256, shape, dtype=np.uint8)
    smooth = cv2.GaussianBlur(noise, (0, 0), 9)  # radiograph-like: most pixels are no rounding tie
    for gray in (noise, smooth):
        ours = area_shrink(gray, 224).astype(int)
        theirs = cv2.resize(gray, (224, 224), interpolation=cv2.INTER_AREA).astype(int)
        assert np.abs(ours - theirs).max() <= 1
        assert np.mean(ours != theirs) < 0.01


def test_area_shrink_refuses_to_enlarge_and_the_contract_still_does():
    with pytest.raises(ValueError, match="only shrinks"):
        area_shrink(np.zeros((100, 300), np.uint8), 224)
    small = np.arange(100 * 300, dtype=np.uint32).reshape(100, 300).astype(np.uint8)
    expected = cv2.resize(small, (224, 224), interpolation=cv2.INTER_AREA)
    assert np.array_equal(to_model_input(small)[..., 0], expected)


def test_model_input_is_opencvs_area_resize_unless_a_block_is_partial():
    """The contract's resize itself (cv2.INTER_AREA) for any frame but a block shrink with a
    partial last block, which only ``area_shrink`` can weigh."""
    rng = np.random.default_rng(3)
    gray = cv2.GaussianBlur(rng.integers(0, 256, (1400, 1046), dtype=np.uint8), (0, 0), 5)
    opencv = cv2.resize(gray, (224, 224), interpolation=cv2.INTER_AREA)
    assert np.array_equal(to_model_input(gray)[..., 0], opencv)
    shrunk, cover = block_shrink(gray, 2)
    assert not cover.partial
    assert np.array_equal(to_model_input(shrunk, cover=cover)[..., 0],
                          cv2.resize(shrunk, (224, 224), interpolation=cv2.INTER_AREA))
    shrunk, cover = block_shrink(gray[:1399], 2)
    assert cover.partial
    assert np.array_equal(to_model_input(shrunk, cover=cover)[..., 0], area_shrink(shrunk, 224, cover))


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_block_shrink_averages_whole_blocks_and_the_cut_ones_by_the_pixels_they_have(dtype):
    rng = np.random.default_rng(7)
    frame = rng.integers(0, 4096, (2021, 1655)).astype(dtype)
    out, cover = block_shrink(frame, 2)
    assert out.shape == (1011, 828) and out.dtype == frame.dtype and cover == Cover(2021, 1655, 2)
    assert np.array_equal(out[:1010, :827], cv2.resize(frame[:2020, :1654], (827, 1010), interpolation=cv2.INTER_AREA))
    tol = 0.5 if dtype == np.uint16 else 1e-3  # integer frames: means rounded to whole values
    assert np.abs(out[:1010, 827] - frame[:2020, 1654].astype(float).reshape(1010, 2).mean(1)).max() <= tol
    assert np.abs(out[1010, :827] - frame[2020, :1654].astype(float).reshape(827, 2).mean(1)).max() <= tol
    assert out[1010, 827] == frame[2020, 1654]
    assert cover.whole(out).shape == (1010, 827)
    even, _ = block_shrink(frame[:2020, :1654], 2)  # whole blocks only: OpenCV's integer-ratio resize itself
    assert np.array_equal(even, cv2.resize(frame[:2020, :1654], (827, 1010), interpolation=cv2.INTER_AREA))


@pytest.mark.parametrize("shape, factor", [((2021, 1655), 2), ((1601, 1400), 2), ((1900, 2047), 4), ((1800, 1500), 2)])
def test_area_shrink_of_a_block_shrink_keeps_the_frame_geometry(shape, factor):
    """A frame that is constant on each block: block_shrink loses nothing, so the model input from
    it must be the frame's own area resize, however many rows and columns the last blocks have."""
    rng = np.random.default_rng(shape[0])
    blocks = cv2.GaussianBlur(rng.integers(0, 256, (-(-shape[0] // factor), -(-shape[1] // factor)), dtype=np.uint8),
                              (0, 0), 3)
    frame = np.kron(blocks, np.ones((factor, factor), np.uint8))[: shape[0], : shape[1]]
    shrunk, cover = block_shrink(frame, factor)
    assert np.array_equal(shrunk, blocks)
    ours = to_model_input(shrunk, cover=cover)[..., 0].astype(int)
    theirs = cv2.resize(frame, (224, 224), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(ours - theirs).max() <= 1 and np.mean(ours != theirs) < 0.01
    # without the cover the partial strip would count as a whole pixel: the geometry shifts
    if shrunk.shape != (shape[0] // factor, shape[1] // factor):
        shifted = area_shrink(shrunk, 224).astype(int)
        assert np.abs(shifted - theirs).max() > 1
