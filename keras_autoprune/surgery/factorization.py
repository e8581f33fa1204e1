"""Factorising a layer in given bases: rotation -> core -> rotation.

A Dense, Conv1D or Conv2D layer with kernel ``K`` (``(*k, Cin, Cout)`` in
Keras layout, ``K_k`` one ``Cin × Cout`` slice per kernel offset ``k``) and
orthonormal bases ``Q_in`` (``Cin × n_in``) and ``Q_out`` (``Cout × n_out``)
becomes three standard layers of the same class:

    rotation in:   1×1, kernel Q_in                    (Cin  -> n_in,  no bias)
    core:          original kernel size, strides, padding, dilation,
                   kernel C_k = Q_inᵀ K_k Q_out         (n_in -> n_out, no bias)
    rotation out:  1×1, kernel Q_outᵀ, original bias and activation
                                                       (n_out -> Cout)

The composite computes the layer with the *projected* kernel
``P_in K_k P_out`` (``P = Q Qᵀ``): a 1×1 convolution without bias commutes
with zero padding, so it can be moved through the core. With full square
bases (nothing pruned) ``P = I`` and the composite is the original layer; the
tests check both to 1e-5. Input and output widths are unchanged, so
normalisation layers and residual connections around the layer are not
touched.

`FactorizationPlan` holds the bases of every factorised layer. Its JSON form
(``to_json``) is::

    {"format": "keras-autoprune/factorization", "version": 1,
     "layers": {"<qualified layer name>": {
         "q_in":  {"shape": [Cin, n_in],   "dtype": "float64", "data": "<base64>"},
         "q_out": {"shape": [Cout, n_out], "dtype": "float64", "data": "<base64>"}}}}

where ``data`` is the base64 of the matrix's bytes, little-endian, row-major
(``np.ndarray.tobytes()``), so a plan reloads bit for bit.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping

import keras
import numpy as np

from keras_autoprune.errors import PlanError
from keras_autoprune.graph.handlers.base import weights_format_problem
from keras_autoprune.surgery.clone import clone_layers, copy_layer
from keras_autoprune.surgery.replace import LayerReplacement, named_layers, replace_layers
from keras_autoprune.surgery.weights import layer_weights

FACTORIZABLE = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D)
"""Layer classes `factorize_layer` accepts (ungrouped, exact classes)."""

_FORMAT = "keras-autoprune/factorization"


def factorization_problem(layer) -> str | None:
    """Why ``layer`` cannot be factorised, or None if it can."""
    if type(layer) not in FACTORIZABLE:
        return f"{type(layer).__name__} is not one of Dense, Conv1D, Conv2D"
    if getattr(layer, "groups", 1) != 1:
        return f"grouped convolution (groups={layer.groups})"
    return weights_format_problem(layer)


@dataclasses.dataclass(frozen=True)
class LayerFactorization:
    """Orthonormal bases of one factorised layer.

    Attributes:
        q_in: ``(Cin, n_in)``, orthonormal columns: the kept input directions.
        q_out: ``(Cout, n_out)``, orthonormal columns: the kept output directions.
    """

    q_in: np.ndarray
    q_out: np.ndarray

    @property
    def rank(self) -> tuple[int, int]:
        """``(n_in, n_out)``, the core's widths."""
        return self.q_in.shape[1], self.q_out.shape[1]

    def core_kernel(self, kernel: np.ndarray) -> np.ndarray:
        """``C_k = Q_inᵀ K_k Q_out`` for every kernel offset: ``(*k, n_in, n_out)``."""
        # Batched matmul, not a three-operand einsum: NumPy's einsum contracts
        # all three at once (Cin²·Cout² per offset), minutes on a 1×1 conv to 1280.
        return self.q_in.T @ np.asarray(kernel, np.float64) @ self.q_out

    def project(self, kernel: np.ndarray) -> np.ndarray:
        """``P_in K_k P_out`` with ``P = Q Qᵀ``: the kernel the composite computes."""
        return self.q_in @ self.core_kernel(kernel) @ self.q_out.T


