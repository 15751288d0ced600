"""`batchcxr train`: train one model on a Kaggle-layout folder and write models/NAME/.

Only the train split is read. A patient-level, stratified, seeded validation
split is carved out of it; epochs (early stopping), learning-rate drops and the
decision threshold are chosen on that split alone.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from batchcxr.evaluation.metrics import binary_metrics, choose_threshold
from batchcxr.modelcard import WEIGHTS_FILE, model_version, sha256_file, write_card
from batchcxr.paths import MODELS_DIR
from batchcxr.normalize.contract import PreprocessContract, finish_batch
from batchcxr.normalize.lungfield import lungs_in_input
from batchcxr.training.architectures import (
    LEAKY_SLOPE,
    AugmentConfig,
    build_augmenter,
    build_cnn,
    build_mobilenetv2,
    outside_swapper,
    set_trainable_from,
    shift_function,
)
from batchcxr.training.data import (
    CLASSES,
    SplitRule,
    file_list_sha256,
    limit_per_class,
    list_split,
    load_images,
    patient_split,
)
from batchcxr.training.guidance import lung_guided

log = logging.getLogger(__name__)

ModelName = Literal["cnn", "mobilenetv2"]
LUNG_FIELDS = ("dilated", "segmented")
"""Which lung fields the lung-aware training options use (TrainConfig.lung_fields)."""
DATA_SOURCE = (
    "Kermany, Zhang, Goldbaum: Chest X-Ray Images (Pneumonia), Mendeley Data v2 (2018), "
    "CC BY 4.0; Kaggle train split at 224 px"
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run."""

    model: ModelName
    data_dir: Path
    out_dir: Path
    seed: int = 42
    val_fraction: float = 0.15
    batch_size: int = 32
    epochs: int = 20
    """Upper bound; early stopping on validation AUC picks the epoch actually kept."""
    learning_rate: float = 1e-3
    """CNN: Adam learning rate. MobileNetV2: fine-tuning rate (the head uses head_learning_rate)."""
    patience: int = 4
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    dropout: float | None = None
    head_epochs: int = 40
    head_learning_rate: float = 1e-3
    fine_tune_from: str = "block_13_expand"
    tflite_path: Path | None = None
    threshold_rule: str = "eer"
    limit_per_class: int | None = None
    """Use at most this many images per class (quick runs, tests)."""
    equalize: bool = False
    """Histogram-equalize each input (recorded in the card's preprocessing contract)."""
    split: SplitRule = "random"
    """How validation patients are chosen (see ``patient_split``)."""
    label_smoothing: float = 0.0
    """Binary cross-entropy label smoothing (0: none)."""
    mixup: float = 0.0
    """Mixup's Beta(alpha, alpha) for the training batches (0: none; ``mixed``)."""
    lungs: str = "none"
    """Lung-field contract of the input (normalize.lungfield.LUNG_CONTRACTS)."""
    lung_model: Path | None = None
    """The lung segmenter folder (models/lungs) when ``lungs`` is not none."""
    cnn_head: str = "flatten"
    """CNN: Flatten (the reference's) or global average pooling before its Dense layer (CNN_HEADS)."""
    cnn_dense: str = "relu"
    """CNN: the head's hidden layer, Dense + ReLU (the reference's) or one of the others (CNN_DENSE)."""
    lung_guidance: float = 0.0
    """Weight of the loss term that charges evidence outside the lung fields (training.guidance;
    0: none). Needs a lung contract."""
    lung_fields: str = "dilated"
    """The lung fields --outside and --lung-guidance use: "dilated" (slightly, as evaluate's
    Grad-CAM mass) or "segmented" (as the segmenter drew them: the mediastinum between two small
    lungs is then outside)."""


@dataclass
class TrainResult:
    model_dir: Path
    threshold: float
    validation_metrics: dict[str, Any]
    epochs_run: int
    seconds: float


def _class_weight(y: np.ndarray) -> dict[int, float]:
    n = len(y)
    counts = np.bincount(y.astype(int), minlength=2)
    return {k: float(n / (2 * max(c, 1))) for k, c in enumerate(counts)}


def mixed(images, labels, weights, alpha: float, seed: int):
    """Mixup (Zhang et al., 2018) of one batch: each image blended with another image of the batch
    by lam ~ Beta(alpha, alpha), its label and its class weight by the same lam."""
    import tensorflow as tf

    n = tf.shape(images)[0]
    g1, g2 = tf.random.gamma([n], alpha, seed=seed), tf.random.gamma([n], alpha, seed=seed + 1)
    lam = g1 / tf.maximum(g1 + g2, 1e-12)
    other = tf.random.shuffle(tf.range(n), seed=seed + 2)

    def blend(v, w):
        return w * v + (1 - w) * tf.gather(v, other)

    return blend(images, lam[:, None, None, None]), blend(tf.cast(labels, tf.float32), lam), blend(weights, lam)


