"""`batchcxr train --model lungs`: a small U-Net lung-field segmenter.

Trained on ``lung_masks_cxr256`` (90 adult frontal CXRs with human-drawn lung masks; images from
the COVID-19 image data collection, polygons by V7 Labs, both CC BY). A seeded part is held out
for the card's Dice. The segmenter sees what scoring gives it: the squashed 224 px model input,
area-resized to ``LUNG_SIZE``. Augmentation leans towards the paediatric Kaggle images it must
also work on (smaller thorax in the frame, other exposure, squashed aspect).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from batchcxr.modelcard import WEIGHTS_FILE, model_version, sha256_file, write_card
from batchcxr.normalize.contract import to_model_input
from batchcxr.normalize.lungfield import LUNG_SIZE, clean_mask, lung_input

log = logging.getLogger(__name__)

LUNG_SOURCE = (
    "lung_masks_cxr256: 90 adult frontal chest radiographs (PA, AP, AP supine; COVID-19 pneumonia) with "
    "human-drawn lung-field masks. Images: J. P. Cohen, P. Morrison, L. Dao, 'COVID-19 image data "
    "collection', arXiv:2003.11597 (2020), each image under CC BY 3.0 or CC BY 4.0 as its pairs.csv row "
    "states (image_doi, image_url credit each source). Lung polygons: V7 Labs, 'COVID-19 chest X-ray "
    "dataset' annotations (github.com/v7labs/covid-19-xray-dataset), CC BY 4.0."
)
SCORING_FILE = "scoring.onnx"


@dataclass(frozen=True)
class LungTrainConfig:
    data_dir: Path
    out_dir: Path
    seed: int = 42
    held_out: int = 15
    """Pairs kept out of training for the card's Dice."""
    epochs: int = 30
    samples_per_epoch: int = 2400
    batch_size: int = 16
    learning_rate: float = 2e-3
    filters: tuple[int, ...] = (8, 16, 32, 64)


