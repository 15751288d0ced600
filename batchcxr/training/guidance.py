"""Lung guidance: a training loss term that charges a classifier for evidence outside the lungs.

Grad-CAM showed the CNN's evidence on the shoulders, clavicles, diaphragm and corners, and
reshaping its inputs (lung crop, corner blanking, swapping the central band or everything outside
the lungs with another image's) moved that evidence around without putting it in the lungs. This
term asks for it directly, in the style of "right for the right reasons" (Ross, Hughes and
Doshi-Velez, 2017): per training image, the share of its positive first-order evidence for
pneumonia - activation times the gradient of the logit, at the Grad-CAM layer, summed over
channels - that lies outside its lung fields (slightly dilated, or as segmented: ``--lung-fields``).
The loss becomes

    binary cross-entropy (class-weighted) + weight * mean share outside

Activation times gradient is what each cell adds to the logit to first order, so the term charges
what the model uses, not only what Grad-CAM's channel averages show. (Charging the Grad-CAM map
itself as well was tried at stop 28 and is not offered: the CNN met it by making its Grad-CAM maps
empty - relu of a sum negative everywhere - for 785 of 786 validation images.) The lung masks come
from the segmenter (``normalize.lungfield.lungs_in_input``) and move with each image through the
geometric augmentation (``training.architectures.build_augmenter``: one transform for both).
Scoring is unchanged: the term exists only in training.
"""

from __future__ import annotations

from batchcxr.training.architectures import CAM_LAYER, OUTPUT_LAYER


def outside_share(features, gradients, lungs, floor: float = 0.1):
    """Per image, the share of positive evidence (``relu(sum_k features_k * gradients_k)``, over
    a (n, h, w, k) grid) that lies where ``lungs`` (n, h, w, values in 0..1) is not.

    An image with almost no positive evidence (a confident normal) would make the share a ratio
    of two tiny numbers, so the denominator gets ``floor`` times the batch's mean evidence (held
    constant for the gradient): weak maps count less, and no image's term can blow up."""
    from keras import ops

    evidence = ops.relu(ops.sum(features * gradients, axis=-1))
    total = ops.sum(evidence, axis=(1, 2))
    outside = ops.sum(evidence * (1.0 - lungs), axis=(1, 2))
    return outside / (total + floor * ops.stop_gradient(ops.mean(total)) + 1e-6)


def lung_guided(model, kind: str, weight: float):
    """A Keras model that trains ``model`` (in place: the same layers and weights) on
    ((images, lung masks), labels) with the loss above; it predicts and validates as ``model``
    does, on images alone. Compile and fit it as ``model`` would be."""
    import keras
    import tensorflow as tf

    head = model.get_layer(OUTPUT_LAYER)
    probe = keras.Model(model.input, [model.get_layer(CAM_LAYER[kind]).output, head.input])

    def shares(x, lungs, training: bool):
        """(share outside per image, logit per image) with the gradient kept for training."""
        with tf.GradientTape() as cam_tape:
            features, hidden = probe(x, training=training)
            logit = tf.matmul(hidden, head.kernel) + head.bias
        gradients = cam_tape.gradient(logit, features)
        cells = tf.image.resize(tf.cast(lungs, tf.float32), tf.shape(features)[1:3], method="area")[..., 0]
        return outside_share(features, gradients, cells), logit

    class LungGuided(keras.Model):
        def __init__(self):
            super().__init__(name=f"{model.name}_lung_guided")
            self.inner = model
            self.outside = keras.metrics.Mean(name="outside")

        def call(self, x, training=False):
            return self.inner(x, training=training)

        def outside_shares(self, x, lungs):
            """Each image's share of positive evidence outside ``lungs`` ((n, h, w, 1) masks in
            the input's frame), as scored (no dropout)."""
            return shares(tf.convert_to_tensor(x, tf.float32), lungs, False)[0].numpy()

        def train_step(self, data):
            (x, lungs), y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            with tf.GradientTape() as tape:
                share, logit = shares(x, lungs, True)
                y_pred = tf.sigmoid(logit)
                loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
                loss = loss + weight * tf.reduce_mean(share)
            variables = self.trainable_variables
            self.optimizer.apply(tape.gradient(loss, variables), variables)
            self.outside.update_state(share)
            for metric in self.metrics:
                if metric.name == "loss":
                    metric.update_state(loss)
                elif metric is not self.outside:
                    metric.update_state(y, y_pred, sample_weight=sample_weight)
            return self.get_metrics_result()

    return LungGuided()
