"""The two model architectures. Both take (224, 224, 1) float32 0..255 input.

Layer names the scoring path relies on:

- ``cam_features``: the activations Grad-CAM uses (CNN: last Conv2D block
  after ReLU; MobileNetV2: ``out_relu``, the last conv block).
- ``pneumonia``: the sigmoid output, P(PNEUMONIA).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CAM_LAYER = {"cnn": "cam_features", "mobilenetv2": "out_relu"}
OUTPUT_LAYER = "pneumonia"


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (the reference notebook's kinds, with real strength)."""

    zoom: float = 0.15
    shear: float = 0.1
    """Keras RandomShear factor (fraction of the image side, not degrees)."""
    horizontal_flip: bool = True
    rotation: float = 0.0
    """Keras RandomRotation factor (fraction of a full turn: 0.03 is about 11 degrees)."""
    translation: float = 0.0
    contrast: float = 0.0
    """Keras RandomContrast factor: exposure differences between sites and machines."""
    brightness: float = 0.0
    """Keras RandomBrightness factor on the 0..255 range."""
    corners: float = 0.0
    """Probability of blanking each corner square (a quarter of the side): burned-in markers ("R",
    "A-P", dates) sit in the corners, and Grad-CAM shows the models looking at them."""
    centre: float = 0.0
    """Probability of replacing each image's central vertical band (CENTRE_BAND of the width: spine,
    mediastinum, heart on a lung crop) with the same band of another image of the batch, whatever
    its class: the band then says nothing reliable about the label, so a model cannot lean on it
    (Grad-CAM showed the CNN looking at the spine and mediastinum)."""
    outside: float = 0.0
    """Probability of replacing everything outside each image's slightly dilated lung fields
    (shoulders, neck, mediastinum, diaphragm, corners: see normalize.lungfield.lungs_in_input)
    with the same pixels of another image of the batch, whatever its class: what lies outside the
    lungs then says nothing reliable about the label. Needs a lung contract (``--lungs``)."""
    aspect: float = 0.0
    """Random horizontal-only zoom (fraction): changes the aspect ratio. The 224 px training images
    were squashed from originals whose width/height differs by class (train sample: NORMAL ~1.24,
    PNEUMONIA ~1.56), so the squash itself tells the classes apart; jitter makes it useless as a cue."""
    shift: float = 0.0
    """Probability of giving each image a simulated acquisition shift (evaluation.shift.perturb:
    exposure curve, contrast, detector blur, noise), the one ``calibrate --shift-copies`` uses: on
    shifted validation films the models' normals scored far higher, as the Kaggle test normals do."""


