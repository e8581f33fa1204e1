"""Projections enforced inside the compiled train step (EigenDamage's fine-tuning).

Training the core ``C`` of a factorised layer with its rotations fixed is
training the full kernel restricted to the subspace they span. Each
factorised kernel gets two non-trainable projection variables
``P_in = Q_in Q_inᵀ`` (``Cin × Cin``) and ``P_out = Q_out Q_outᵀ``
(``Cout × Cout``) and a `ProjectionConstraint`; Keras 3 optimizers apply
variable constraints after every update inside the compiled step, so

    K_k ← P_in K_k P_out        (every kernel offset k, after each step)

runs with no Python per batch, and a new round only assigns new projection
values (no retracing). With plain SGD (with or without momentum or weight
decay) a step followed by the projection is exactly a step on the core,
because the rotations are orthonormal; with adaptive optimizers (Adam) the
per-coordinate scaling happens in the full basis, so it is close but not
identical. Biases are not projected: the last rotation layer carries the
full bias.

A constraint the kernel already has (e.g. ``keras.constraints.MaxNorm``)
runs first and the projection last, so the kernel always ends a step in
its subspace and the three-layer model equals the trained one; the user's
constraint then holds up to the projection. It is restored after ``fit``
(the three-layer model has no kernel constraints).
"""

from __future__ import annotations

import keras
import numpy as np

from keras_autoprune.callbacks.masks import InstalledConstraint, users_constraint, warn_stale
from keras_autoprune.surgery.factorization import FactorizationPlan


class ProjectionConstraint(InstalledConstraint):
    """The previous constraint, if any, then ``P_in · K_k · P_out`` for every kernel offset."""

    def __init__(self, p_in: keras.Variable, p_out: keras.Variable, previous=None):
        self.p_in = p_in
        self.p_out = p_out
        self.previous = previous

    def __call__(self, w):
        if self.previous is not None:
            w = self.previous(w)
        return keras.ops.matmul(keras.ops.matmul(keras.ops.cast(self.p_in, w.dtype), w), keras.ops.cast(self.p_out, w.dtype))


class ProjectionSet:
    """The projections of a model's factorisable kernels.

    Args:
        layers: ``{qualified name: layer}`` whose kernels may be projected.
    """

    def __init__(self, layers: dict[str, keras.layers.Layer]):
        self.layers = dict(layers)
        self._variables: dict[str, tuple[keras.Variable, keras.Variable]] = {}
        self._previous: dict[str, object] = {}

    def install(self, strategy=None) -> None:
        """Adds identity projections as constraints on the kernels.

        Args:
            strategy: the model's `tf.distribute` strategy, so that every
                replica reads the projection variables.
        """
        if strategy is not None:
            with strategy.scope():
                return self.install()
        stale = 0
        for name, layer in self.layers.items():
            if name in self._variables:
                continue
            cin, cout = layer.kernel.shape[-2:]
            p_in = keras.Variable(np.eye(cin, dtype="float32"), trainable=False, name="kap_projection_in")
            p_out = keras.Variable(np.eye(cout, dtype="float32"), trainable=False, name="kap_projection_out")
            own = users_constraint(layer.kernel.constraint)
            stale += own is not layer.kernel.constraint
            self._variables[name] = (p_in, p_out)
            self._previous[name] = own
            layer.kernel.constraint = ProjectionConstraint(p_in, p_out, own)
        warn_stale(stale)

    def remove(self) -> None:
        """Restores the original kernel constraints."""
        for name, previous in self._previous.items():
            self.layers[name].kernel.constraint = previous
        self._variables.clear()
        self._previous.clear()

    def apply(self, plan: FactorizationPlan) -> None:
        """Sets every projection from ``plan`` (identity for layers it leaves whole) and projects the kernels now.

        Right after this call the live model equals ``plan.project(model)``.
        """
        for name, (p_in, p_out) in self._variables.items():
            layer = self.layers[name]
            factorization = plan.layers.get(name)
            if factorization is None:
                p_in.assign(np.eye(p_in.shape[0], dtype="float32"))
                p_out.assign(np.eye(p_out.shape[0], dtype="float32"))
                continue
            p_in.assign((factorization.q_in @ factorization.q_in.T).astype("float32"))
            p_out.assign((factorization.q_out @ factorization.q_out.T).astype("float32"))
            layer.kernel.assign(factorization.project(layer.kernel.numpy()).astype(layer.kernel.dtype))
