"""`clone_layers`: the one cloning loop behind every surgery.

`apply_plan`, `mask_plan`, `replace_layers` and `FactorizationPlan` all
build a model the same way: `keras.models.clone_model` walks the model
recursively (nested Sequential and Functional models included, shared layers
cloned once), and a *rebuild* function gives, for each original layer, the
layer that takes its place:

- a layer surgery does not change is copied as it is (`copy_layer`: state
  and weights deep-copied by `keras_autoprune.surgery.duplicate`, never
  rebuilt from its config), so a custom, unnamed-sublayer or
  non-serialisable layer (a `Lambda`) never breaks the model;
- a nested model or a traced custom layer (``nested``) is cloned layer by
  layer on new inputs of the widths it now receives; a custom layer seen
  through (`keras_autoprune.graph.trace`) becomes its traced functional
  model, made of standard layers;
- a layer surgery changes is rebuilt from its changed config
  (`layer_from_config`) and receives its new weights once the clone is built,
  matched by variable path, else by position with shape checks
  (`keras_autoprune.surgery.weights.assign_weights`).

The input model is never modified.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from keras_autoprune.errors import UnsupportedModelError
from keras_autoprune.graph.handlers.shape_ops import copy_operation
from keras_autoprune.graph.trace import expand_outputs
from keras_autoprune.surgery.duplicate import duplicate_layer
from keras_autoprune.surgery.weights import assign_weights, layer_weights

#: ``rebuild(layer) -> (new_layer, {weight key: value} or None)``; ``None``
#: means the new layer already holds its weights (a copy).
Rebuild = Callable[[keras.layers.Layer], tuple[keras.layers.Layer, dict[str, np.ndarray] | None]]
#: ``nested(layer) -> (functional model to clone in its place, new input shapes)`` or None.
Nested = Callable[[keras.layers.Layer], "tuple[keras.Model, list[tuple]] | None"]


def clone_layers(model: keras.Model, rebuild: Rebuild, rebuild_op: Callable | None = None,
                 nested: Nested | None = None, drop: frozenset[int] = frozenset()) -> keras.Model:
    """Clones ``model`` with every layer replaced by ``rebuild(layer)``.

    Args:
        model: a built Sequential or Functional model (left unchanged).
        rebuild: returns, for one original layer, the layer that takes its
            place (a copy, or an unbuilt layer: any layer, a
            `keras.Sequential` of several included) and the values of the new
            layer's weights keyed as `keras_autoprune.surgery.weights.weight_keys`
            names them (``None`` for a copy that holds its weights).
        rebuild_op: returns, for one `keras.ops` node (not a layer), what
            the clone calls in its place (the operation itself, or a
            rewritten call); by default every operation is reused as is.
        nested: for nested models and traced custom layers, the functional
            model to clone in their place and the shapes of its new inputs
            (their channel widths may have changed); None clones nested
            models with Keras's ``recursive=True`` at their original widths.
        drop: ``id`` of layers to remove, each mapping its first input to its
            output unchanged (a normalisation folded into its producer): in a
            Functional graph its node disappears (its input tensor takes its
            output's place), in a Sequential model it becomes a
            `keras.layers.Identity` of the same name. Without ``nested``, a
            Functional graph inside a Sequential one cannot drop nodes (Keras
            does not hand ``call_function`` through a Sequential).

    Returns:
        The new model, same kind and name, with its weights assigned.
    """
    new_weights: list[tuple[keras.layers.Layer, dict[str, np.ndarray]]] = []

    cache: dict[int, keras.layers.Layer] = {}
    traced: dict[int, keras.Model] = {}  # clone standing for a custom layer seen through -> its traced model
    placeholders: set[int] = set()  # Identity layers standing for dropped ones

    def call(new_layer, *args, **kwargs):
        if id(new_layer) in placeholders:
            return args[0]
        if id(new_layer) not in traced:
            return new_layer(*args, **kwargs)
        # A traced model takes the custom layer's tensor arguments, in node order,
        # and returns its tensor outputs; the layer's constant outputs are put back.
        tensors = [a for a in keras.tree.flatten((args, kwargs)) if isinstance(a, keras.KerasTensor)]
        outputs = new_layer(keras.tree.pack_sequence_as(new_layer._inputs_struct, tensors))
        return expand_outputs(traced[id(new_layer)], keras.tree.flatten(outputs))

    def replay(source, **kwargs):
        calls = {} if isinstance(source, keras.Sequential) else {"call_function": call}
        return clone_model(source, clone_function=clone, **calls, **kwargs)

    def clone(layer):
        if not isinstance(layer, keras.layers.Layer):  # a stateless `keras.ops` node
            new_op = layer if rebuild_op is None else rebuild_op(layer)
            if new_op is not layer:
                return new_op
            try:
                return copy_operation(layer)
            except Exception:  # noqa: BLE001 - an op Keras cannot rebuild from its config is reused
                return layer
        if id(layer) in cache:
            return cache[id(layer)]
        inner = nested(layer) if nested is not None and id(layer) not in drop else None
        if id(layer) in drop:
            new_layer = keras.layers.Identity(name=layer.name)
            placeholders.add(id(new_layer))
        elif inner is not None:
            functional, shapes = inner
            inputs = [keras.Input(batch_shape=s, dtype=t.dtype, name=t.name) for s, t in zip(shapes, functional.inputs)]
            inputs = keras.tree.pack_sequence_as(functional._inputs_struct, inputs)
            if isinstance(layer, keras.Sequential):  # stays a Sequential
                functional = layer
            new_layer = replay(functional, input_tensors=inputs)
            if not isinstance(layer, keras.Model):
                traced[id(new_layer)] = functional
        else:
            new_layer, weights = rebuild(layer)
            if weights is not None:
                new_weights.append((new_layer, weights))
        cache[id(layer)] = new_layer
        return new_layer

    if nested is not None:
        new_model = replay(model)
    else:
        calls = {"call_function": call} if drop and not isinstance(model, keras.Sequential) else {}
        new_model = clone_model(model, clone_function=clone, recursive=True, **calls)
    for new_layer, weights in new_weights:
        assign_weights(new_layer, weights)
    return new_model


def clone_model(model: keras.Model, **kwargs) -> keras.Model:
    """`keras.models.clone_model`, also for a model compiled with objects Keras cannot deserialise.

    Keras compiles a clone from ``model.get_compile_config()``, which fails
    for an unregistered custom loss or metric function. Then the clone is
    compiled with the same loss, loss weights and metrics objects and a fresh
    optimizer of the same configuration instead.
    """
    if not getattr(model, "compiled", False):
        return keras.models.clone_model(model, **kwargs)
    try:
        keras.saving.deserialize_keras_object(model.get_compile_config())  # what Keras will do
    except (TypeError, ValueError):
        pass
    else:
        return keras.models.clone_model(model, **kwargs)
    model.compiled = False  # clone without the compile config, then compile from the objects
    try:
        new_model = keras.models.clone_model(model, **kwargs)
    finally:
        model.compiled = True
    settings = dict(getattr(model, "_compile_config").config)
    optimizer = settings.pop("optimizer", None)
    if isinstance(optimizer, keras.optimizers.Optimizer):
        optimizer = type(optimizer).from_config(optimizer.get_config())
    new_model.compile(optimizer=optimizer, **settings)
    return new_model


def copy_layer(layer: keras.layers.Layer) -> tuple[keras.layers.Layer, dict[str, np.ndarray] | None]:
    """An independent copy of ``layer`` for `clone_layers`: ``(copy, None)``.

    The copy is `duplicate_layer`'s (state and weights deep-copied). Only if
    that fails (an attribute Python cannot deep-copy) is the layer rebuilt
    from ``get_config()``, returning ``(new layer, its weights)`` (assigned by
    key, else by position).

    Raises:
        UnsupportedModelError: neither works; names the layer, both
            failures and the fix.
    """
    try:
        return duplicate_layer(layer), None
    except Exception as copy_error:  # noqa: BLE001 - any failure falls back to the config
        try:
            return type(layer).from_config(layer.get_config()), layer_weights(layer)
        except Exception as config_error:  # noqa: BLE001 - reported with the fix
            cls = type(layer).__name__
            raise UnsupportedModelError(
                f"Layer '{layer.name}' ({cls}) cannot be copied into the new model: copying its state "
                f"failed ({type(copy_error).__name__}: {copy_error}) and rebuilding it from its config "
                f"failed ({type(config_error).__name__}: {config_error}). Fix: make `{cls}.get_config()` "
                f"return every `__init__` argument, so that `{cls}.from_config(layer.get_config())` "
                "rebuilds the layer, or build the model from standard Keras layers."
            ) from config_error


def layer_from_config(layer: keras.layers.Layer, config: dict) -> keras.layers.Layer:
    """``type(layer).from_config(config)`` for a layer that surgery changes.

    Raises:
        UnsupportedModelError: the class cannot be rebuilt from its (changed)
            config; names the layer and the fix, instead of Keras's error.
    """
    try:
        return type(layer).from_config(config)
    except Exception as error:  # noqa: BLE001 - reported with the fix
        cls = type(layer).__name__
        raise UnsupportedModelError(
            f"Layer '{layer.name}' ({cls}) must be rebuilt with new channels, but "
            f"`{cls}.from_config` failed on its changed config ({type(error).__name__}: {error}). "
            f"Fix: make `{cls}.get_config()` return every `__init__` argument, so that "
            f"`{cls}.from_config(layer.get_config())` rebuilds the layer, or leave the channel "
            f"groups through '{layer.name}' out of the plan."
        ) from error