def _dataset(x: np.ndarray, y: np.ndarray, batch: int, seed: int, augment: AugmentConfig | None = None,
             lungs: np.ndarray | None = None, outside=None, guided: bool = False, mixup: float = 0.0,
             class_weight: dict[int, float] | None = None):
    """Batches of (float32 image, label); with ``augment``, shuffled and augmented. With
    ``lungs`` (each image's lung mask) and ``outside`` (architectures.outside_swapper), the
    outside of the lungs is swapped first, while masks and images still line up; with
    ``guided``, batches of ((image, lung mask), label) for guidance.lung_guided, the mask moved
    by the same geometric augmentation as its image (stacked as a second channel). With
    ``mixup`` (no lung masks), batches of (image, label, sample weight): augmented, then mixed
    (``mixed``), each sample weighted by ``class_weight`` of its label, mixed alike."""
    import tensorflow as tf

    geometry = photometric = None
    shifted = lambda a: a  # noqa: E731
    if augment is not None:
        geometry, photometric = build_augmenter(augment, seed, "geometry"), build_augmenter(augment, seed, "photometric")
        if augment.shift > 0:
            shifted = shift_function(augment.shift, seed)

    def augmented(a):
        return shifted(photometric(geometry(a, training=True), training=True))

    if mixup > 0 and lungs is not None:
        raise ValueError("mixup is not combined with --outside or --lung-guidance (their masks would need mixing too)")
    if lungs is None:
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if augment is not None:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch).map(lambda a, b: (tf.cast(a, tf.float32), b))
        if augment is not None:
            ds = ds.map(lambda a, b: (augmented(a), b), num_parallel_calls=tf.data.AUTOTUNE)
        if mixup > 0:
            table = tf.constant([(class_weight or {}).get(k, 1.0) for k in (0, 1)], tf.float32)
            ds = ds.map(lambda a, b: mixed(a, b, tf.gather(table, tf.cast(b, tf.int32)), mixup, seed))
        return ds.prefetch(tf.data.AUTOTUNE)

    def swapped(a, m, b):
        a, m = tf.cast(a, tf.float32), tf.cast(m[..., None], tf.float32)
        return (outside((a, m), training=True) if outside is not None else a), m, b

    def moved(a, m, b):
        if not guided:
            return augmented(a), m, b
        both = geometry(tf.concat([a, m], axis=-1), training=True)
        return shifted(photometric(both[..., :1], training=True)), both[..., 1:], b

    ds = tf.data.Dataset.from_tensor_slices((x, lungs, y))
    if augment is not None:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch).map(swapped)
    if augment is not None:
        ds = ds.map(moved, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda a, m, b: ((a, m), b) if guided else (a, b))
    return ds.prefetch(tf.data.AUTOTUNE)


def _callbacks(patience: int):
    import keras

    return [
        keras.callbacks.EarlyStopping(
            monitor="val_auc", mode="max", patience=patience, restore_best_weights=True
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.3, patience=max(1, patience // 2), min_lr=1e-6
        ),
    ]


def _compile(model, lr: float, label_smoothing: float = 0.0) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=[keras.metrics.AUC(name="auc"), "accuracy"],
    )


def _fit(model, cfg: TrainConfig, x_tr, y_tr, x_va, y_va, epochs: int, lr: float,
         lungs_tr: np.ndarray | None = None) -> int:
    guided = cfg.lung_guidance > 0
    trainer = lung_guided(model, cfg.model, cfg.lung_guidance) if guided else model
    _compile(trainer, lr, cfg.label_smoothing)
    outside = outside_swapper(cfg.augment.outside, cfg.seed) if cfg.augment.outside > 0 else None
    weights = _class_weight(y_tr)
    history = trainer.fit(
        _dataset(x_tr, y_tr, cfg.batch_size, cfg.seed, cfg.augment, lungs_tr, outside, guided, cfg.mixup, weights),
        validation_data=_dataset(x_va, y_va, cfg.batch_size, cfg.seed),
        epochs=epochs,
        class_weight=None if cfg.mixup > 0 else weights,  # with mixup, in the batches (mixed with the labels)
        callbacks=_callbacks(cfg.patience),
        verbose=1,
    )
    return len(history.history["loss"])


