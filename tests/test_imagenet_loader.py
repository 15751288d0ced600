"""The dequantized TFLite weights make a real ImageNet MobileNetV2."""

import cv2
import numpy as np
import pytest

import skimage.data as skimage_data  # test extra: ships the test photos

from batchcxr.training.imagenet import imagenet_mobilenetv2, read_tflite_layers

# scikit-image photo -> ImageNet class index
EXPECTED = {"chelsea": 285, "coffee": 967, "rocket": 657}


@pytest.fixture(scope="module")
def classifier(imagenet_tflite):
    return imagenet_mobilenetv2(imagenet_tflite, include_top=True)


@pytest.mark.parametrize("photo, klass", sorted(EXPECTED.items()))
def test_photos_get_their_imagenet_class(classifier, photo, klass):
    img = getattr(skimage_data, photo)()
    x = cv2.resize(img, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 127.5 - 1
    probs = classifier(x[None], training=False).numpy()[0]
    assert int(np.argmax(probs)) == klass
    assert probs[klass] > 0.3


def test_op_walk_finds_every_layer(imagenet_tflite):
    layers = read_tflite_layers(imagenet_tflite)
    assert [f.op for f in layers].count("CONV_2D") == 35
    assert [f.op for f in layers].count("DEPTHWISE_CONV_2D") == 17
    assert layers[-1].op == "FULLY_CONNECTED" and layers[-1].kernel.shape == (1000, 1280)
