"""Least-squares refit of the 1×1 part of RED's approximate separations.

The truncated SVD (`keras_autoprune.red.low_rank`) keeps each layer's kernel
close, not its output, and the errors of successive layers add up. Given
inputs ``X`` (synthesized without data by default,
`keras_autoprune.red.synthesis`), each separated block's 1×1 part is refitted,
layer after layer in graph order, so that the block reproduces the
convolution it replaced:

    F = depthwise(tile(X̃_ℓ)),   Y = conv_ℓ(X_ℓ) + b_ℓ   (before the activation),
    [P; b] = argmin ‖[F 1][P; b] − Y‖² + λ ‖P‖²,   λ = ridge · tr(FᵀF) / (M·C_in),

where ``X̃_ℓ`` is the block's input in the compressed model, whose earlier
blocks are already refitted (so the fit also absorbs their remaining error),
and ``X_ℓ`` the convolution's input in the model before the approximation.
Rows are the output positions of every input; ``FᵀF`` and ``FᵀY`` are
accumulated in float64 over batches, so memory does not grow with the
number of inputs. The depthwise kernels stay those of the SVD.

Decision (scope): blocks that are top-level layers of both models and
called once are refitted; the others (inside nested models, shared layers)
keep the SVD's weights and are not listed as refitted.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_autoprune.red.separation import block_parts

RIDGE = 1e-3
"""``ridge`` in the formula above: a relative Tikhonov weight that keeps rare directions of ``F`` bounded."""

_BATCH = 32


def reconstruct_pointwise(model: keras.Model, reference: keras.Model, layers, inputs: np.ndarray,
                          ridge: float = RIDGE) -> tuple[str, ...]:
    """Refits, in place, the 1×1 convolution (kernel and bias) of the separated blocks named in ``layers``.

    Args:
        model: the compressed model holding the blocks (changed in place: it
            is RED's own output).
        reference: the model before the approximation, with the original
            convolutions under the same names (left unchanged).
        layers: the separated blocks' names, in graph order.
        inputs: model inputs to fit on.
        ridge: ``ridge`` in the formula above.

    Returns:
        The names of the blocks refitted.

    Raises:
        ValueError: no inputs, or a negative ``ridge``.
    """
    if len(inputs) == 0:
        raise ValueError("Expected at least one input to refit the separated blocks on. Received: an empty array. "
                         "Fix: pass a batch of model inputs (or synthesize_images(model)).")
    if not ridge >= 0:
        raise ValueError(f"Expected `ridge` to be a number >= 0. Received: ridge={ridge!r}")
    top = {layer.name for layer in model.layers}
    reference_top = {layer.name for layer in reference.layers}
    refitted = []
    for name in layers:
        if name not in top or name not in reference_top:
            continue
        block, convolution = model.get_layer(name), reference.get_layer(name)
        if len(block._inbound_nodes) != 1 or len(convolution._inbound_nodes) != 1:
            continue
        _refit(block, convolution, keras.Model(model.inputs[0], _called_on(block)),
               keras.Model(reference.inputs[0], _called_on(convolution)), inputs, ridge)
        refitted.append(name)
    return tuple(refitted)


def _called_on(layer):
    """The tensor of the outer graph that ``layer`` is called on (a nested model's ``input`` is its own)."""
    return layer._inbound_nodes[0].input_tensors[0]


def _refit(block, convolution, block_input, convolution_input, inputs: np.ndarray, ridge: float) -> None:
    copies, depthwise, pointwise = block_parts(block)
    kernel = keras.ops.convert_to_numpy(convolution.kernel)
    bias = keras.ops.convert_to_numpy(convolution.bias) if convolution.use_bias else None
    has_bias = pointwise.use_bias
    gram = cross = None
    for start in range(0, len(inputs), _BATCH):
        batch = inputs[start:start + _BATCH]
        x = keras.ops.convert_to_numpy(block_input(batch, training=False))
        features = keras.ops.convert_to_numpy(depthwise(np.concatenate([x] * copies, axis=-1)))
        source = convolution_input(batch, training=False)
        target = keras.ops.convert_to_numpy(keras.ops.conv(
            source, kernel.astype(keras.backend.standardize_dtype(source.dtype)), strides=convolution.strides,
            padding=convolution.padding, dilation_rate=convolution.dilation_rate))
        if bias is not None:
            target = target + bias
        f = features.reshape(-1, features.shape[-1]).astype(np.float64)
        if has_bias:
            f = np.concatenate([f, np.ones((len(f), 1))], axis=1)
        y = target.reshape(-1, target.shape[-1]).astype(np.float64)
        gram = f.T @ f if gram is None else gram + f.T @ f
        cross = f.T @ y if cross is None else cross + f.T @ y
    slots = features.shape[-1]
    penalty = np.zeros(len(gram))
    penalty[:slots] = ridge * np.trace(gram[:slots, :slots]) / slots
    try:
        solution = np.linalg.solve(gram + np.diag(penalty), cross)
    except np.linalg.LinAlgError:  # a dead feature with ridge=0: the least-norm solution
        solution = np.linalg.lstsq(gram + np.diag(penalty), cross, rcond=None)[0]
    new_kernel = solution[:slots].reshape(keras.ops.convert_to_numpy(pointwise.kernel).shape)
    values = [new_kernel.astype(pointwise.kernel.dtype)]
    if has_bias:
        values.append(solution[slots].astype(pointwise.bias.dtype))
    pointwise.set_weights(values)
