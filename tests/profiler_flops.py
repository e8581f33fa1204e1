"""TensorFlow profiler FLOPs of a Keras model, as an independent reference.

The model is traced as a ``tf.function`` at batch size 1, its variables are
frozen into constants (``convert_variables_to_constants_v2``) and the graph is
handed to ``tf.compat.v1.profiler.profile`` with the ``float_operation``
options. This is the figure usually quoted as "the FLOPs of a Keras model".
Test helper only: it is not part of the package.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)


def _frozen_graph(model: keras.Model) -> tf.Graph:
    specs = [
        tf.TensorSpec((1,) + tuple(t.shape[1:]), t.dtype) for t in model.inputs
    ]
    arg = specs[0] if len(specs) == 1 else specs
    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(arg)
    return convert_variables_to_constants_v2(concrete).graph


def profiler_flops_by_op(model: keras.Model) -> dict[str, int]:
    """Returns the profiler's float operations per TF op type, at batch 1."""
    graph = _frozen_graph(model)
    opts = (
        tf.compat.v1.profiler.ProfileOptionBuilder(
            tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
        )
        .with_empty_output()
        .build()
    )
    opts["output"] = "none"
    opts["order_by"] = "float_ops"
    opts["select"] = ["float_ops"]
    prof = tf.compat.v1.profiler.profile(graph, cmd="op", options=opts)
    return {c.name: int(c.total_float_ops) for c in prof.children}


def profiler_flops(model: keras.Model) -> int:
    """Returns the profiler's total float operations of ``model`` at batch 1."""
    graph = _frozen_graph(model)
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts = dict(opts, output="none")
    prof = tf.compat.v1.profiler.profile(graph, options=opts)
    return int(prof.total_float_ops)