def list_pairs(root: Path) -> list[dict[str, str]]:
    """The rows of pairs.csv (id, image, mask, licence and provenance columns)."""
    path = Path(root) / "pairs.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: lung mask pairs table not found")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def split_pairs(rows: list[dict[str, str]], held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    ids = sorted(r["id"] for r in rows)
    random.Random(seed).shuffle(ids)
    test = set(ids[:held_out])
    return [r for r in rows if r["id"] not in test], [r for r in rows if r["id"] in test]


def _load_pair(root: Path, row: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    image = cv2.imread(str(root / row["image"]), cv2.IMREAD_GRAYSCALE)
    mask = cv2.imread(str(root / row["mask"]), cv2.IMREAD_GRAYSCALE)
    if image is None or mask is None:
        raise ValueError(f"{root / row['image']}: cannot read the image or its mask")
    return image, (mask > 127).astype(np.uint8)


def segmenter_input(gray: np.ndarray) -> np.ndarray:
    """Any uint8 grayscale image -> the segmenter input, as scoring makes it (224 px contract, then
    LUNG_SIZE)."""
    return lung_input(to_model_input(gray))


def target_mask(mask: np.ndarray) -> np.ndarray:
    """A 0/1 mask at LUNG_SIZE (area-resampled, thresholded at 50 %)."""
    small = cv2.resize(mask.astype(np.float32), (LUNG_SIZE, LUNG_SIZE), interpolation=cv2.INTER_AREA)
    return (small >= 0.5).astype(np.uint8)


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random view of a pair: affine (zoom out more than in, rotation, shift, aspect squash,
    flip), then exposure (contrast, brightness, gamma, blur, noise). Image uint8, mask 0/1."""
    h, w = image.shape
    scale = rng.uniform(0.6, 1.15)
    aspect = np.exp(rng.uniform(-0.25, 0.25))
    angle = rng.uniform(-10, 10)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    m[:, :2] = m[:, :2] @ np.diag([scale * aspect, scale])
    m[:, 2] += (np.array([w / 2, h / 2]) - m[:, :2] @ np.array([w / 2, h / 2]))
    m[:, 2] += rng.uniform(-0.12, 0.12, 2) * [w, h]
    fill = int(rng.choice([0, rng.integers(0, 256)]))
    img = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    msk = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if rng.random() < 0.5:
        img, msk = img[:, ::-1], msk[:, ::-1]
    x = img.astype(np.float32) / 255.0
    x = np.clip((x - 0.5) * rng.uniform(0.6, 1.5) + 0.5 + rng.uniform(-0.15, 0.15), 0, 1)
    x = x ** rng.uniform(0.6, 1.6)
    if rng.random() < 0.3:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.5, 2.0))
    if rng.random() < 0.3:
        x = np.clip(x + rng.normal(0, rng.uniform(0.01, 0.05), x.shape), 0, 1)
    return np.rint(x * 255).astype(np.uint8), np.ascontiguousarray(msk)


def build_unet(filters: tuple[int, ...] = (8, 16, 32, 64)):
    """A small U-Net: (LUNG_SIZE, LUNG_SIZE, 1) 0..255 in, P(lung) per pixel out."""
    import keras
    from keras import layers

    inputs = keras.Input((LUNG_SIZE, LUNG_SIZE, 1), name="image")
    x = layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
    skips = []
    for i, f in enumerate(filters):
        x = layers.Conv2D(f, 3, padding="same", activation="relu", name=f"down{i}a")(x)
        x = layers.Conv2D(f, 3, padding="same", activation="relu", name=f"down{i}b")(x)
        if i < len(filters) - 1:
            skips.append(x)
            x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    for i, f in reversed(list(enumerate(filters[:-1]))):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"up{i}")(x)
        x = layers.Concatenate(name=f"skip{i}")([x, skips[i]])
        x = layers.Conv2D(f, 3, padding="same", activation="relu", name=f"dec{i}a")(x)
        x = layers.Conv2D(f, 3, padding="same", activation="relu", name=f"dec{i}b")(x)
    x = layers.Conv2D(1, 1, activation="sigmoid", name="mask")(x)
    outputs = layers.Reshape((LUNG_SIZE, LUNG_SIZE), name="lungs")(x)
    return keras.Model(inputs, outputs, name="lungs")


def _dice_bce(y_true, y_pred):
    from keras import ops

    y_true = ops.cast(y_true, "float32")
    eps = 1e-6
    p = ops.clip(y_pred, eps, 1 - eps)
    bce = -ops.mean(y_true * ops.log(p) + (1 - y_true) * ops.log(1 - p))
    inter = ops.sum(y_true * y_pred, axis=(1, 2))
    dice = (2 * inter + 1) / (ops.sum(y_true, axis=(1, 2)) + ops.sum(y_pred, axis=(1, 2)) + 1)
    return bce + (1 - ops.mean(dice))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def _epoch_data(pairs, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for k in range(n):
        image, mask = pairs[k % len(pairs)]
        img, msk = augment(image, mask, rng)
        xs.append(segmenter_input(img))
        ys.append(target_mask(msk))
    order = rng.permutation(n)
    return np.stack(xs)[order][..., np.newaxis], np.stack(ys)[order]


def predict_masks(model, inputs: np.ndarray) -> np.ndarray:
    """P(lung) maps for (N, LUNG_SIZE, LUNG_SIZE) uint8 inputs."""
    return model.predict(inputs[..., np.newaxis].astype(np.float32), batch_size=32, verbose=0)


def held_out_dice(model, root: Path, rows: list[dict]) -> dict[str, float]:
    """Dice of the cleaned mask against the human mask, at LUNG_SIZE, on the held-out pairs."""
    pairs = [_load_pair(root, r) for r in rows]
    probs = predict_masks(model, np.stack([segmenter_input(img) for img, _ in pairs]))
    scores = [dice(clean_mask(p), target_mask(m)) for p, (_, m) in zip(probs, pairs)]
    return {"n": len(scores), "mean": round(float(np.mean(scores)), 4), "median": round(float(np.median(scores)), 4),
            "min": round(float(np.min(scores)), 4),
            "per_image": {r["id"]: round(s, 4) for r, s in zip(rows, scores)}}


def export_lungs_onnx(model, path: Path) -> Path:
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, LUNG_SIZE, LUNG_SIZE, 1), tf.float32, name="image"),)
    tmp = Path(path).with_suffix(".onnx.tmp")
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=str(tmp))
    tmp.replace(path)
    return Path(path)


def train_lungs(cfg: LungTrainConfig) -> dict:
    """Train for a fixed schedule, then measure Dice once on the held-out pairs (they choose nothing);
    save weights, ONNX graph and card."""
    import keras
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    start = time.monotonic()
    keras.utils.set_random_seed(cfg.seed)
    root = Path(cfg.data_dir)
    rows = list_pairs(root)
    train_rows, test_rows = split_pairs(rows, cfg.held_out, cfg.seed)
    pairs = [_load_pair(root, r) for r in train_rows]
    model = build_unet(cfg.filters)
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss=_dice_bce)
    rng = np.random.default_rng(cfg.seed)
    schedule = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, cfg.epochs)
    for epoch in range(cfg.epochs):
        model.optimizer.learning_rate.assign(float(schedule(epoch)))
        x, y = _epoch_data(pairs, rng, cfg.samples_per_epoch)
        hist = model.fit(x, y, batch_size=cfg.batch_size, epochs=1, verbose=0)
        log.info("lungs epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, hist.history["loss"][-1])
    result = held_out_dice(model, root, test_rows)
    log.info("held-out Dice: mean %.4f, median %.4f, min %.4f", result["mean"], result["median"], result["min"])

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    model.save(weights)
    digest = sha256_file(weights)
    onnx_path = export_lungs_onnx(model, out / SCORING_FILE)
    card = {
        "name": out.name,
        "model": "lungs",
        "version": model_version(out.name, digest),
        "architecture": {"summary": f"U-Net, {len(cfg.filters)} levels, filters {list(cfg.filters)}, "
                                    "2 x Conv3x3+ReLU per level, bilinear up-sampling, sigmoid per pixel",
                         "parameters": int(model.count_params())},
        "preprocessing": {"input": f"the classifiers' 224 x 224 uint8 input, cv2.INTER_AREA to {LUNG_SIZE} x "
                                   f"{LUNG_SIZE}, float32 0..255 (scaling inside the model)",
                          "output": f"P(lung) per pixel, {LUNG_SIZE} x {LUNG_SIZE}; normalize.lungfield."
                                    "clean_mask keeps the two largest components at 0.5, holes filled"},
        "training_data": {"source": LUNG_SOURCE, "pairs": len(rows), "train": len(train_rows),
                          "held_out": sorted(r["id"] for r in test_rows),
                          "split": f"seeded shuffle of the pair ids (seed {cfg.seed}), {cfg.held_out} held out",
                          "attribution_file": "pairs.csv (image_license, image_doi, image_url per image)"},
        "hyperparameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()
                            if k not in ("data_dir", "out_dir")} | {
            "loss": "binary cross-entropy + (1 - soft Dice)", "optimizer": "Adam, cosine decay",
            "augmentation": "affine (zoom 0.6-1.15, aspect 0.78-1.28, rotation 10 deg, shift 12 %, flip), "
                            "contrast, brightness, gamma, blur, noise"},
        "held_out_dice": result,
        "threshold": {"value": 0.5, "rule": "fixed", "chosen_on": "not tuned"},
        "library_versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                             "keras": keras.__version__, "numpy": np.__version__, "opencv": cv2.__version__},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "weights": {"file": WEIGHTS_FILE, "sha256": digest},
        "scoring": {"file": SCORING_FILE, "sha256": sha256_file(onnx_path),
                    "runtime": f"onnxruntime {onnxruntime.__version__} (exported with tf2onnx {tf2onnx.__version__}, "
                               "opset 17)",
                    "outputs": f"lungs (N, {LUNG_SIZE}, {LUNG_SIZE}): P(lung)"},
        "training_seconds": round(time.monotonic() - start, 1),
    }
    write_card(out, card)
    (out / "held_out_dice.json").write_text(json.dumps(result, indent=2) + "\n")
    return card
