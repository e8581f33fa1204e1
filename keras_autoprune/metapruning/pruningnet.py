"""`PruningNet`: a hyper-network that generates a model's weights for any gene.

For every trainable weight tensor ``W`` of two or more dimensions in a layer
whose channels a prunable group changes (the kernels of convolutions,
depthwise convolutions and Dense layers; also, where such layers are
touched, MultiHeadAttention projections, Embedding tables or PReLU
slopes), a two-layer perceptron maps the layer's encoding ``e = (in_scale,
out_scale)`` (fractions of its input and output channels kept by the gene)
to the full tensor:

``W(e) = reshape(relu(e A + a) B / sqrt(H) + b)``,   ``A: 2 x H``, ``B: H x numel(W)``.

The ``1 / sqrt(H)`` keeps the generator's step on ``W`` at the scale of the
learning rate: an SGD step of rate ``lr`` on ``B`` and ``b`` moves ``W(e)``
by ``lr (1 + |h(e)|^2 / H) g`` (``h(e)`` the hidden activation, ``g`` the
gradient on ``W``), about ``2 lr g``, where without the factor it moves it by
``lr (1 + |h(e)|^2) g``, about ``H lr g`` with ``A`` drawn from N(0, 1).
Without it a warm-started PruningNet loses its trained weights within 60
batches even at ``lr = 1e-3`` (its full gene's loss went from 0.20 to 2.1
on CIFAR-10's ResNet-20).

The model runs with ``W(e)`` masked to the gene's channels, using the same
per-layer masks as `kap.mask_plan` (so the PruningNet's output for a gene
equals the output of the slim model `PruningNet.materialize` builds). The
other per-channel variables (biases, BatchNormalization ``gamma``/``beta``)
are shared by all genes and masked likewise; BatchNormalization statistics
are shared during training and re-estimated per candidate before scoring.

Warm start (DECIDE, the default): ``B = 0`` and ``b = W_trained``, so at
every gene the PruningNet starts from the user's trained weights cropped to
the gene (the paper trains from scratch; starting from a converged model
makes a few epochs enough on a CPU). ``warm_start=False`` draws ``b`` from
a He-normal distribution and ``B`` small, so the generated kernels start as
from scratch; the variables without a generator (biases, BatchNormalization
``gamma`` and ``beta``, layers outside every group) keep the model's values.

Channel order (DECIDE): a gene keeps the first channels of each group in
an order fixed when the PruningNet is built. ``channel_order="index"`` (the
default) keeps channels ``0 .. width - 1``; ``"l1"`` sorts each group by the
L1 norm of the trained filters creating its channels
(`kap.surgery.importance.channel_l1`), largest first, so that a warm start
begins every gene at the trained network cut down to its strongest channels
(uniform L1 pruning, for a uniform gene) rather than at its first ones.

The model runs through ``Model.stateless_call`` with the generated values in
place of its variables, so any functional model works unchanged and
gradients reach ``A, a, B, b``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import keras
import numpy as np

from keras_autoprune.callbacks.masks import maskable_layers
from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.metapruning.genes import DEFAULT_SCALES, GeneSpace
from keras_autoprune.surgery.importance import channel_l1
from keras_autoprune.surgery.keep import layer_keeps
from keras_autoprune.surgery.plan import PrunePlan
from keras_autoprune.surgery.rebuild import apply_plan
from keras_autoprune.surgery.weights import weight_keys


CHANNEL_ORDERS = ("index", "l1")
"""The orders in which a gene keeps each group's channels (see the module docstring)."""


