"""TensorFlow's own FLOPs count of a Keras model: an independent reference.

The model is traced as a ``tf.function`` at batch size 1, its variables are
frozen into constants (``convert_variables_to_constants_v2``) and the graph
goes to ``tf.compat.v1.profiler.profile`` with the ``float_operation``
options: the figure usually quoted as "the FLOPs of a Keras model". Test
helper only, not part of the package.
"""

from __future__ import annotations

import collections

import keras
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)


def frozen_graph(model: keras.Model) -> tf.Graph:
    """Returns the inference graph of ``model`` at batch 1, weights as constants."""
    specs = [tf.TensorSpec((1, *t.shape[1:]), t.dtype) for t in model.inputs]
    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(specs[0] if len(specs) == 1 else specs)
    return convert_variables_to_constants_v2(concrete).graph


def profiler_flops(model: keras.Model) -> int:
    """Returns the profiler's total float operations of ``model`` at batch 1."""
    options = dict(
        tf.compat.v1.profiler.ProfileOptionBuilder.float_operation(), output="none"
    )
    profile = tf.compat.v1.profiler.profile(frozen_graph(model), options=options)
    return int(profile.total_float_ops)


def profiler_flops_by_op(model: keras.Model) -> dict[str, int]:
    """Returns the profiler's float operations per TF op type (for debugging)."""
    graph = frozen_graph(model)
    totals: dict[str, int] = collections.Counter()
    for op in graph.get_operations():
        try:
            stats = tf_ops.get_stats_for_node_def(graph, op.node_def, "flops")
        except ValueError:
            continue
        if stats.value:
            totals[op.type] += int(stats.value)
    return dict(totals)
