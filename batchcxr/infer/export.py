"""Export a trained Keras model to the ONNX scoring graph (run after training; needs TensorFlow).

The graph returns, for a (N, 224, 224, 1) float32 batch:

- ``probability`` (N,): the Keras model's sigmoid output;
- ``cam`` (N, h, w): the un-normalized Grad-CAM map, ReLU(sum_k alpha_k A_k), computed *exactly*
  from the CAM-layer activations A and the head's weights, without back-propagation:

  * MobileNetV2 (A -> GlobalAveragePooling -> Dense): d logit / d A_ijk = w_k / (h w), so
    alpha_k = w_k / (h w) (Grad-CAM reduces to CAM).
  * CNN (A -> MaxPool 2 -> Flatten -> Dense(ReLU) -> Dense): the gradient at the pooled map is
    W1 (w2 * [z > 0]) (a batch normalization before the ReLU is folded into W1 and b1 first; with a
    leaky ReLU of slope s, [z > 0] is 1 where z > 0 and s elsewhere); max pooling routes each
    window's gradient to exactly one element, so the spatial mean over A is the pooled gradient's
    sum divided by A's h w. With global average pooling in place of Flatten (layer ``gap``) the
    pooled gradient is W1 (w2 * [z > 0]) / (h' w') at every pooled position, so its sum is
    W1 (w2 * [z > 0]) itself.

Dropout is the identity at inference. tests/test_fast_path.py checks both against a GradientTape
Grad-CAM to 1e-4 and the probabilities against the Keras model to 1e-3.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

SCORING_FILE = "scoring.onnx"
OPSET = 17


def scoring_function(km, kind: str):
    """A tf.function computing (probability, cam) for the Keras model ``km`` of kind cnn|mobilenetv2."""
    import keras
    import tensorflow as tf

    from batchcxr.training.architectures import CAM_LAYER, OUTPUT_LAYER

    acts_model = keras.Model(km.inputs, km.get_layer(CAM_LAYER[kind]).output)
    out = km.get_layer(OUTPUT_LAYER)
    # numpy arrays turned into constants inside each function body: tf2onnx would make
    # captured eager tensors into extra graph inputs.
    w2_np, b2_np = out.kernel.numpy(), out.bias.numpy()  # (units, 1), (1,)
    spec = tf.TensorSpec((None, 224, 224, 1), tf.float32, name="image")

    if kind == "mobilenetv2":

        @tf.function(input_signature=[spec])
        def run(image):
            w2, b2 = tf.constant(w2_np), tf.constant(b2_np)
            a = acts_model(image, training=False)
            hw = tf.cast(tf.shape(a)[1] * tf.shape(a)[2], tf.float32)
            logit = tf.matmul(tf.reduce_mean(a, axis=[1, 2]), w2) + b2
            alpha = w2[:, 0] / hw
            cam = tf.nn.relu(tf.einsum("nhwk,k->nhw", a, alpha))
            return {"probability": tf.sigmoid(logit)[:, 0], "cam": cam}

        return run

    if kind == "cnn":
        pool = km.get_layer("pool3")
        gap = any(layer.name == "gap" for layer in km.layers)
        w1_np, b1_np, slope = _dense_head(km)

        @tf.function(input_signature=[spec])
        def run(image):
            w1, b1, w2, b2 = (tf.constant(v) for v in (w1_np, b1_np, w2_np, b2_np))
            a = acts_model(image, training=False)
            pooled = pool(a)
            flat = tf.reduce_mean(pooled, axis=[1, 2]) if gap else tf.reshape(pooled, [tf.shape(pooled)[0], -1])
            z = tf.matmul(flat, w1) + b1
            logit = tf.matmul(tf.nn.leaky_relu(z, slope) if slope else tf.nn.relu(z), w2) + b2
            grad_z = tf.where(z > 0, 1.0, slope) * w2[:, 0]
            grad_flat = tf.matmul(grad_z, w1, transpose_b=True)
            # summed over the pooled positions: (N, k)
            grad_sum = grad_flat if gap else tf.reduce_sum(tf.reshape(grad_flat, tf.shape(pooled)), axis=[1, 2])
            hw = tf.cast(tf.shape(a)[1] * tf.shape(a)[2], tf.float32)
            alpha = grad_sum / hw
            cam = tf.nn.relu(tf.einsum("nhwk,nk->nhw", a, alpha))
            return {"probability": tf.sigmoid(logit)[:, 0], "cam": cam}

        return run

    raise ValueError(f"unknown model kind {kind!r}")


def _dense_head(km):
    """The CNN head's hidden layer (architectures.CNN_DENSE) as one affine map (kernel (flat,
    units), bias (units,)) and the slope of its activation below zero (0 for a ReLU). A batch
    normalization before the activation (layer ``dense_bn``) is folded into the map with its
    moving statistics, as it computes at inference."""
    import keras
    import numpy as np

    names = {layer.name for layer in km.layers}
    dense = km.get_layer("dense")
    kernel = dense.kernel.numpy()
    bias = dense.bias.numpy() if dense.use_bias else np.zeros(kernel.shape[1], kernel.dtype)
    act = km.get_layer("dense_relu") if "dense_relu" in names else None
    slope = float(act.negative_slope) if isinstance(act, keras.layers.LeakyReLU) else 0.0
    if "dense_bn" in names:
        bn = km.get_layer("dense_bn")
        scale = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
        kernel, bias = kernel * scale, (bias - bn.moving_mean.numpy()) * scale + bn.beta.numpy()
    return kernel, bias, slope


def export_onnx(km, kind: str, path: Path) -> Path:
    """Write the scoring graph of ``km`` as ONNX."""
    import tf2onnx

    fn = scoring_function(km, kind)
    tmp = Path(path).with_suffix(".onnx.tmp")
    tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=OPSET, output_path=str(tmp))
    tmp.replace(path)
    log.info("exported %s scoring graph to %s", kind, path)
    return Path(path)