def factorized_layers(layer, n_in: int, n_out: int) -> list[keras.layers.Layer]:
    """The unbuilt rotation-in, core and rotation-out layers replacing ``layer`` at core widths ``n_in``, ``n_out``.

    They are named ``<name>_rot_in``, ``<name>_core`` and ``<name>_rot_out``.
    The core keeps the kernel regularizer (the rotations are orthonormal, so
    an L2 penalty on the core equals the one on the projected kernel);
    kernel constraints are dropped; the bias, its regularizer and
    constraint, the activation and the activity regularizer go to the last
    rotation.
    """
    problem = factorization_problem(layer)
    if problem:
        raise PlanError(f"Layer '{layer.name}' cannot be factorised: {problem}.")
    config = layer.get_config()
    width_key = "units" if isinstance(layer, keras.layers.Dense) else "filters"
    linear = dict(use_bias=False, activation=None, activity_regularizer=None, kernel_constraint=None,
                  bias_regularizer=None, bias_constraint=None)
    pointwise = {} if width_key == "units" else dict(kernel_size=1, strides=1, padding="valid", dilation_rate=1)
    for key in ("lora_rank", "lora_alpha"):
        config.pop(key, None)
    rot_in = type(layer).from_config({**config, **linear, **pointwise, "kernel_regularizer": None,
                                      width_key: n_in, "name": f"{layer.name}_rot_in"})
    core = type(layer).from_config({**config, **linear, width_key: n_out, "name": f"{layer.name}_core"})
    rot_out = type(layer).from_config({**config, **pointwise, "kernel_regularizer": None, "kernel_constraint": None,
                                       "name": f"{layer.name}_rot_out"})
    return [rot_in, core, rot_out]


def factorize_layer(layer, factorization: LayerFactorization) -> LayerReplacement:
    """The rotation -> core -> rotation replacement of ``layer`` (see the module docstring and `factorized_layers`)."""
    n_in, n_out = factorization.rank
    layers = factorized_layers(layer, n_in, n_out)
    kernel = np.asarray(layer.kernel.numpy())
    ones = (1,) * (kernel.ndim - 2)
    out_weights = {"kernel": factorization.q_out.T.reshape(ones + (n_out, kernel.shape[-1]))}
    if layer.bias is not None:
        out_weights["bias"] = np.asarray(layer.bias.numpy())
    return LayerReplacement(
        layers,
        [{"kernel": factorization.q_in.reshape(ones + factorization.q_in.shape)},
         {"kernel": factorization.core_kernel(kernel)},
         out_weights],
    )


