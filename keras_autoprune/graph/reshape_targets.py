"""Reshape targets of a traced layer made runnable.

A reshape target built from ``ops.shape`` of a symbolic tensor holds
``None`` for the unknown batch size (``ops.reshape(x, (B, H, W, C))`` with
``B = ops.shape(x)[0]``), which Keras accepts symbolically but not at run
time. The trace completes it: a single ``None`` with no ``-1`` becomes
``-1`` (the only size that keeps the element count); ``(B, -1, C)`` of an
input whose dimensions other than the batch are static keeps the batch
axis, so ``-1`` becomes the per-sample size and ``B`` becomes ``-1``. The
traced graph is then rebuilt, so that every shape after the reshape is
static again.
"""

from __future__ import annotations

import keras
import numpy as np


def complete_reshape_targets(model: keras.Model) -> keras.Model:
    """``model`` with every completable reshape target completed, rebuilt so its shapes are static again.

    Each rebuild may make a later target completable, so it repeats until
    nothing changes.
    """
    while _complete_once(model):
        model = _rerun(model)
    return model


def _complete_once(model) -> bool:
    """Reshape targets holding ``None`` (a batch size read with ``ops.shape``) made runnable; True if any was.

    ``(None, H, W, C)``: the one ``None`` becomes ``-1``. ``(None, -1, C)``
    of an input ``(None, d_1, ..., d_k)`` with static ``d_i``: a reshape that
    keeps the batch axis, so ``-1`` is the per-sample size ``d_1···d_k / C``
    and ``None`` becomes ``-1``.
    """
    from keras.src.ops.numpy import Reshape

    changed = False
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            operation = node.operation
            target = getattr(operation, "newshape", None) if isinstance(operation, Reshape) else None
            if not isinstance(target, (tuple, list)) or None not in target:
                continue
            completed = _completed_target(list(target), tuple(node.arguments.keras_tensors[0].shape))
            if completed is None:
                continue
            operation.newshape = completed
            config = getattr(operation, "_auto_config", None)
            if config is not None and "newshape" in config.config:
                config.config["newshape"] = completed
            changed = True
    return changed


def _completed_target(target: list, shape: tuple) -> tuple | None:
    if target.count(None) == 1 and -1 not in target:
        return tuple(-1 if d is None else d for d in target)
    rest = target[1:]
    if target[0] is not None or None in rest or not shape or shape[0] is not None or None in shape[1:]:
        return None
    per_sample = int(np.prod(shape[1:], dtype=np.int64))
    if rest.count(-1) == 1:
        known = int(np.prod([d for d in rest if d != -1], dtype=np.int64))
        if known <= 0 or per_sample % known:
            return None
        rest[rest.index(-1)] = per_sample // known
    if -1 in rest or int(np.prod(rest, dtype=np.int64)) != per_sample:
        return None
    return (-1, *rest)


def _rerun(model: keras.Model) -> keras.Model:
    """``model``'s graph called again on new inputs (its operations' output shapes recomputed)."""
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name) for t in model.inputs]
    outputs = model._run_through_graph(keras.tree.pack_sequence_as(model._inputs_struct, inputs), operation_fn=lambda op: op)
    return keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs, name=model.name)