class PruningNet(keras.Model):
    """Generates weights for every channel configuration of ``model``.

    Args:
        model: a trained (or freshly built) Sequential or Functional model;
            it is copied and never changed.
        scales: the width choices of every gene (`GeneSpace`).
        hidden: units ``H`` of each generator's hidden layer (the paper
            uses 32 to 64).
        warm_start: start every generated tensor at ``model``'s weights
            (``True``) or from a random initialisation (``False``).
        channel_order: ``"index"`` (keep each group's first channels) or
            ``"l1"`` (keep those of largest L1 norm first).
        seed: seed of the generators' initialisation.

    Attributes:
        base: the copy of ``model`` whose variables are generated.
        space: the `GeneSpace` (one gene per prunable channel group).
        channel_order: ``"index"`` or ``"l1"``, as given.
        gene: the gene the network currently runs.

    Example:

    >>> net = PruningNet(model)                              # doctest: +SKIP
    >>> net.compile("sgd", loss)                             # doctest: +SKIP
    >>> net.fit(data, epochs=2, callbacks=[GeneSampler()])   # doctest: +SKIP
    >>> slim = net.materialize(gene)                         # doctest: +SKIP
    """

    def __init__(self, model: keras.Model, scales: Sequence[float] = DEFAULT_SCALES, hidden: int = 32,
                 warm_start: bool = True, seed: int = 0, channel_order: str = "index", name: str | None = None):
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise ValueError(f"`hidden` is the width of each generator's hidden layer, an int >= 1. Received: hidden={hidden!r}")
        if channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"`channel_order` must be one of {CHANNEL_ORDERS}. Received: channel_order={channel_order!r}")
        super().__init__(name=name or f"{model.name}_pruningnet")
        base = apply_plan(model, PrunePlan({}))  # an independent copy with the same weights
        # Frozen layers are about the user's own fine-tuning; the hyper-network trains every generator.
        for layer in base._flatten_layers(include_self=True, recursive=True):
            layer.trainable = True
        self.graph = DependencyGraph(base)
        orders = ({group: np.argsort(-score, kind="stable") for group, score in channel_l1(self.graph).items()}
                  if channel_order == "l1" else {})
        self.space = GeneSpace(self.graph, scales, {g.id: orders[g.id] for g in self.graph.prunable_groups if g.id in orders})
        self.channel_order = channel_order
        self.base = base
        self.hidden = hidden
        self.warm_start = bool(warm_start)
        rng = np.random.default_rng(seed)
        self._layers_touched = maskable_layers(self.graph)
        self._masks: dict[int, keras.Variable] = {}
        self._generators: dict[int, _Generator] = {}
        for _, layer in self._layers_touched.values():
            for key, variable in zip(weight_keys(layer), layer.weights):
                if not variable.trainable:
                    continue
                self._masks[id(variable)] = keras.Variable(np.ones(variable.shape, "float32"), trainable=False,
                                                           name=f"mask_{key}")
                if len(variable.shape) >= 2:
                    self._generators[id(variable)] = _Generator(self, variable, hidden, self.warm_start, rng)
                    variable.trainable = False  # its value comes from the generator
        # Moving statistics of a channel are updated only while the gene keeps it (the mask of the layer's
        # same-shaped trainable variable, e.g. BatchNormalization gamma): removed channels read 0.
        self._statistic_masks: dict[int, keras.Variable] = {}
        for _, layer in self._layers_touched.values():
            masks = [self._masks[id(v)] for v in layer.weights if id(v) in self._masks]
            for variable in layer.weights:
                if not variable.trainable:
                    same = [m for m in masks if tuple(m.shape) == tuple(variable.shape)]
                    if same:
                        self._statistic_masks[id(variable)] = same[0]
        self._encodings = {key: keras.Variable(np.ones((1, 2), "float32"), trainable=False, name="encoding")
                           for key in self._layers_touched}
        self._layer_of = {id(v): id(layer) for _, layer in self._layers_touched.values() for v in layer.weights}
        self.gene = self.space.full

    # -- genes ----------------------------------------------------------------
    def set_gene(self, gene: Sequence[int]) -> None:
        """Runs the network at ``gene`` from now on (assigns masks and encodings; no retracing)."""
        gene = self.space.check(gene)
        plan = self.space.plan(gene)
        keeps = layer_keeps(self.graph, plan.removed_atoms(self.graph))
        for key, (handler, layer) in self._layers_touched.items():
            keep = keeps.get(key)
            ones = {k: np.ones(v.shape, "float32") for k, v in zip(weight_keys(layer), layer.weights)}
            masks = handler.mask(layer, ones, keep) if keep is not None else ones
            for k, variable in zip(weight_keys(layer), layer.weights):
                if id(variable) in self._masks:
                    self._masks[id(variable)].assign((np.asarray(masks[k]) != 0).astype("float32"))
            encoding = [1.0, 1.0] if keep is None else [_kept_fraction(keep.inputs), _kept_fraction(keep.outputs)]
            self._encodings[key].assign(np.array([encoding], "float32"))
        self.gene = gene

    def materialize(self, gene: Sequence[int] | None = None) -> keras.Model:
        """The slim plain Keras model of ``gene`` (default: the current one) with generated weights.

        Built by `kap.apply_plan` from the base model holding the generated
        weights (their values are written into ``base``'s kernels, which the
        PruningNet's own forward pass never reads); its BatchNormalization
        statistics are the shared ones of training: re-estimate them
        (`kap.recalibrate_batchnorm`) before use. Every weight it holds trains
        (the generated kernels are frozen only in ``base``).
        """
        if gene is not None:
            self.set_gene(gene)
        for generator in self._generators.values():
            generator.variable.assign(keras.ops.convert_to_numpy(generator.value()))
        slim = apply_plan(self.base, self.space.plan(self.gene), graph=self.graph)
        generated = {generator.variable.path for generator in self._generators.values()}
        for variable in slim.variables:
            if variable.path in generated:  # frozen in ``base`` because the generator supplies its value
                variable.trainable = True
        return slim

    # -- forward ----------------------------------------------------------------
    def call(self, inputs, training=False):
        trainable = [self._value(v) for v in self.base.trainable_variables]
        non_trainable = [self._value(v) for v in self.base.non_trainable_variables]
        outputs, updated = self.base.stateless_call(trainable, non_trainable, inputs, training=training)
        if training:
            for variable, value in zip(self.base.non_trainable_variables, updated):
                if id(variable) in self._generators:
                    continue
                mask = self._statistic_masks.get(id(variable))
                variable.assign(value if mask is None else keras.ops.where(mask > 0, value, variable))
        return outputs

    def _value(self, variable):
        key = id(variable)
        generator = self._generators.get(key)
        if generator is not None:
            return generator.value() * self._masks[key]
        if key in self._masks:
            return variable * self._masks[key]
        return variable.value

    def trained_weights(self) -> list:
        """The weights that define the trained network, in a fixed order.

        Every weight but those that follow the current gene (masks,
        encodings) and the base kernels that a generator supplies (which
        `materialize` overwrites): setting a gene or building a winner leaves
        them unchanged, training changes them.
        """
        volatile = {id(v) for v in (*self._masks.values(), *self._encodings.values())}
        volatile |= {id(generator.variable) for generator in self._generators.values()}
        return [weight for weight in self.weights if id(weight) not in volatile]

    def encoding(self, variable) -> keras.Variable:
        """The ``(in_scale, out_scale)`` encoding variable of ``variable``'s layer."""
        return self._encodings[self._layer_of[id(variable)]]


