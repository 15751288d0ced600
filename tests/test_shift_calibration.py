"""Calibration under simulated acquisition shift (`batchcxr calibrate --shift-copies`)."""

from __future__ import annotations

import shutil

import numpy as np
from click.testing import CliRunner

from batchcxr.cli import main
from batchcxr.evaluation.shift import ShiftRanges, perturb, shifted_copies
from batchcxr.modelcard import read_card
from batchcxr.paths import MODELS_DIR


def _film() -> np.ndarray:
    ramp = np.linspace(20, 235, 64, dtype=np.float32)
    return np.round(np.add.outer(ramp, ramp) / 2).astype(np.uint8)[..., None]


def test_each_shift_does_what_it_names():
    film = _film()
    same = ShiftRanges(gamma=(1.0, 1.0), contrast=(1.0, 1.0), blur_sigma=(0.0, 0.0), noise_sigma=(0.0, 0.0))
    assert np.array_equal(perturb(film, np.random.default_rng(0), same), film)
    darker = perturb(film, np.random.default_rng(0), ShiftRanges(gamma=(2.0, 2.0), contrast=(1.0, 1.0),
                                                                 blur_sigma=(0.0, 0.0), noise_sigma=(0.0, 0.0)))
    assert darker.shape == film.shape and darker.dtype == np.uint8
    assert (darker <= film).all() and darker.mean() < film.mean() - 20  # gamma 2 darkens the mid-greys
    flatter = perturb(film, np.random.default_rng(0), ShiftRanges(gamma=(1.0, 1.0), contrast=(0.5, 0.5),
                                                                  blur_sigma=(0.0, 0.0), noise_sigma=(0.0, 0.0)))
    assert abs(flatter.std() - 0.5 * film.std()) < 1.0 and abs(flatter.mean() - film.mean()) < 1.0
    noisy = perturb(film, np.random.default_rng(0), ShiftRanges(gamma=(1.0, 1.0), contrast=(1.0, 1.0),
                                                                blur_sigma=(0.0, 0.0), noise_sigma=(0.04, 0.04)))
    assert 7 < (noisy.astype(float) - film).std() < 13  # 0.04 of full scale: ~10 grey levels


def test_copies_are_seeded_and_in_blocks():
    x = np.stack([_film(), 255 - _film(), np.full((64, 64, 1), 128, np.uint8)])
    a, b = shifted_copies(x, 2, seed=3), shifted_copies(x, 2, seed=3)
    assert a.shape == (6, 64, 64, 1) and np.array_equal(a, b)
    assert not np.array_equal(a, shifted_copies(x, 2, seed=4))
    assert not np.array_equal(a[:3], a[3:])  # each copy draws anew
    assert max(a[2].std(), a[5].std()) < 15 < min(a[0].std(), a[1].std(), a[3].std())  # block order: x[i] at i, i + 3
    assert shifted_copies(x, 0).shape == (0, 64, 64, 1)


def test_calibrate_with_shifted_copies_is_less_sure_and_says_how_it_was_fitted(tmp_path, shared_data):
    """On the shipped CNN: the fit on validation plus shifted copies has a flatter slope than the
    fit on validation alone (the copies score less cleanly), the card says what it was fitted on
    with the copies' ECE before and after, and the version changes with it."""
    copy = tmp_path / "cnn"
    shutil.copytree(MODELS_DIR / "cnn", copy)
    shipped = read_card(MODELS_DIR / "cnn")
    result = CliRunner().invoke(main, ["calibrate", "--model", str(copy), "--data", str(shared_data / "chest_xray_224"),
                                       "--shift-copies", "2"])
    assert result.exit_code == 0, result.output
    assert "shifted copies ECE" in result.output
    card = read_card(copy)
    c = card["calibration"]
    assert c["a"] < shipped["calibration"]["a"] - 0.2
    assert "simulated acquisition shift" in c["fitted_on"]
    assert c["shift"]["copies"] == 2 and c["shift"]["ranges"]["gamma"] == [0.5, 2.0]
    assert c["shift"]["ece_after"] < c["shift"]["ece_before"]
    assert card["version"] != shipped["version"] and card["test_metrics"] is None
    assert "shifted copies of each film" in (copy / "card.md").read_text()


def test_shift_copies_are_refused_with_reviews(tmp_path):
    """calibrate --from-reviews and evaluate --against-reviews read reviewed studies: no images to perturb."""
    result = CliRunner().invoke(main, ["calibrate", "--model", str(MODELS_DIR / "cnn"), "--from-reviews",
                                       str(tmp_path / "new"), "--shift-copies", "2"])
    assert result.exit_code == 2 and "--shift-copies" in result.output
    result = CliRunner().invoke(main, ["evaluate", "--against-reviews", "--db", str(tmp_path / "r.sqlite"),
                                       "--shift-copies", "2"])
    assert result.exit_code == 2 and "--shift-copies" in result.output


def test_evaluate_reports_figures_on_shifted_copies(tmp_path, shared_data):
    """`evaluate --shift-copies 2`: the figures on two shifted copies of each image beside the
    plain ones, in the printed text, metrics.json and (with --update-card) the card and its command."""
    import json

    data = tmp_path / "data"
    for name in ("NORMAL", "PNEUMONIA"):
        (data / name).mkdir(parents=True)
        for path in sorted((shared_data / "chest_xray_224" / "test" / name).iterdir())[:10]:
            shutil.copy(path, data / name / path.name)
    copy = tmp_path / "cnn"
    shutil.copytree(MODELS_DIR / "cnn", copy)
    result = CliRunner().invoke(main, ["evaluate", "--model", str(copy), "--data", str(data), "--out",
                                       str(tmp_path / "out"), "--shift-copies", "2", "--update-card"])
    assert result.exit_code == 0, result.output
    measured = json.loads((tmp_path / "out" / "metrics.json").read_text())
    shifted = measured["shifted"]
    assert shifted["n"] == 2 * measured["n"] == 40 and shifted["copies"] == 2 and shifted["seed"] == 0
    assert shifted["ranges"] == ShiftRanges().as_dict()
    assert shifted["ece_raw"] != measured["calibration"]["raw"]["ece"]  # other inputs, other scores
    assert {"ece_calibrated", "roc_auc", "accuracy"} <= shifted.keys()
    assert "2 shifted copies of each image (seed 0" in result.output
    card = read_card(copy)
    assert card["test_metrics"]["shifted"] == shifted
    assert card["test_metrics"]["command"].endswith("--shift-copies 2")
    assert "2 shifted copies of each image" in (copy / "card.md").read_text()