def _training_only(name: str, seed: int, transform):
    """A Keras layer that applies ``transform(x, generator)`` in training and passes ``x`` through
    otherwise; ``generator`` is the layer's own seeded keras.random.SeedGenerator."""
    import keras

    class TrainingOnly(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.generator = keras.random.SeedGenerator(seed)

        def call(self, x, training=None):
            return transform(x, self.generator) if training else x

    return TrainingOnly(name=name)


def corner_eraser(probability: float, seed: int, fraction: float = 0.25):
    """A Keras layer that, in training only, sets each corner square (``fraction`` of the side)
    of each image to 0 with ``probability``."""
    import keras
    from keras import ops

    def erase(x, generator):
        n, h, w = ops.shape(x)[0], ops.shape(x)[1], ops.shape(x)[2]
        rows = ops.cast(ops.arange(h), "float32") / ops.cast(h, "float32")
        cols = ops.cast(ops.arange(w), "float32") / ops.cast(w, "float32")
        top, left = rows < fraction, cols < fraction
        bottom, right = rows >= 1 - fraction, cols >= 1 - fraction
        keep = ops.ones((n, h, w), "float32")
        for r, c in ((top, left), (top, right), (bottom, left), (bottom, right)):
            corner = ops.cast(ops.logical_and(r[:, None], c[None, :]), "float32")  # (h, w)
            hit = ops.cast(keras.random.uniform((n, 1, 1), seed=generator) < probability, "float32")
            keep = keep * (1.0 - hit * corner[None])
        return x * keep[..., None]

    return _training_only("corner_erase", seed, erase)


def _from_another(x, region, probability: float, generator):
    """``x`` where each image, with ``probability``, has the pixels of another image of the batch
    wherever ``region`` (broadcast against ``x``) is 1: a random permutation picks the other, so
    what it brings is independent of the image's label."""
    import keras
    from keras import ops

    n = ops.shape(x)[0]
    hit = ops.cast(keras.random.uniform((n, 1, 1, 1), seed=generator) < probability, "float32")
    other = ops.take(x, keras.random.shuffle(ops.arange(n), seed=generator), axis=0)
    mask = hit * region
    return x * (1.0 - mask) + other * mask


CENTRE_BAND = 0.3
"""Width of the central band centre_swapper exchanges, as a fraction of the image width."""


def centre_swapper(probability: float, seed: int, fraction: float = CENTRE_BAND):
    """A Keras layer that, in training only, gives each image with ``probability`` the central
    vertical band (``fraction`` of the width) of another image of the same batch (a random
    permutation: the band's source is independent of the image's label)."""
    from keras import ops

    def swap(x, generator):
        w = ops.shape(x)[2]
        cols = ops.cast(ops.arange(w), "float32") / ops.cast(w, "float32")
        band = ops.cast(ops.logical_and(cols >= 0.5 - fraction / 2, cols < 0.5 + fraction / 2), "float32")
        return _from_another(x, band[None, None, :, None], probability, generator)

    return _training_only("centre_swap", seed, swap)


def outside_swapper(probability: float, seed: int):
    """A Keras layer called on (images, lung masks) that, in training only, gives each image with
    ``probability`` the pixels of another image of the same batch wherever its own (0/1) lung mask
    is 0 (a random permutation: the source is independent of the image's label); it returns the
    images. Outside training it returns its input unchanged."""
    from keras import ops

    def swap(inputs, generator):
        x, lungs = inputs
        return _from_another(x, 1.0 - ops.cast(lungs, "float32"), probability, generator)

    return _training_only("outside_swap", seed, swap)


def build_augmenter(cfg: AugmentConfig, seed: int, part: str = "all"):
    """The training augmentation as one Keras layer: ``part`` "geometry" (band swap, corner
    blanking, rotation, translation, zoom, aspect, shear, flip: the same transform for every
    channel of an image, so a lung mask stacked as a second channel moves with it), "photometric"
    (contrast, brightness: the image alone) or "all" (geometry, then photometric)."""
    import keras

    steps = []
    if part in ("all", "geometry"):
        steps += _geometry_steps(cfg, seed)
    if part in ("all", "photometric"):
        if cfg.contrast > 0:
            steps.append(keras.layers.RandomContrast(cfg.contrast, value_range=(0, 255), seed=seed))
        if cfg.brightness > 0:
            steps.append(keras.layers.RandomBrightness(cfg.brightness, value_range=(0, 255), seed=seed))
    return keras.Sequential(steps or [keras.layers.Identity()], name="augment" if part == "all" else f"augment_{part}")


def shift_function(probability: float, seed: int):
    """A function of a float (N, H, W, 1) 0..255 batch tensor that gives each image, with
    ``probability``, one evaluation.shift.perturb copy (numpy, seeded; for tf.data maps)."""
    import threading

    import numpy as np
    import tensorflow as tf

    from batchcxr.evaluation.shift import perturb

    rng, lock = np.random.default_rng(seed), threading.Lock()

    def shifted(batch: np.ndarray) -> np.ndarray:
        out = batch.copy()
        with lock:  # tf.data may call this from several threads; the generator is not thread-safe
            for k in range(len(out)):
                if rng.random() < probability:
                    out[k] = perturb(np.clip(np.round(out[k]), 0, 255).astype(np.uint8), rng)
        return out

    def apply(x):
        y = tf.numpy_function(shifted, [x], tf.float32, stateful=True)
        y.set_shape(x.shape)
        return y

    return apply


def _geometry_steps(cfg: AugmentConfig, seed: int) -> list:
    import keras

    steps = []
    if cfg.centre > 0:
        steps.append(centre_swapper(cfg.centre, seed))
    if cfg.corners > 0:
        steps.append(corner_eraser(cfg.corners, seed))
    if cfg.rotation > 0:
        steps.append(keras.layers.RandomRotation(cfg.rotation, fill_mode="constant", seed=seed))
    if cfg.translation > 0:
        steps.append(keras.layers.RandomTranslation(cfg.translation, cfg.translation, fill_mode="constant", seed=seed))
    if cfg.zoom > 0:
        steps.append(keras.layers.RandomZoom(cfg.zoom, fill_mode="constant", seed=seed))
    if cfg.aspect > 0:
        steps.append(keras.layers.RandomZoom(0.0, (-cfg.aspect, cfg.aspect), fill_mode="constant", seed=seed))
    if cfg.shear > 0:
        steps.append(keras.layers.RandomShear(cfg.shear, cfg.shear, fill_mode="constant", seed=seed))
    if cfg.horizontal_flip:
        steps.append(keras.layers.RandomFlip("horizontal", seed=seed))
    return steps


CNN_HEADS = ("flatten", "gap")
"""How the CNN's last block meets its Dense layer: Flatten (the reference notebook's: a weight per
position, so a place in the image can be evidence by itself) or global average pooling (the
same weights everywhere: only what is seen counts, not where)."""


CNN_DENSE = ("relu", "batchnorm", "leaky")
"""The CNN head's hidden layer: Dense + ReLU (the reference notebook's), Dense without bias + batch
normalization + ReLU (layers ``dense_bn``, ``dense_relu``: each unit's input is centred on every
batch), or Dense + leaky ReLU (slope LEAKY_SLOPE below zero, layer ``dense_relu``). The last two are
against units that fall silent for good in training: 61 of the 64 ReLU units of the CNN shipped at
stop 29 never fire, and a film that fires none of the other 3 gets the head's bias alone (the same
score as every such film) and an empty Grad-CAM map."""
LEAKY_SLOPE = 0.1


def build_cnn(dropout: float = 0.5, dense_units: int = 64, head: str = "flatten", dense: str = "relu"):
    """The reference notebook's CNN family: 3 x (Conv2D + MaxPooling), Dense + dropout, sigmoid.

    The first convolution has stride 2 and each block uses batch normalization,
    which keeps the Flatten -> Dense layer small (14 x 14 x 128 inputs). ``head`` "gap" puts
    GlobalAveragePooling in place of Flatten (layer ``gap``). ``dense`` is the hidden layer's
    kind (CNN_DENSE).
    """
    if head not in CNN_HEADS:
        raise ValueError(f"unknown CNN head {head!r} ({' or '.join(CNN_HEADS)})")
    if dense not in CNN_DENSE:
        raise ValueError(f"unknown CNN dense layer {dense!r} ({' or '.join(CNN_DENSE)})")
    import keras
    from keras import layers

    inputs = keras.Input((224, 224, 1), name="image")
    x = layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
    for i, (filters, stride) in enumerate(((32, 2), (64, 1), (128, 1)), start=1):
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name="cam_features" if i == 3 else f"relu{i}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x) if head == "flatten" else layers.GlobalAveragePooling2D(name="gap")(x)
    if dense == "batchnorm":
        x = layers.Dense(dense_units, use_bias=False, name="dense")(x)
        x = layers.BatchNormalization(name="dense_bn")(x)
        x = layers.ReLU(name="dense_relu")(x)
    elif dense == "leaky":
        x = layers.Dense(dense_units, name="dense")(x)
        x = layers.LeakyReLU(LEAKY_SLOPE, name="dense_relu")(x)
    else:
        x = layers.Dense(dense_units, activation="relu", name="dense")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", name=OUTPUT_LAYER)(x)
    return keras.Model(inputs, outputs, name="cnn")


def build_mobilenetv2(tflite_path: Path | None, dropout: float = 0.2):
    """ImageNet MobileNetV2 backbone (top removed) + GlobalAveragePooling + Dropout + Dense(sigmoid).

    The grayscale input is replicated to three channels and scaled to [-1, 1]
    inside the graph. With ``tflite_path`` None the backbone stays random
    (only for loading saved weights over it).
    """
    import keras
    from keras import layers

    from batchcxr.training.imagenet import load_imagenet_weights

    inputs = keras.Input((224, 224, 1), name="image")
    x = layers.Concatenate(name="to_rgb")([inputs, inputs, inputs])
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(x)
    backbone = keras.applications.MobileNetV2(
        input_tensor=x, include_top=False, weights=None, alpha=1.0
    )
    if tflite_path is not None:
        load_imagenet_weights(backbone, tflite_path)
    features = backbone.output  # out_relu, 7 x 7 x 1280
    y = layers.GlobalAveragePooling2D(name="gap")(features)
    y = layers.Dropout(dropout, name="dropout")(y)
    outputs = layers.Dense(1, activation="sigmoid", name=OUTPUT_LAYER)(y)
    model = keras.Model(inputs, outputs, name="mobilenetv2")
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False  # Keras 3: fit() would otherwise use batch statistics
    return model


def set_trainable_from(model, first_layer: str | None) -> int:
    """Freeze the backbone below ``first_layer`` (None: freeze all of it); BN stays frozen.

    Returns the number of trainable weight tensors.
    """
    import keras

    trainable_names = {"gap", "dropout", OUTPUT_LAYER}
    seen = False
    for layer in model.layers:
        if first_layer is not None and layer.name == first_layer:
            seen = True
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
        elif layer.name in trainable_names:
            layer.trainable = True
        else:
            layer.trainable = seen
    if first_layer is not None and not seen:
        raise ValueError(f"no layer named {first_layer!r} in {model.name}")
    return len(model.trainable_weights)