class FactorizationPlan:
    """Which layers to factorise, with their bases (JSON-serialisable).

    Args:
        layers: ``{qualified layer name: LayerFactorization}``.

    Example:

    >>> plan = cb.plan                                   # doctest: +SKIP
    >>> text = plan.to_json(); kap.FactorizationPlan.from_json(text)  # doctest: +SKIP
    >>> slim = plan.apply(model)                        # the three-layer model  # doctest: +SKIP
    """

    def __init__(self, layers: Mapping[str, LayerFactorization]):
        self.layers: dict[str, LayerFactorization] = {
            name: LayerFactorization(np.asarray(f.q_in, np.float64), np.asarray(f.q_out, np.float64))
            for name, f in layers.items()
        }

    def __repr__(self) -> str:
        ranks = ", ".join(f"{n}: {f.rank}" for n, f in list(self.layers.items())[:4])
        return f"FactorizationPlan({len(self.layers)} layer(s){': ' + ranks if ranks else ''}{' ...' if len(self.layers) > 4 else ''})"

    def describe(self) -> str:
        """One line for reports."""
        return f"{len(self.layers)} layer(s) factorised as rotation -> core -> rotation."

    def validate(self, model: keras.Model) -> None:
        """Raises `PlanError` unless every entry fits ``model``: known, factorisable, matching widths, orthonormal bases."""
        by_name = named_layers(model)
        for name, factorization in self.layers.items():
            layer = by_name.get(name)
            if layer is None:
                raise PlanError(f"The plan factorises layer '{name}', which model '{model.name}' does not have.")
            problem = factorization_problem(layer)
            if problem:
                raise PlanError(f"The plan factorises layer '{name}', which cannot be factorised: {problem}.")
            kernel_shape = tuple(layer.kernel.shape)
            for side, q, width in (("q_in", factorization.q_in, kernel_shape[-2]), ("q_out", factorization.q_out, kernel_shape[-1])):
                if q.ndim != 2 or q.shape[0] != width or not 1 <= q.shape[1] <= width:
                    raise PlanError(
                        f"Layer '{name}': {side} must have shape ({width}, n) with 1 <= n <= {width}. Received: {q.shape}"
                    )
                error = np.max(np.abs(q.T @ q - np.eye(q.shape[1])))
                if not error <= 1e-6:  # NaN included
                    raise PlanError(f"Layer '{name}': the columns of {side} are not orthonormal (max |QᵀQ - I| = {error:.2g}).")

    def apply(self, model: keras.Model) -> keras.Model:
        """The model with every planned layer factorised (three standard layers each)."""
        self.validate(model)
        by_name = named_layers(model)
        return replace_layers(model, {name: factorize_layer(by_name[name], f) for name, f in self.layers.items()})

    def project(self, model: keras.Model) -> keras.Model:
        """A same-architecture copy of ``model`` whose planned kernels are projected (``P_in K P_out``)."""
        self.validate(model)
        by_name = named_layers(model)
        targets = {id(by_name[name]): f for name, f in self.layers.items()}

        def rebuild(layer):
            new_layer, weights = copy_layer(layer)
            if id(layer) in targets:
                weights = layer_weights(layer)
                weights["kernel"] = targets[id(layer)].project(weights["kernel"])
            return new_layer, weights

        return clone_layers(model, rebuild)

    # -- serialisation ------------------------------------------------------
    def to_json(self) -> str:
        """The plan as JSON (format in the module docstring)."""
        layers = {name: {"q_in": _encode(f.q_in), "q_out": _encode(f.q_out)} for name, f in self.layers.items()}
        return json.dumps({"format": _FORMAT, "version": 1, "layers": layers})

    @classmethod
    def from_json(cls, text: str) -> "FactorizationPlan":
        """Reads `to_json`'s output.

        Raises:
            PlanError: not JSON, another format or version, or a damaged layer entry.
        """
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as error:
            raise PlanError(f"Expected the JSON text written by `FactorizationPlan.to_json()`. Received: "
                            f"{str(text)[:80]!r}") from error
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("layers"), dict):
            raise PlanError(f"Expected a factorization plan (format '{_FORMAT}' with a 'layers' mapping), as written by "
                            f"`FactorizationPlan.to_json()`. Received: {str(text)[:80]!r}")
        if data.get("version") != 1:
            raise PlanError(f"Unsupported factorization plan version {data.get('version')!r}; this library reads version 1.")
        layers = {}
        for name, entry in data["layers"].items():
            try:
                layers[name] = LayerFactorization(_decode(entry["q_in"]), _decode(entry["q_out"]))
            except (TypeError, KeyError, ValueError) as error:
                raise PlanError(f"Expected 'q_in' and 'q_out' matrices (shape, data) for layer '{name}', as "
                                f"`FactorizationPlan.to_json()` writes them. Received: a damaged entry "
                                f"({type(error).__name__}: {error}). Fix: write the plan again.") from error
        return cls(layers)


def _encode(matrix: np.ndarray) -> dict:
    matrix = np.ascontiguousarray(matrix, "<f8")
    return {"shape": list(matrix.shape), "dtype": "float64", "data": base64.b64encode(matrix.tobytes()).decode("ascii")}


def _decode(entry: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(entry["data"]), "<f8").reshape(entry["shape"]).copy()
