"""Inputs synthesized from a model's BatchNormalization statistics (no data read).

A trained BatchNormalization stores the mean ``μ̂_ℓ`` and variance ``σ̂_ℓ²``
of its input over the training data. Images whose batch statistics match
them at every normalisation resemble the training data as the network sees
it (ZeroQ, Cai et al., CVPR 2020). Starting from Gaussian noise, Adam
minimizes

    L(x) = Σ_ℓ (1/C_ℓ) (‖μ_ℓ(x) − μ̂_ℓ‖² + ‖σ_ℓ(x) − σ̂_ℓ‖²),
    σ_ℓ(x) = √(v_ℓ(x) + ε_ℓ),     σ̂_ℓ = √(σ̂_ℓ² + ε_ℓ),

where ``μ_ℓ(x)`` and ``v_ℓ(x)`` are the per-channel mean and variance of
normalisation ``ℓ``'s input over the batch and its positions (inference
mode: every normalisation uses its moving statistics) and ``ε_ℓ`` its
epsilon. The ``ε_ℓ`` inside the root keeps the gradient finite where a
channel is constant (a dead channel of MobileNetV2 has ``v_ℓ = 0``, and the
plain standard deviation's gradient there made the images NaN; before
session 28 the root held ``v_ℓ`` alone; on ResNet-20 the change moved the
images by 5.3% root mean square and the refits' accuracy by at most 1.2
points, docs/methods/red.md).

Decision (input scale): the images are ``x = a + s·z`` with ``z`` optimized
from ``N(0, 1)``; ``a`` and ``s`` are the mean and standard deviation of a
`keras.layers.Normalization` applied to the model's input (the convention
of models that take raw pixels), else 0 and 1 (models fed standardized
inputs). RED uses these images to refit its approximate separations
(`keras_autoprune.red.reconstruction`); they are not training data.
"""

from __future__ import annotations

import keras
import numpy as np

SYNTHETIC_IMAGES = 256
"""How many images `compress` synthesizes for its reconstruction by default."""

SYNTHESIS_STEPS = 200
"""Adam steps per batch by default (ResNet-20, 256 images: about 2 minutes on 2 CPU cores)."""


def usable_norms(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """The model's own BatchNormalization layers called once, on a tensor of its graph (nested models' are not)."""
    norms = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization) and len(layer._inbound_nodes) == 1:
            norms.append(layer)
    return norms


def check_synthesizable(model: keras.Model) -> None:
    """Raises ValueError unless ``model`` has a BatchNormalization to match and one fixed-size input."""
    if len(model.inputs) != 1:
        raise ValueError(
            "Expected a model with one input to synthesize images for. Received: a model with "
            f"{len(model.inputs)} inputs. Fix: pass reconstruction=None, or your own inputs as a NumPy array."
        )
    shape = tuple(model.inputs[0].shape[1:])
    if any(size is None for size in shape):
        raise ValueError(
            "Expected a model input of fixed size to synthesize images for. Received: input shape "
            f"{(None, *shape)}. Fix: build the model with a fixed input size, pass reconstruction=None, "
            "or pass your own inputs as a NumPy array."
        )
    if not usable_norms(model):
        raise ValueError(
            "Synthesized images match the statistics of the model's BatchNormalization layers. Received: "
            f"model '{model.name}' without a top-level BatchNormalization called once. Fix: pass "
            "reconstruction=None (kernel SVD only), or your own inputs as a NumPy array."
        )


def input_scale(model: keras.Model) -> tuple[np.ndarray, np.ndarray]:
    """``(a, s)`` of the decision above: a (non-inverting) `Normalization` reading the input, else ``(0, 1)``.

    ``a`` and ``s`` keep the layer's broadcast shape (batch axis included).
    """
    source = model.inputs[0]
    for layer in model.layers:
        if (isinstance(layer, keras.layers.Normalization) and not layer.invert
                and len(layer._inbound_nodes) == 1):
            node = layer._inbound_nodes[0]
            if any(tensor is source for tensor in node.input_tensors):
                mean = np.asarray(keras.ops.convert_to_numpy(layer.mean), np.float32)
                variance = np.asarray(keras.ops.convert_to_numpy(layer.variance), np.float32)
                return mean, np.sqrt(np.maximum(variance, keras.backend.epsilon()))
    return np.zeros(1, np.float32), np.ones(1, np.float32)


def synthesize_images(model: keras.Model, count: int = SYNTHETIC_IMAGES, steps: int = SYNTHESIS_STEPS,
                      batch_size: int = 256, learning_rate: float = 0.1, seed: int = 0, verbose: int = 1) -> np.ndarray:
    """Inputs whose statistics at every BatchNormalization match its moving statistics (formula above).

    Args:
        model: a built Functional or Sequential model with BatchNormalization
            layers (left unchanged).
        count: images to synthesize.
        steps: Adam steps per batch.
        batch_size: images optimized together (each batch matches the
            statistics on its own).
        learning_rate: Adam's step size on ``z``.
        seed: the starting noise.
        verbose: 0 silent, 1 a progress bar.

    Returns:
        float32 ``(count, *input_shape)``.
    """
    import tensorflow as tf

    for name, value in (("count", count), ("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected `{name}` to be an integer >= 1. Received: {name}={value!r}")
    check_synthesizable(model)
    norms = usable_norms(model)
    probe = keras.Model(model.inputs[0], [norm.input for norm in norms])
    targets = [(np.asarray(keras.ops.convert_to_numpy(norm.moving_mean), np.float32),
                np.sqrt(np.asarray(keras.ops.convert_to_numpy(norm.moving_variance), np.float32) + norm.epsilon),
                np.float32(norm.epsilon))
               for norm in norms]
    axes = [tuple(i for i in range(len(norm.input.shape)) if i != norm.axis % len(norm.input.shape)) for norm in norms]
    offset, scale = input_scale(model)
    shape = tuple(model.inputs[0].shape[1:])
    rng = np.random.default_rng(seed)
    batches = [min(batch_size, count - start) for start in range(0, count, batch_size)]
    bar = keras.utils.Progbar(len(batches) * steps, verbose=verbose, unit_name="step") if verbose else None
    images = []
    for size in batches:
        z = tf.Variable(rng.standard_normal((size,) + shape).astype(np.float32))
        optimizer = keras.optimizers.Adam(learning_rate)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                features = probe(z * scale + offset, training=False)
                features = features if isinstance(features, (list, tuple)) else [features]
                loss = 0.0
                for feature, (mean, std, epsilon), axis in zip(features, targets, axes):
                    batch_mean, batch_variance = tf.nn.moments(feature, axes=axis)
                    loss += tf.reduce_mean(tf.square(batch_mean - mean))
                    loss += tf.reduce_mean(tf.square(tf.sqrt(batch_variance + epsilon) - std))
            optimizer.apply_gradients([(tape.gradient(loss, z), z)])
            return loss

        for _ in range(steps):
            loss = float(step())
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"Image synthesis diverged on '{model.name}' (the statistics loss became {loss}). Fix: a smaller "
                    f"learning_rate (received {learning_rate}), or pass your own inputs as reconstruction.")
            if bar is not None:
                bar.add(1, [("statistics_loss", loss)])
        images.append(z.numpy() * scale + offset)
    return np.concatenate(images).astype(np.float32)
