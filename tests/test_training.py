"""A tiny real training run, and the shipped models reproducing their cards on the test split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from batchcxr.cli import main
from batchcxr.infer.models import load_model
from batchcxr.modelcard import read_card
from batchcxr.paths import MODELS_DIR


@pytest.mark.parametrize("model", ["cnn", "mobilenetv2"])
def test_tiny_training_run_changes_weights(tmp_path, shared_data, imagenet_tflite, model):
    from batchcxr.training.architectures import build_cnn, build_mobilenetv2
    from batchcxr.training.train import TrainConfig, train

    cfg = TrainConfig(model=model, data_dir=shared_data / "chest_xray_224" / "train", out_dir=tmp_path / model,
                      epochs=1, head_epochs=1, limit_per_class=16, tflite_path=imagenet_tflite)
    result = train(cfg)
    trained = load_model(result.model_dir).keras_model
    import keras

    keras.utils.set_random_seed(cfg.seed)
    fresh = build_cnn() if model == "cnn" else build_mobilenetv2(imagenet_tflite)
    layer = "pneumonia"
    assert not np.allclose(trained.get_layer(layer).get_weights()[0], fresh.get_layer(layer).get_weights()[0])
    card = read_card(result.model_dir)
    assert card["threshold"]["chosen_on"].startswith("the patient-level validation split")
    assert card["test_metrics"] is None  # training never looks at test
    assert card["version"].startswith(f"{model}-")
    assert card["training_data"]["train_counts"]["NORMAL"] + card["training_data"]["val_counts"]["NORMAL"] == 16


@pytest.mark.parametrize("name", ["cnn", "mobilenetv2"])
def test_shipped_model_reproduces_its_card_on_test(tmp_path, shared_data, name):
    card = read_card(MODELS_DIR / name)
    assert card["test_metrics"], f"{name}: card has no test metrics; run batchcxr evaluate --update-card"
    result = CliRunner().invoke(main, ["evaluate", "--model", str(MODELS_DIR / name),
                                       "--data", str(shared_data / "chest_xray_224" / "test"),
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    measured = json.loads((tmp_path / "metrics.json").read_text())
    expected = card["test_metrics"]
    for key in ("n", "threshold", "model_version", "file_list_sha256"):
        assert measured[key] == expected[key], key
    # identical up to floating-point noise between machines: at most one image may flip
    assert abs(measured["accuracy"] - expected["accuracy"]) <= 1 / measured["n"] + 1e-4
    assert abs(measured["roc_auc"] - expected["roc_auc"]) <= 1e-3
    got = measured["confusion_matrix"]["rows_true_cols_predicted"]
    want = expected["confusion_matrix"]["rows_true_cols_predicted"]
    assert all(abs(g - w) <= 1 for gr, wr in zip(got, want) for g, w in zip(gr, wr)), (got, want)
    assert "accuracy  " in result.output and "ROC AUC   " in result.output
    occlusion = measured["occlusion"]  # the same images with only their lungs, or only the rest, left
    assert occlusion["as_is"]["roc_auc"] == measured["roc_auc"]
    assert {"lungs_only", "outside_only"} <= occlusion.keys() and "- occlusion" in result.output
    assert (tmp_path / "roc.png").stat().st_size > 1000
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000


@pytest.mark.parametrize("name", ["cnn", "mobilenetv2"])
def test_card_matches_weights(name):
    from batchcxr.modelcard import model_version, sha256_file

    card = read_card(MODELS_DIR / name)
    digest = sha256_file(MODELS_DIR / name / card["weights"]["file"])
    assert card["weights"]["sha256"] == digest
    assert card["version"] == model_version(name, digest, card.get("calibration"))
    for key in ("architecture", "preprocessing", "threshold", "training_data", "hyperparameters",
                "validation_metrics", "library_versions", "created"):
        assert card[key], key


def test_cnn_dense_kinds_build_the_head_their_card_names():
    """--cnn-dense: batchnorm is Dense without bias -> BatchNormalization -> ReLU, leaky a Dense with
    a leaky ReLU; the card's architecture summary says which; relu is the reference's Dense."""
    import keras

    from batchcxr.training.architectures import LEAKY_SLOPE, build_cnn
    from batchcxr.training.train import TrainConfig, _architecture_summary

    def head(model):
        names = [layer.name for layer in model.layers]
        return names[names.index("dense"):names.index("dropout")]

    def summary(model, dense):
        return _architecture_summary(model, TrainConfig(model="cnn", data_dir=MODELS_DIR, out_dir=MODELS_DIR,
                                                        cnn_dense=dense))

    plain, normed, leaky = build_cnn(), build_cnn(dense="batchnorm"), build_cnn(dense="leaky")
    assert head(plain) == ["dense"] and plain.get_layer("dense").use_bias
    assert head(normed) == ["dense", "dense_bn", "dense_relu"] and not normed.get_layer("dense").use_bias
    assert head(leaky) == ["dense", "dense_relu"]
    assert isinstance(leaky.get_layer("dense_relu"), keras.layers.LeakyReLU)
    assert leaky.get_layer("dense_relu").negative_slope == pytest.approx(LEAKY_SLOPE)
    assert "Dense 64 ReLU," in summary(plain, "relu")
    assert "Dense 64 + BatchNorm + ReLU," in summary(normed, "batchnorm")
    assert f"Dense 64 LeakyReLU {LEAKY_SLOPE}," in summary(leaky, "leaky")


def test_aspect_jitter_stretches_width_only():
    from batchcxr.training.architectures import AugmentConfig, build_augmenter

    augment = build_augmenter(AugmentConfig(zoom=0, shear=0, horizontal_flip=False, aspect=0.3), seed=3)
    x = np.zeros((16, 224, 224, 1), np.float32)
    x[:, :, 100:124] = 255  # a vertical bar 24 px wide, full height
    y = augment(x, training=True).numpy()[..., 0] > 127
    widths = y[:, 112].sum(axis=1)
    heights = y[:, :, 112].sum(axis=1)
    assert len(set(widths.tolist())) > 3  # the width changes from image to image
    assert (heights == 224).all()  # the height never does


def test_corner_erasing_blanks_whole_corners_only_in_training():
    from batchcxr.training.architectures import AugmentConfig, build_augmenter

    augment = build_augmenter(AugmentConfig(zoom=0, shear=0, horizontal_flip=False, corners=0.5), seed=5)
    x = np.full((32, 224, 224, 1), 255.0, np.float32)
    y = augment(x, training=True).numpy()[..., 0]
    corners = np.stack([y[:, :56, :56], y[:, :56, -56:], y[:, -56:, :56], y[:, -56:, -56:]], axis=1)
    per_corner = corners.reshape(32, 4, -1)
    assert set(np.unique(per_corner.min(axis=2) == per_corner.max(axis=2))) == {True}  # all or nothing
    erased = (per_corner.max(axis=2) == 0).mean()
    assert 0.3 < erased < 0.7
    assert (y[:, 56:-56] == 255).all() and (y[:, :, 56:-56] == 255).all()  # the rest untouched
    assert (augment(x, training=False).numpy() == x).all()


def test_centre_swap_gives_images_another_images_central_band_only_in_training():
    from batchcxr.training.architectures import CENTRE_BAND, AugmentConfig, build_augmenter

    augment = build_augmenter(AugmentConfig(zoom=0, shear=0, horizontal_flip=False, centre=0.5), seed=5)
    x = np.stack([np.full((224, 224, 1), float(v), np.float32) for v in range(32)])  # image i is all i
    y = augment(x, training=True).numpy()[..., 0]
    cols = np.arange(224, dtype=np.float32) / 224
    in_band = np.flatnonzero((cols >= 0.5 - CENTRE_BAND / 2) & (cols < 0.5 + CENTRE_BAND / 2))
    lo, hi = in_band[0], in_band[-1] + 1
    assert 60 < hi - lo < 70  # 30 % of 224
    own = np.arange(32, dtype=np.float32)[:, None, None]
    assert (y[:, :, :lo] == own).all() and (y[:, :, hi:] == own).all()  # outside the band: untouched
    band = y[:, :, lo:hi]
    assert (band == band[:, :1, :1]).all()  # the whole band comes from one image
    sources = band[:, 0, 0]
    assert set(sources.tolist()) <= set(range(32))
    swapped = (sources != np.arange(32)).mean()
    assert 0.2 < swapped < 0.7  # about half the images (a permutation can map one to itself)
    assert (augment(x, training=False).numpy() == x).all()


def test_outside_swap_gives_images_another_images_pixels_outside_their_own_lungs_only_in_training():
    from batchcxr.training.architectures import outside_swapper

    swap = outside_swapper(0.5, seed=5)
    x = np.stack([np.full((224, 224, 1), float(v), np.float32) for v in range(32)])  # image i is all i
    lungs = np.zeros((32, 224, 224, 1), np.uint8)
    for i in range(32):  # each image its own lungs: two fields whose width varies with i
        lungs[i, 40:200, 20:100 - i] = lungs[i, 40:200, 124 + i:204] = 1
    y = swap((x, lungs), training=True).numpy()[..., 0]
    own = np.arange(32, dtype=np.float32)[:, None, None]
    inside = lungs[..., 0] == 1
    assert (y[inside] == np.broadcast_to(own, y.shape)[inside]).all()  # the lungs: untouched
    for i in range(32):
        out = y[i][~inside[i]]
        assert (out == out[0]).all()  # all of the outside comes from one image of the batch
    sources = y[:, 0, 0]
    assert set(sources.tolist()) <= set(range(32))
    assert 0.2 < (sources != np.arange(32)).mean() < 0.7  # about half the images
    assert (np.asarray(swap((x, lungs), training=False)[0]) == x).all()  # scoring sees the image as it is


def test_lungs_in_input_is_the_dilated_lung_fields_in_the_frame_the_classifier_sees():
    """For ``crop`` the mask covers the crop's lungs (the box is the lungs' box plus a margin, so
    the lungs fill most of it); with no lungs found it is all ones (nothing is called outside)."""
    from batchcxr.normalize.lungfield import LUNG_SIZE, lungs_in_input

    p = np.zeros((LUNG_SIZE, LUNG_SIZE), np.float32)
    p[LUNG_SIZE // 5 : LUNG_SIZE * 4 // 5, LUNG_SIZE // 8 : LUNG_SIZE * 3 // 8] = 1
    p[LUNG_SIZE // 5 : LUNG_SIZE * 4 // 5, LUNG_SIZE * 5 // 8 : LUNG_SIZE * 7 // 8] = 1
    crop = lungs_in_input(p, "crop", 224)
    whole = lungs_in_input(p, "none", 224)
    assert crop.shape == whole.shape == (224, 224) and crop.dtype == np.uint8
    assert 0.15 < whole.mean() < 0.5 < crop.mean() < 0.9
    assert crop[:, 112].sum() == 0 and crop[112, 30] == 1  # the gap between the lungs stays outside
    segmented = lungs_in_input(p, "crop", 224, dilated=False)  # same box, the fields as drawn
    assert (segmented <= crop).all() and 0.5 * crop.sum() < segmented.sum() < 0.95 * crop.sum()
    assert lungs_in_input(np.zeros_like(p), "crop", 224).all()


def test_outside_share_is_the_part_of_positive_evidence_outside_the_lungs():
    """Evidence (activation x gradient, summed over channels, negative cells dropped) all inside
    the mask gives 0, all outside nearly 1 (the floor adds a tenth of the batch's mean evidence to
    each denominator), half and half one half of that; an image with no positive evidence 0."""
    from batchcxr.training.guidance import outside_share

    lungs = np.zeros((4, 4, 4), np.float32)
    lungs[:, :, :2] = 1  # the left half is lung
    features = np.ones((4, 4, 4, 2), np.float32)
    gradients = np.zeros((4, 4, 4, 2), np.float32)
    gradients[0, :, :2] = 1  # inside only
    gradients[1, :, 2:] = 1  # outside only
    gradients[2] = 1  # everywhere
    gradients[3] = -1  # evidence against: none for pneumonia
    share = np.asarray(outside_share(features, gradients, lungs))
    mean_total = (16 + 16 + 32 + 0) / 4
    np.testing.assert_allclose(share, [0, 16 / (16 + 0.1 * mean_total), 16 / (32 + 0.1 * mean_total), 0], atol=1e-5)


def test_lung_guided_batches_move_each_mask_with_its_image():
    """With --lung-guidance the geometric augmentation (band swap, corners, rotation, zoom, shear,
    flip...) moves each lung mask exactly as its image, and contrast and brightness leave the
    mask alone. Images that are 255 x their own mask stay equal to it after augmentation."""
    from batchcxr.training.architectures import AugmentConfig
    from batchcxr.training.train import _dataset

    rng = np.random.default_rng(0)
    lungs = np.zeros((16, 224, 224), np.uint8)
    for i in range(16):  # each its own off-centre field, so a flip or shift shows
        top, left = rng.integers(10, 60, 2)
        lungs[i, top:top + 120, left:left + 60 + 4 * i] = 1
    x = (lungs * 255)[..., None]
    y = np.arange(16) % 2
    geometric = AugmentConfig(rotation=0.05, translation=0.1, zoom=0.2, shear=0.1, corners=0.5, centre=0.75)
    for (images, masks), _ in _dataset(x, y, 8, 3, geometric, lungs, guided=True):
        images, masks = images.numpy(), masks.numpy()
        assert masks.shape == images.shape and not (masks == x[:8] / 255).all()  # something moved
        np.testing.assert_allclose(images / 255, masks, atol=1e-4)
    photometric = AugmentConfig(zoom=0.0, shear=0.0, horizontal_flip=False, contrast=0.5, brightness=0.5)
    for (images, masks), _ in _dataset(x, y, 8, 3, photometric, lungs, guided=True):
        assert set(np.unique(masks.numpy())) <= {0.0, 1.0}
        assert not np.allclose(images.numpy() / 255, masks.numpy())  # the image's exposure did change


def test_mixup_blends_images_labels_and_class_weights_alike():
    """--mixup: each training image is blended with another of its batch, and its label and class
    weight by the same amount (images 255 x their label stay 255 x their mixed label; class weights
    1 and 3 stay 1 + 2 x the mixed label); validation batches are not mixed."""
    from batchcxr.training.train import _dataset

    y = np.arange(64) % 2
    x = np.broadcast_to((y * 255).astype(np.uint8)[:, None, None, None], (64, 224, 224, 1)).copy()
    labels = []
    for images, mixed_y, weights in _dataset(x, y, 16, 3, mixup=0.4, class_weight={0: 1.0, 1: 3.0}):
        images, mixed_y, weights = images.numpy(), mixed_y.numpy(), weights.numpy()
        np.testing.assert_allclose(images[:, 0, 0, 0] / 255, mixed_y, atol=1e-5)
        np.testing.assert_allclose(images.std(axis=(1, 2, 3)), 0, atol=1e-3)  # whole images blended
        np.testing.assert_allclose(weights, 1 + 2 * mixed_y, atol=1e-5)
        labels.extend(mixed_y)
    labels = np.array(labels)
    assert ((labels >= 0) & (labels <= 1)).all() and ((labels > 0.05) & (labels < 0.95)).sum() > 8
    for images, plain in _dataset(x, y, 16, 3):
        assert set(np.unique(plain.numpy())) <= {0, 1}


def test_shift_augmentation_perturbs_that_share_of_training_images():
    """--shift P: about P of the training images get an acquisition-shift copy (evaluation.shift),
    the rest pass unchanged; validation batches are never shifted."""
    from batchcxr.training.architectures import AugmentConfig
    from batchcxr.training.train import _dataset

    rng = np.random.default_rng(0)
    x = rng.integers(30, 220, (200, 224, 224, 1), dtype=np.uint8)
    y = np.arange(200) % 2
    plain = AugmentConfig(zoom=0.0, shear=0.0, horizontal_flip=False)
    shifted = AugmentConfig(zoom=0.0, shear=0.0, horizontal_flip=False, shift=0.5)
    seen = {}
    for images, _ in _dataset(x, y, 50, 3, shifted):
        for image in images.numpy():
            match = [k for k in range(len(x)) if np.array_equal(image, x[k].astype(np.float32))]
            seen[image.tobytes()] = bool(match)
    unchanged = sum(seen.values())
    assert len(seen) == 200 and 60 < unchanged < 140  # ~half shifted, each image once
    for images, _ in _dataset(x, y, 50, 3, plain):
        assert all(any(np.array_equal(i, x[k].astype(np.float32)) for k in range(len(x))) for i in images.numpy())
    for k, (images, _) in enumerate(_dataset(x, y, 50, 3)):  # validation: in order, as they are
        np.testing.assert_array_equal(images.numpy(), x[50 * k : 50 * k + 50].astype(np.float32))


def test_lung_guidance_moves_evidence_into_the_lungs():
    """A few steps of the guided loss on one batch lower its share of evidence outside the lung
    masks; the same steps without the term (weight 0) do not lower it as much."""
    import keras

    from batchcxr.training.architectures import build_cnn
    from batchcxr.training.guidance import lung_guided

    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (16, 224, 224, 1)).astype(np.float32)
    lungs = np.zeros((16, 224, 224, 1), np.float32)
    lungs[:, 40:200, 20:100] = lungs[:, 40:200, 124:204] = 1
    y = (np.arange(16) % 2).astype(np.float32)
    after = {}
    for weight in (0.0, 5.0):
        keras.utils.set_random_seed(7)
        guided = lung_guided(build_cnn(), "cnn", weight)
        guided.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
        before = guided.outside_shares(x, lungs).mean()
        guided.fit((x, lungs), y, batch_size=16, epochs=8, verbose=0)
        after[weight] = guided.outside_shares(x, lungs).mean()
        assert 0.2 < before < 0.8
    assert after[5.0] < 0.5 * before and after[5.0] < after[0.0] - 0.1


def test_calibrate_reproduces_the_shipped_cnns_calibration(tmp_path, shared_data):
    """`batchcxr calibrate` on a copy of the shipped CNN fits the card's Platt parameters again on
    the validation split (so the card's calibration is what the command makes) and clears the
    test metrics until the model is evaluated again."""
    import shutil

    copy = tmp_path / "cnn"
    shutil.copytree(MODELS_DIR / "cnn", copy)
    result = CliRunner().invoke(main, ["calibrate", "--model", str(copy), "--data", str(shared_data / "chest_xray_224")])
    assert result.exit_code == 0, result.output
    shipped, fitted = read_card(MODELS_DIR / "cnn")["calibration"], read_card(copy)["calibration"]
    assert abs(fitted["a"] - shipped["a"]) < 1e-3 and abs(fitted["b"] - shipped["b"]) < 1e-3
    assert fitted["validation_ece_after"] < fitted["validation_ece_before"]
    assert read_card(copy)["test_metrics"] is None
