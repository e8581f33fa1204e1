"""`clone_layers`: the one cloning loop behind every surgery.

`apply_plan`, `mask_plan` and `replace_layers` all rebuild a model the same
way: `keras.models.clone_model` walks the model recursively (nested
Sequential and Functional models included, shared layers cloned once), a
*rebuild* function turns each original layer into its new layer and the
weights that layer must receive, and the weights are assigned by variable
path (`keras_autoprune.surgery.weights`) once the clone is built. The input
model is never modified.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from keras_autoprune.surgery.weights import assign_weights

#: ``rebuild(layer) -> (new_layer, {weight key: value})``.
Rebuild = Callable[[keras.layers.Layer], tuple[keras.layers.Layer, dict[str, np.ndarray]]]


def clone_layers(model: keras.Model, rebuild: Rebuild) -> keras.Model:
    """Clones ``model`` with every layer replaced by ``rebuild(layer)``.

    Args:
        model: a built Sequential or Functional model (left unchanged).
        rebuild: returns, for one original layer, the unbuilt layer that
            takes its place (any layer, a `keras.Sequential` of several
            included) and the values of the new layer's weights, keyed as
            `keras_autoprune.surgery.weights.weight_keys` names them.

    Returns:
        The new model, same kind and name, with its weights assigned.
    """
    new_weights: list[tuple[keras.layers.Layer, dict[str, np.ndarray]]] = []

    def clone(layer):
        if not isinstance(layer, keras.layers.Layer):
            return layer  # a stateless `keras.ops` node: reused as is
        new_layer, weights = rebuild(layer)
        new_weights.append((new_layer, weights))
        return new_layer

    new_model = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for new_layer, weights in new_weights:
        assign_weights(new_layer, weights)
    return new_model