class _Generator:
    """``W(e) = reshape(relu(e A + a) B / sqrt(H) + b)`` for one weight tensor (see the module docstring)."""

    def __init__(self, net: PruningNet, variable, hidden: int, warm_start: bool, rng: np.random.Generator):
        self.net = net
        self.variable = variable
        self.shape = tuple(variable.shape)
        size = int(np.prod(self.shape))
        fan_in = size // self.shape[-1]
        name = variable.path.replace("/", "_")
        self.first = net.add_weight(shape=(2, hidden), name=f"{name}_A",
                                    initializer=keras.initializers.Constant(rng.normal(0, 1, (2, hidden)).astype("float32")))
        self.first_bias = net.add_weight(shape=(hidden,), name=f"{name}_a", initializer="zeros")
        if warm_start:
            second, start = np.zeros((hidden, size), "float32"), np.asarray(variable.numpy(), "float32").reshape(-1)
        else:
            std = np.sqrt(2.0 / fan_in)
            second = rng.normal(0, 0.01 * std * np.sqrt(hidden), (hidden, size)).astype("float32")
            start = rng.normal(0, std, size).astype("float32")
        self.second = net.add_weight(shape=(hidden, size), name=f"{name}_B", initializer=keras.initializers.Constant(second))
        self.second_bias = net.add_weight(shape=(size,), name=f"{name}_b", initializer=keras.initializers.Constant(start))
        self.scale = 1.0 / np.sqrt(hidden)

    def value(self):
        encoding = self.net.encoding(self.variable)
        hidden = keras.ops.relu(keras.ops.matmul(encoding, self.first) + self.first_bias)
        flat = keras.ops.matmul(hidden, self.second) * self.scale + self.second_bias
        return keras.ops.reshape(flat, self.shape)


class GeneSampler(keras.callbacks.Callback):
    """Draws a uniformly random gene before every training batch of a `PruningNet`.

    Each choice is drawn independently and uniformly among the width scales
    (the paper's training distribution). Evaluation batches run the gene
    left by the last training batch.

    Args:
        seed: seed of the draws (training is then reproducible given the data order).
    """

    def __init__(self, seed: int | None = 0):
        super().__init__()
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def on_train_begin(self, logs=None):
        if not isinstance(self.model, PruningNet):
            raise TypeError(
                "GeneSampler drives a kap.metapruning.PruningNet: use it in `pruningnet.fit(...)`. "
                f"Received: a model of type {type(self.model).__name__}"
            )
        if getattr(self.model, "steps_per_execution", 1) > 1:
            warnings.warn(
                f"GeneSampler draws a gene per call of the train function; with steps_per_execution="
                f"{self.model.steps_per_execution} each gene trains that many batches. Compile with "
                "steps_per_execution=1 for one gene per batch.",
                stacklevel=2,
            )

    def on_train_batch_begin(self, batch, logs=None):
        self.model.set_gene(self.model.space.random(self._rng))

    def on_train_end(self, logs=None):
        self.model.set_gene(self.model.space.full)


def _kept_fraction(keeps: Sequence[np.ndarray]) -> float:
    kept = np.asarray(keeps[0], bool) if len(keeps) else np.ones(1, bool)
    return float(kept.mean()) if kept.size else 1.0
