"""Load ImageNet MobileNetV2 weights from the int8 TFLite file into Keras.

Keras cannot download ``weights="imagenet"`` here. The only ImageNet copy is a
full-integer TFLite conversion with batch normalization folded into the
convolutions. Tensor names in it are unreliable after op fusion, so weights are
matched by walking the ops in execution order: the n-th CONV_2D /
DEPTHWISE_CONV_2D op is the n-th Conv2D / DepthwiseConv2D layer of
``keras.applications.MobileNetV2``, and the single FULLY_CONNECTED op is the
``predictions`` layer.

Folded batch norm is undone exactly: the conv kernel takes the folded kernel
and the following BatchNormalization layer becomes an affine identity plus
the folded bias (gamma=1, beta=bias, mean=0, variance=1-epsilon).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")


@dataclass(frozen=True)
class FoldedLayer:
    """One dequantized op: float kernel in TFLite layout and float bias."""

    op: str
    kernel: np.ndarray
    bias: np.ndarray


def _dequantize(tensor: np.ndarray, detail: dict) -> np.ndarray:
    q = detail["quantization_parameters"]
    scales = np.asarray(q["scales"], dtype=np.float64)
    zeros = np.asarray(q["zero_points"], dtype=np.float64)
    if scales.size == 0:  # not quantized
        return tensor.astype(np.float32)
    axis = int(q["quantized_dimension"])
    shape = [1] * tensor.ndim
    if scales.size > 1:
        shape[axis] = scales.size
    return ((tensor.astype(np.float64) - zeros.reshape(shape)) * scales.reshape(shape)).astype(np.float32)


def read_tflite_layers(path: Path) -> list[FoldedLayer]:
    """Read the conv, depthwise and dense weights of a TFLite file, in op order."""
    from ai_edge_litert.interpreter import Interpreter

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: ImageNet MobileNetV2 TFLite file not found")
    interp = Interpreter(model_path=str(path))
    details = {d["index"]: d for d in interp.get_tensor_details()}
    layers: list[FoldedLayer] = []
    for op in interp._get_ops_details():  # noqa: SLF001 - the only API that lists ops in order
        name = op["op_name"]
        if name not in _CONV_OPS and name != "FULLY_CONNECTED":
            continue
        _, w_idx, b_idx = op["inputs"][:3]
        kernel = _dequantize(interp.get_tensor(w_idx), details[w_idx])
        bias = _dequantize(interp.get_tensor(b_idx), details[b_idx])
        layers.append(FoldedLayer(name, kernel, bias))
    return layers


def load_imagenet_weights(model, tflite_path: Path) -> None:
    """Copy the TFLite ImageNet weights into a Keras MobileNetV2 built with weights=None.

    Parameters
    ----------
    model : keras.Model
        ``keras.applications.MobileNetV2(weights=None, alpha=1.0)``, with or
        without its top.
    tflite_path : pathlib.Path
        The int8 TFLite file.

    Raises
    ------
    ValueError
        If the op sequence does not line up with the model's layers.
    """
    import keras

    folded = read_tflite_layers(tflite_path)
    convs = [f for f in folded if f.op in _CONV_OPS]
    dense = [f for f in folded if f.op == "FULLY_CONNECTED"]
    layers = model.layers
    conv_layers = [
        (i, layer)
        for i, layer in enumerate(layers)
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))
    ]
    if len(conv_layers) != len(convs):
        raise ValueError(
            f"{tflite_path}: {len(convs)} conv ops but the model has {len(conv_layers)} conv layers"
        )
    for (i, layer), f in zip(conv_layers, convs):
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        if depthwise != (f.op == "DEPTHWISE_CONV_2D"):
            raise ValueError(f"{tflite_path}: op {f.op} does not match layer {layer.name}")
        kernel = np.transpose(f.kernel, (1, 2, 3, 0))  # [out|1,h,w,in|ch] -> [h,w,in|ch,out|1]
        expected = tuple(layer.kernel.shape)
        if kernel.shape != expected:
            raise ValueError(f"{tflite_path}: kernel {kernel.shape} does not fit {layer.name} {expected}")
        layer.kernel.assign(kernel)
        bn = layers[i + 1]
        if not isinstance(bn, keras.layers.BatchNormalization):
            raise ValueError(f"{layer.name} is not followed by BatchNormalization")
        n = f.bias.shape[0]
        bn.set_weights(
            [
                np.ones(n, np.float32),
                f.bias,
                np.zeros(n, np.float32),
                np.full(n, 1.0 - bn.epsilon, np.float32),
            ]
        )
    top = [layer for layer in layers if layer.name == "predictions"]
    if top:
        if len(dense) != 1:
            raise ValueError(f"{tflite_path}: expected one FULLY_CONNECTED op, found {len(dense)}")
        top[0].set_weights([dense[0].kernel.T, dense[0].bias])
    log.info("loaded %d conv layers from %s", len(convs), tflite_path)


def imagenet_mobilenetv2(tflite_path: Path, include_top: bool = False):
    """Build keras MobileNetV2 (224x224x3, inputs in [-1, 1]) with ImageNet weights."""
    import keras

    model = keras.applications.MobileNetV2(
        input_shape=(224, 224, 3), alpha=1.0, include_top=include_top, weights=None
    )
    load_imagenet_weights(model, tflite_path)
    return model
