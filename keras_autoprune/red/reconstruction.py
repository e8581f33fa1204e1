"""Least-squares refit of RED's compressed layers on inputs, against the model before compression.

Hashing, near-identical merging and the truncated SVD keep each kernel
close, not each layer's output, and the errors of successive layers add up.
Given inputs ``X`` (synthesized without data by default,
`keras_autoprune.red.synthesis`), layers are refitted one after the other in
graph order, each so that it reproduces, from its input in the compressed
model, what its counterpart computed in the reference model (before the
activation):

    [W; b] = argmin ‖[F 1][W; b] − Y‖² + λ ‖W‖²,   λ = ridge · tr(FᵀF) / n,

where the rows are the output positions of every input and the ``n``
columns of ``F`` are

- a convolution's input patches (``k_h·k_w·C_in``, in its kernel's order),
- a dense layer's input,
- a depthwise convolution's patches of one input channel (``k_h·k_w``; one
  fit per channel),
- a separated block's depthwise outputs, ``depthwise(tile(X̃))`` (its 1×1
  part is refitted; `reconstruct_pointwise` keeps the depthwise kernels,
  `reconstruct_layers` first replaces them by the rank-``M`` factors of the
  full convolution fitted on the block's input patches, so that hashed or
  truncated depthwise kernels do not bound the fit),

``X̃`` being the layer's input in the compressed model, whose earlier layers
are already refitted (so each fit also absorbs the error left upstream).
``Y = layer_ref(X_ref)`` is the reference layer's pre-activation output on
the reference model's own input, restricted to the output channels the
compressed layer kept (``kept``: the channels merging did not remove; a
merged cluster's kept channel is fitted to its own reference channel, and
its readers' refit then recombines the cluster). ``FᵀF``, ``Fᵀ1`` and
``FᵀY`` are accumulated in float64 over batches, so memory does not grow
with the number of inputs.

Two entry points: `reconstruct_pointwise` refits the 1×1 parts of the
blocks it is given (RED's default, the approximate separations);
`reconstruct_layers` refits every linear layer and separated block whose
output differs from the reference's (``refit_layers="all"``).

Decision (scope): top-level layers of both models, called once, are
refitted; the others (inside nested models, shared layers, grouped or
``channels_first`` convolutions, layers of other types) keep their weights
and are not listed as refitted.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_autoprune.red.low_rank import block_factors, channel_svd
from keras_autoprune.red.separation import block_parts

RIDGE = 1e-3
"""``ridge`` in the formula above: a relative Tikhonov weight that keeps rare directions of ``F`` bounded."""

_BATCH = 32
_SAME = 1e-6  # relative difference under which a layer's input and weights count as the reference's


def reconstruct_pointwise(model: keras.Model, reference: keras.Model, layers, inputs: np.ndarray,
                          ridge: float = RIDGE) -> tuple[str, ...]:
    """Refits, in place, the 1×1 convolution (kernel and bias) of the separated blocks named in ``layers``.

    Args:
        model: the compressed model holding the blocks (changed in place: it
            is RED's own output).
        reference: the model before the approximation, with the original
            convolutions under the same names and output channels (left
            unchanged).
        layers: the separated blocks' names, in graph order.
        inputs: model inputs to fit on.
        ridge: ``ridge`` in the formula above.

    Returns:
        The names of the blocks refitted.

    Raises:
        ValueError: no inputs, or a negative ``ridge``.
    """
    _check(inputs, ridge)
    refitted = []
    for name in layers:
        pair = _single_call_pair(model, reference, name)
        if pair is not None:
            _refit(*pair, model, reference, inputs, ridge, None)
            refitted.append(name)
    return tuple(refitted)


def reconstruct_layers(model: keras.Model, reference: keras.Model, inputs: np.ndarray,
                       kept: dict[str, np.ndarray] | None = None, ridge: float = RIDGE,
                       anchored: bool = False, plan=None) -> tuple[str, ...]:
    """Refits, in place, every linear layer and separated block of ``model`` whose output differs from ``reference``'s.

    A layer is left as it is when its weights and, on the first batch, its
    input equal its reference counterpart's (to 1e-6 relative): it already
    computes the reference's output.

    Args:
        model: the compressed model (changed in place: it is RED's own
            output).
        reference: the model before compression (BatchNormalization folded),
            its layers under the same names (left unchanged).
        inputs: model inputs to fit on.
        kept: ``{layer: boolean mask over the reference layer's output
            channels}`` for the layers whose output channels were merged
            away; a layer not in it keeps all of them.
        plan: instead of ``kept``, the `kap.PrunePlan` that made ``model``
            from ``reference`` (``kap.apply_plan(reference, plan)``): the
            masks are its kept channels. A pruned model keeps its
            BatchNormalizations; each convolution is then fitted to the
            reference convolution's output before its normalisation.
        ridge: ``ridge`` in the formula above.
        anchored: penalise ``λ‖W − W₀‖²`` instead, ``W₀`` the layer's
            current weights (for a block's convolution fit, the kernel the
            block computes): a large ``ridge`` then keeps a layer near its
            weights where the data term is weak. Off by default: on the
            converged CIFAR-10 ResNet-20 it helped where the compression
            changed little and hurt where it changed much
            (docs/methods/red.md, "3c").

    Returns:
        The names of the layers refitted, in graph order.

    Raises:
        ValueError: no inputs, or a negative ``ridge``.
    """
    _check(inputs, ridge)
    if plan is not None:
        if kept is not None:
            raise ValueError("Expected `kept` or `plan`, not both. Received: both. Fix: pass only the plan.")
        from keras_autoprune.graph.dependency import DependencyGraph
        from keras_autoprune.red.unfolding import kept_outputs

        kept = kept_outputs(DependencyGraph(reference), plan, {layer.name for layer in model.layers})
    kept = kept or {}
    refitted = []
    for layer in model.layers:
        pair = _single_call_pair(model, reference, layer.name)
        kind = _kind(layer)
        # the reference must compute the layer's output itself: a convolution for a block, else the same kind
        if pair is None or kind is None or _kind(pair[1]) != ("conv" if kind == "block" else kind):
            continue
        if _refit(*pair, model, reference, inputs, ridge, kept.get(layer.name), skip_unchanged=True, refactor=True,
                  anchored=anchored):
            refitted.append(layer.name)
    return tuple(refitted)


def _check(inputs: np.ndarray, ridge: float) -> None:
    if len(inputs) == 0:
        raise ValueError("Expected at least one input to refit the compressed layers on. Received: an empty array. "
                         "Fix: pass a batch of model inputs (or synthesize_images(model)).")
    if not ridge >= 0:
        raise ValueError(f"Expected `ridge` to be a number >= 0. Received: ridge={ridge!r}")


def _single_call_pair(model, reference, name: str):
    """``(layer, counterpart)`` when both are top-level layers called once, else None."""
    if name not in {layer.name for layer in model.layers} or name not in {layer.name for layer in reference.layers}:
        return None
    layer, counterpart = model.get_layer(name), reference.get_layer(name)
    if len(layer._inbound_nodes) != 1 or len(counterpart._inbound_nodes) != 1:
        return None
    return layer, counterpart


def _kind(layer) -> str | None:
    """``"block"``, ``"depthwise"``, ``"conv"``, ``"dense"``, or None for a layer this module does not refit.

    A nested model is a ``"block"`` only if it is a 2D separated block (a depthwise convolution, then a 1×1
    convolution; `keras_autoprune.red.separation.block_parts`).
    """
    if isinstance(layer, keras.Model):
        try:
            _, depthwise, pointwise = block_parts(layer)
        except (ValueError, TypeError):
            return None
        separated = (type(depthwise) is keras.layers.DepthwiseConv2D and type(pointwise) is keras.layers.Conv2D
                     and tuple(pointwise.kernel_size) == (1, 1))
        return "block" if separated else None
    config = layer.get_config()
    if config.get("data_format", "channels_last") != "channels_last":
        return None
    if type(layer) is keras.layers.DepthwiseConv2D:
        return "depthwise"
    if type(layer) is keras.layers.Conv2D and config.get("groups", 1) == 1:
        return "conv"
    if type(layer) is keras.layers.Dense:
        return "dense"
    return None


def _called_on(layer):
    """The tensor of the outer graph that ``layer`` is called on (a nested model's ``input`` is its own)."""
    return layer._inbound_nodes[0].input_tensors[0]


def _refit(layer, counterpart, model, reference, inputs: np.ndarray, ridge: float, mask: np.ndarray | None,
           skip_unchanged: bool = False, refactor: bool = False, anchored: bool = False) -> bool:
    """Refits ``layer`` (a block's 1×1 part for a block); False if ``skip_unchanged`` found nothing to refit.

    With ``refactor``, a block's depthwise kernels are first replaced by the
    rank-``M`` factors (`keras_autoprune.red.low_rank.block_factors`) of the
    full convolution fitted by the same least squares on the block's input.
    """
    kind = _kind(layer)
    pairs = _Pairs(model, reference, layer, counterpart, inputs, mask)
    if skip_unchanged and kind != "block" and pairs.unchanged():
        return False
    if kind == "block":
        copies, depthwise, target_layer = block_parts(layer)
        if refactor:
            taps, channels = tuple(depthwise.kernel_size), layer.inputs[0].shape[-1]
            current = _block_kernel(depthwise, target_layer, channels) if anchored else None
            weights, _ = _least_squares(pairs, lambda x: _patches(depthwise, x)[..., None, :], ridge, True,
                                        None if current is None else current.reshape(1, -1, current.shape[-1]))
            kernel = weights[0].reshape(taps + (channels, -1))
            factors, pointwise_factors = block_factors(channel_svd(kernel), copies, kernel.shape,
                                                       depthwise.kernel.dtype)
            depthwise.set_weights([factors])
            if anchored:  # the 1×1 prior: the factors', matching the new depthwise kernels
                target_layer.kernel.assign(pointwise_factors)

        def features(x):
            return keras.ops.convert_to_numpy(depthwise(np.concatenate([x] * copies, axis=-1)))[..., None, :]
    elif kind == "depthwise":
        target_layer = layer

        def features(x):  # (…, channels, k_h·k_w): one fit per channel
            patches = _patches(layer, x)
            return patches.reshape(patches.shape[:-1] + (-1, x.shape[-1])).swapaxes(-1, -2)
    else:
        target_layer = layer

        def features(x):
            return (_patches(layer, x) if kind == "conv" else x)[..., None, :]
    kernel_shape = keras.ops.convert_to_numpy(target_layer.kernel).shape
    prior = _grouped(keras.ops.convert_to_numpy(target_layer.kernel), kind) if anchored else None
    weights, bias = _least_squares(pairs, features, ridge, target_layer.use_bias, prior)
    if kind == "depthwise":  # (channels, k_h·k_w, multiplier) -> (k_h, k_w, channels, multiplier)
        kernel = weights.transpose(1, 0, 2).reshape(kernel_shape)
    else:
        kernel = weights[0].reshape(kernel_shape)
    values = [kernel.astype(target_layer.kernel.dtype)]
    if target_layer.use_bias:
        values.append(bias.reshape(-1).astype(target_layer.bias.dtype))
    target_layer.set_weights(values)
    return True


def _grouped(kernel: np.ndarray, kind: str) -> np.ndarray:
    """A kernel as the ``(groups, n, m)`` weights of its fit (the inverse of the reshape in `_refit`)."""
    if kind == "depthwise":  # (k_h, k_w, channels, multiplier) -> (channels, k_h·k_w, multiplier)
        return kernel.reshape((-1,) + kernel.shape[-2:]).transpose(1, 0, 2)
    return kernel.reshape(1, -1, kernel.shape[-1])


def _block_kernel(depthwise, pointwise, channels: int) -> np.ndarray:
    """The convolution kernel ``W[t, c, o] = Σ_m D[t, m·C_in + c] · P[m·C_in + c, o]`` a block computes."""
    d = keras.ops.convert_to_numpy(depthwise.kernel)
    taps = d.shape[:-2]
    d = d.reshape((-1, d.shape[-2] // channels, channels))  # (K, M, C_in)
    p = keras.ops.convert_to_numpy(pointwise.kernel).reshape((d.shape[1], channels, -1))  # (M, C_in, C_out)
    return np.einsum("kmc,mco->kco", d, p).reshape(taps + (channels, p.shape[-1]))


class _Pairs:
    """Batches of ``(X̃, Y)``: a layer's input in the compressed model and its counterpart's pre-activation output
    (over the kept channels) in the reference model."""

    def __init__(self, model, reference, layer, counterpart, inputs: np.ndarray, mask: np.ndarray | None):
        self._layer, self._counterpart, self._inputs, self._mask = layer, counterpart, inputs, mask
        self._layer_input = keras.Model(model.inputs[0], _called_on(layer))
        self._reference_input = keras.Model(reference.inputs[0], _called_on(counterpart))
        self._first: tuple[np.ndarray, np.ndarray] | None = None  # the first batch's sources, for `unchanged`

    def _sources(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        if start == 0 and self._first is not None:
            first, self._first = self._first, None
            return first
        batch = self._inputs[start:start + _BATCH]
        return (keras.ops.convert_to_numpy(self._layer_input(batch, training=False)),
                keras.ops.convert_to_numpy(self._reference_input(batch, training=False)))

    def __iter__(self):
        for start in range(0, len(self._inputs), _BATCH):
            x, source = self._sources(start)
            target = _pre_activation(self._counterpart, source)
            yield x, (target if self._mask is None else target[..., self._mask])

    def unchanged(self) -> bool:
        """Whether the layer gets the reference's input and holds the reference's weights (to ``_SAME`` relative)."""
        self._first = x, source = self._sources(0)
        if x.shape != source.shape or not _close(x, source):
            return False
        mine, theirs = self._layer.get_weights(), self._counterpart.get_weights()
        return len(mine) == len(theirs) and all(a.shape == b.shape and _close(a, b) for a, b in zip(mine, theirs))


def _least_squares(pairs: _Pairs, features, ridge: float, bias: bool,
                   prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The ridge solution over every batch of ``pairs``; ``features(x)`` is ``(…, groups, n)``."""
    normal = _NormalEquations()
    for x, target in pairs:
        f = features(x)
        f = f.reshape((-1,) + f.shape[-2:])
        normal.add(f, target.reshape(len(f), f.shape[1], -1))
    return normal.solve(ridge, bias, prior)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.max(np.abs(a - b), initial=0.0)) <= _SAME * max(float(np.max(np.abs(b), initial=0.0)), 1e-30)


def _patches(layer, x: np.ndarray) -> np.ndarray:
    """The convolution's input patches, ``(N, H', W', k_h·k_w·C)`` in the kernel's ``(k_h, k_w, C)`` order."""
    return keras.ops.convert_to_numpy(keras.ops.image.extract_patches(
        x, tuple(layer.kernel_size), strides=tuple(layer.strides), dilation_rate=tuple(layer.dilation_rate),
        padding=layer.padding))


def _pre_activation(layer, x: np.ndarray) -> np.ndarray:
    """``layer``'s output before its activation (a convolution, depthwise convolution or dense layer)."""
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype(x.dtype)
    if isinstance(layer, keras.layers.Dense):
        out = keras.ops.matmul(x, kernel)
    elif isinstance(layer, keras.layers.DepthwiseConv2D):
        out = keras.ops.depthwise_conv(x, kernel, strides=layer.strides, padding=layer.padding,
                                       dilation_rate=layer.dilation_rate)
    else:
        out = keras.ops.conv(x, kernel, strides=layer.strides, padding=layer.padding,
                             dilation_rate=layer.dilation_rate)
    out = keras.ops.convert_to_numpy(out)
    if layer.use_bias:
        out = out + keras.ops.convert_to_numpy(layer.bias).astype(out.dtype)
    return out


class _NormalEquations:
    """``FᵀF``, ``Fᵀ1``, ``FᵀY``, ``1ᵀY`` and the row count, per group, accumulated in float64.

    ``F`` is ``(rows, groups, n)`` and ``Y`` ``(rows, groups, m)``; each
    group (one for a convolution or dense layer, one per channel for a
    depthwise convolution) is an independent fit.
    """

    def __init__(self):
        self.gram = self.feature_sum = self.cross = self.target_sum = None
        self.rows = 0

    def add(self, features: np.ndarray, targets: np.ndarray) -> None:
        f, y = features.astype(np.float32), targets.astype(np.float32)
        if f.shape[1] == 1:  # one fit: a plain matrix product
            gram = (f[:, 0].T @ f[:, 0])[None]
            cross = (f[:, 0].T @ y[:, 0])[None]
        else:
            gram = np.einsum("rgn,rgk->gnk", f, f)
            cross = np.einsum("rgn,rgm->gnm", f, y)
        parts = (gram, f.sum(axis=0, dtype=np.float64), cross, y.sum(axis=0, dtype=np.float64))
        if self.gram is None:
            self.gram, self.feature_sum, self.cross, self.target_sum = (p.astype(np.float64) for p in parts)
        else:
            self.gram += gram
            self.feature_sum += parts[1]
            self.cross += cross
            self.target_sum += parts[3]
        self.rows += len(f)

    def solve(self, ridge: float, bias: bool, prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """``(W, b)``: ``W`` is ``(groups, n, m)``, ``b`` ``(groups, m)`` (None without a bias); the penalty pulls
        ``W`` towards ``prior`` (``(groups, n, m)``; zero if None)."""
        groups, n, _ = self.gram.shape
        penalty = ridge * np.trace(self.gram, axis1=1, axis2=2) / n  # (groups,)
        if bias:
            gram = np.zeros((groups, n + 1, n + 1))
            gram[:, :n, :n] = self.gram
            gram[:, :n, n] = gram[:, n, :n] = self.feature_sum
            gram[:, n, n] = self.rows
            cross = np.concatenate([self.cross, self.target_sum[:, None, :]], axis=1)
        else:
            gram, cross = self.gram.copy(), self.cross
        gram[:, np.arange(n), np.arange(n)] += penalty[:, None]
        if prior is not None:
            cross = cross.copy()
            cross[:, :n] += penalty[:, None, None] * prior
        try:
            solution = np.linalg.solve(gram, cross)
        except np.linalg.LinAlgError:  # a dead feature with ridge=0: the least-norm solution
            solution = np.stack([np.linalg.lstsq(g, c, rcond=None)[0] for g, c in zip(gram, cross)])
        return solution[:, :n], (solution[:, n] if bias else None)