def _train_mobilenetv2_head(model, cfg: TrainConfig, x_tr, y_tr, x_va, y_va) -> int:
    """Phase 1: fit the head on cached backbone features (frozen backbone, no augmentation)."""
    import keras

    features = keras.Model(model.input, model.get_layer("gap").output)
    log.info("caching backbone features for %d + %d images", len(x_tr), len(x_va))
    f_tr = features.predict(x_tr.astype(np.float32), batch_size=64, verbose=1)
    f_va = features.predict(x_va.astype(np.float32), batch_size=64, verbose=1)
    dense = model.get_layer("pneumonia")
    head = keras.Sequential(
        [
            keras.Input((f_tr.shape[1],)),
            keras.layers.Dropout(model.get_layer("dropout").rate),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    _compile(head, cfg.head_learning_rate, cfg.label_smoothing)
    history = head.fit(
        f_tr,
        y_tr,
        validation_data=(f_va, y_va),
        epochs=cfg.head_epochs,
        batch_size=cfg.batch_size,
        class_weight=_class_weight(y_tr),
        callbacks=_callbacks(cfg.patience * 2),
        verbose=2,
    )
    dense.set_weights(head.layers[-1].get_weights())
    return len(history.history["loss"])


def save_for_inference(model, path: Path) -> None:
    """Save architecture and weights only (no optimizer state: a third of the size)."""
    import keras

    clean = keras.Model.from_config(model.get_config())  # not compiled: no optimizer state
    clean.set_weights(model.get_weights())
    clean.save(path)


def export_scoring(model, kind: str, out: Path) -> dict[str, str]:
    """Write the ONNX scoring graph beside the weights; return its card entry."""
    import onnxruntime
    import tf2onnx

    from batchcxr.infer.export import OPSET, SCORING_FILE, export_onnx

    path = export_onnx(model, kind, out / SCORING_FILE)
    return {
        "file": SCORING_FILE,
        "sha256": sha256_file(path),
        "runtime": f"onnxruntime {onnxruntime.__version__} (exported with tf2onnx {tf2onnx.__version__}, opset {OPSET})",
        "outputs": "probability (N,), cam (N, h, w): exact Grad-CAM from the CAM layer and head weights",
    }


def _build(cfg: TrainConfig):
    if cfg.model == "cnn":
        return build_cnn(head=cfg.cnn_head, dense=cfg.cnn_dense,
                         **({"dropout": cfg.dropout} if cfg.dropout is not None else {}))
    if cfg.model == "mobilenetv2":
        if cfg.tflite_path is None:
            raise ValueError("mobilenetv2 needs tflite_path (the ImageNet weights)")
        return build_mobilenetv2(cfg.tflite_path, **({"dropout": cfg.dropout} if cfg.dropout is not None else {}))
    raise ValueError(f"unknown model {cfg.model!r} (cnn or mobilenetv2)")


def _library_versions() -> dict[str, str]:
    import cv2
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
    }


DENSE_SUMMARY = {  # the card's words for each CNN_DENSE kind
    "relu": "ReLU", "batchnorm": "+ BatchNorm + ReLU", "leaky": f"LeakyReLU {LEAKY_SLOPE}"}


def _architecture_summary(model, cfg: TrainConfig) -> str:
    if cfg.model == "cnn":
        return (
            "3 x (Conv2D 3x3 [32 stride 2, 64, 128] + BatchNorm + ReLU + MaxPool 2), "
            f"{'Flatten' if cfg.cnn_head == 'flatten' else 'GlobalAveragePooling'}, "
            f"Dense {model.get_layer('dense').units} {DENSE_SUMMARY[cfg.cnn_dense]}, "
            f"Dropout {model.get_layer('dropout').rate}, "
            "Dense 1 sigmoid; Grad-CAM layer cam_features (last conv block)"
        )
    return (
        "MobileNetV2 alpha 1.0, ImageNet weights (dequantized from the int8 TFLite copy), top removed; "
        f"GlobalAveragePooling, Dropout {model.get_layer('dropout').rate}, Dense 1 sigmoid; "
        f"fine-tuned from {cfg.fine_tune_from} up, BatchNorm frozen; Grad-CAM layer out_relu"
    )


def train(cfg: TrainConfig) -> TrainResult:
    """Train, choose the threshold on validation, save weights and the model card."""
    import keras

    if cfg.augment.outside > 0 and cfg.lungs == "none":
        raise ValueError("--outside needs a lung contract (--lungs): it swaps what lies outside the lung fields")
    if cfg.lung_guidance > 0 and cfg.lungs == "none":
        raise ValueError("--lung-guidance needs a lung contract (--lungs): it charges evidence outside the lung fields")
    if cfg.mixup > 0 and (cfg.augment.outside > 0 or cfg.lung_guidance > 0):
        raise ValueError("--mixup is not combined with --outside or --lung-guidance (their masks would need mixing too)")
    if cfg.lung_fields not in LUNG_FIELDS:
        raise ValueError(f"unknown lung fields {cfg.lung_fields!r} ({' or '.join(LUNG_FIELDS)})")
    start = time.monotonic()
    keras.utils.set_random_seed(cfg.seed)
    items = list_split(cfg.data_dir)
    if cfg.limit_per_class:
        items = limit_per_class(items, cfg.limit_per_class, cfg.seed)
    train_items, val_items = patient_split(items, cfg.val_fraction, cfg.seed, cfg.split)
    log.info("train %d images, validation %d images (patient-level split)", len(train_items), len(val_items))
    x_tr, y_tr = load_images(train_items)
    x_va, y_va = load_images(val_items)
    lung_card = None
    lungs_tr = None
    if cfg.lungs != "none":
        from batchcxr.infer.lungs import load_lung_model

        lung = load_lung_model(cfg.lung_model or MODELS_DIR / "lungs", threads=2)
        lung_card = {"name": lung.name, "version": lung.version}
        x_tr, _, probs_tr = lung.transform(x_tr, cfg.lungs)
        x_va = lung.transform(x_va, cfg.lungs)[0]
        log.info("inputs under the lung contract %r (%s)", cfg.lungs, lung.version)
        if cfg.augment.outside > 0 or cfg.lung_guidance > 0:
            dilated = cfg.lung_fields == "dilated"
            lungs_tr = np.stack([lungs_in_input(p, cfg.lungs, x_tr.shape[1], dilated) for p in probs_tr])
    if cfg.equalize:
        x_tr = finish_batch(x_tr, True).astype(np.uint8)
        x_va = finish_batch(x_va, True).astype(np.uint8)

    model = _build(cfg)
    epochs_run = 0
    if cfg.model == "mobilenetv2":
        set_trainable_from(model, None)
        epochs_run += _train_mobilenetv2_head(model, cfg, x_tr, y_tr, x_va, y_va)
        set_trainable_from(model, cfg.fine_tune_from)
    if cfg.epochs > 0:
        epochs_run += _fit(model, cfg, x_tr, y_tr, x_va, y_va, cfg.epochs, cfg.learning_rate, lungs_tr)

    val_scores = model.predict(x_va.astype(np.float32), batch_size=64, verbose=0).ravel()
    threshold = choose_threshold(y_va, val_scores, cfg.threshold_rule)
    val_metrics = binary_metrics(y_va, val_scores, threshold)
    log.info("validation: %s", json.dumps(val_metrics))

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    save_for_inference(model, weights)
    digest = sha256_file(weights)
    scoring = export_scoring(model, cfg.model, out)
    root = Path(cfg.data_dir)
    counts = lambda its: {c: sum(1 for i in its if i.label == k) for k, c in enumerate(CLASSES)}  # noqa: E731
    hyper = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in asdict(cfg).items()
        if k not in ("data_dir", "out_dir", "tflite_path", "augment", "equalize", "lungs", "lung_model")
    }
    hyper["augment"] = asdict(cfg.augment)
    hyper["optimizer"] = "Adam"
    hyper["loss"] = "binary_crossentropy, class-weighted (n / (2 n_class))" + (
        f", label smoothing {cfg.label_smoothing}" if cfg.label_smoothing else ""
    ) + (
        f", mixup Beta({cfg.mixup}, {cfg.mixup})" + (" (fine-tuning)" if cfg.model == "mobilenetv2" else "")
        if cfg.mixup else ""
    ) + (
        f" + {cfg.lung_guidance} x share of positive evidence (activation x gradient at the Grad-CAM layer) "
        f"outside the lung fields ({cfg.lung_fields})" if cfg.lung_guidance else ""
    )
    hyper["epochs_run"] = epochs_run
    card = {
        "name": out.name,
        "model": cfg.model,
        "version": model_version(out.name, digest),
        "architecture": {"summary": _architecture_summary(model, cfg), "parameters": int(model.count_params())},
        "preprocessing": PreprocessContract(equalize=cfg.equalize, lungs=cfg.lungs).as_dict(),
        **({"lung_model": lung_card} if lung_card else {}),
        "output": "P(PNEUMONIA), sigmoid; label PNEUMONIA when probability >= threshold",
        "threshold": {
            "value": threshold,
            "rule": cfg.threshold_rule,
            "chosen_on": f"the patient-level validation split of train ({cfg.split}; test never used)",
        },
        "training_data": {
            "source": DATA_SOURCE,
            "root": root.name,
            "train_counts": counts(train_items),
            "val_counts": counts(val_items),
            "split": (
                f"stratified by class, grouped by patient, val_fraction {cfg.val_fraction}, "
                + (f"seed {cfg.seed}" if cfg.split == "random" else "lowest patient numbers of each name series")
            ),
            "file_list_sha256": file_list_sha256(items, root),
        },
        "hyperparameters": hyper,
        "validation_metrics": val_metrics,
        "test_metrics": None,
        "library_versions": _library_versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "weights": {"file": WEIGHTS_FILE, "sha256": digest},
        "scoring": scoring,
        "training_seconds": round(time.monotonic() - start, 1),
    }
    write_card(out, card)
    return TrainResult(out, threshold, val_metrics, epochs_run, time.monotonic() - start)
