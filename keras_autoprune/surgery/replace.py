"""`replace_layers`: put a sequence of standard layers in place of one layer.

Reparameterising methods (EigenDamage's rotation-core-rotation, low-rank
factorisations) change *how* a layer computes, not the width it produces.
`replace_layers` is their surgery: each named layer is replaced by a
`LayerReplacement` -- new, unbuilt layers applied one after the other, with
the weights each must receive. Several layers become one `keras.Sequential`
block that keeps the original layer's name, so:

- the model keeps its structure (the block is called wherever the layer was,
  shared layers included) and uses only standard Keras layers: it saves and
  loads as ``.keras`` without custom objects and converts to TFLite;
- `count_flops`, `flops_table` and `kap.DependencyGraph` see the block's
  layers as ``name/inner`` (nested models are supported everywhere);
- every other layer is copied with its weights (`copy_layer`), and the
  input model is never modified.

Example (a Dense layer split into two, computing the same function):

>>> q, r = np.linalg.qr(dense.kernel.numpy())                          # doctest: +SKIP
>>> swap = kap.LayerReplacement(
...     [keras.layers.Dense(q.shape[1], use_bias=False, name="d_q"), keras.layers.Dense(dense.units, name="d_r")],
...     [{"kernel": q}, {"kernel": r, "bias": dense.bias.numpy()}])   # doctest: +SKIP
>>> new_model = kap.replace_layers(model, {"d": swap})                # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import keras
import numpy as np

from keras_autoprune.graph.dependency import check_model
from keras_autoprune.surgery.clone import clone_layers, copy_layer


@dataclasses.dataclass(frozen=True)
class LayerReplacement:
    """Layers that take one layer's place, applied in order, and their weights.

    Attributes:
        layers: new, unbuilt standard Keras layers; the first one receives
            the replaced layer's input, the last one produces its output.
            Or a single functional `keras.Model` made for this replacement
            (built, since a functional model is built when it is made): a
            block whose layers do not form a chain, inserted as it is.
        weights: one ``{weight key: value}`` per layer (keys as in
            ``layer.weights``: ``"kernel"``, ``"bias"``; ``{}`` for a layer
            without weights; for a block, the keys
            `keras_autoprune.surgery.weights.weight_keys` gives it).
    """

    layers: Sequence[keras.layers.Layer]
    weights: Sequence[Mapping[str, np.ndarray]]

    def __post_init__(self):
        if not self.layers or not all(isinstance(l, keras.layers.Layer) for l in self.layers):
            raise TypeError(
                "`layers` must be a non-empty list of new Keras layers. "
                f"Received: {[type(l).__name__ for l in self.layers] if self.layers else self.layers!r}"
            )
        if len(self.weights) != len(self.layers):
            raise ValueError(
                f"Give one weights dict per layer ({len(self.layers)} layers). "
                f"Received: {len(self.weights)} weights dicts."
            )
        names = [l.name for l in self.layers]
        if len(set(names)) != len(names):
            raise ValueError(f"The replacement layers need distinct names. Received: {names}")
        block = len(self.layers) == 1 and is_functional(self.layers[0])
        if not block and any(l.built for l in self.layers):
            raise ValueError("The replacement layers must be new (unbuilt) layers, or one functional keras.Model made "
                             f"for the replacement; they are built in the new model. Received built: "
                             f"{[l.name for l in self.layers if l.built]}")

    def block(self, name: str) -> tuple[keras.layers.Layer, dict[str, np.ndarray]]:
        """The layer to insert (the only layer, or a Sequential named ``name``) and its weights."""
        if len(self.layers) == 1:
            return self.layers[0], dict(self.weights[0])
        if name in [l.name for l in self.layers]:
            raise ValueError(f"A replacement layer may not reuse the replaced layer's name '{name}' inside its block.")
        weights = {f"{l.name}/{key}": value for l, w in zip(self.layers, self.weights) for key, value in w.items()}
        return keras.Sequential(list(self.layers), name=name), weights


def is_functional(layer) -> bool:
    """A functional `keras.Model` (not a Sequential one, not a subclassed one)."""
    return (isinstance(layer, keras.Model) and not isinstance(layer, keras.Sequential)
            and hasattr(layer, "_inputs_struct"))


def replace_layers(model: keras.Model, replacements: Mapping[str, LayerReplacement]) -> keras.Model:
    """Returns a copy of ``model`` with the named layers replaced.

    Args:
        model: a built Sequential or Functional model (left unchanged).
        replacements: ``{qualified layer name: LayerReplacement}``; layers of
            nested models are named ``outer/inner``.

    Returns:
        The new model (same kind and name). A replacement of several layers
        appears as a `keras.Sequential` block with the replaced layer's name.

    Raises:
        ValueError: an unknown layer name, or a replacement whose weights do
            not fit its layers (`SurgeryError` names the variable).
    """
    if not isinstance(replacements, Mapping) or not all(isinstance(r, LayerReplacement) for r in replacements.values()):
        raise TypeError(
            "`replacements` must map layer names to `kap.LayerReplacement` objects. "
            f"Received: {type(replacements).__name__}"
        )
    by_name = named_layers(model)
    unknown = sorted(set(replacements) - set(by_name))
    if unknown:
        raise ValueError(
            f"Unknown layer name(s) {unknown} in `replacements`. Layers of '{model.name}': "
            f"{sorted(by_name)[:20]}{' ...' if len(by_name) > 20 else ''} (nested layers as outer/inner)."
        )
    targets = {id(by_name[name]): replacement for name, replacement in replacements.items()}

    def rebuild(layer):
        replacement = targets.get(id(layer))
        if replacement is None:
            return copy_layer(layer)
        return replacement.block(layer.name)

    return clone_layers(model, rebuild)


def named_layers(model: keras.Model, prefix: str = "") -> dict[str, keras.layers.Layer]:
    """``{qualified name: layer}`` of every layer, nested models expanded (``outer/inner``)."""
    layers: dict[str, keras.layers.Layer] = {}
    for layer in check_model(model).layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        layers[prefix + layer.name] = layer
        if isinstance(layer, keras.Model):
            layers.update(named_layers(layer, f"{prefix}{layer.name}/"))
    return layers
