"""The Torch-Pruning peer of Benchmark v2, protocol 1 (one-shot pruning, no fine-tuning).

The committed Keras models (`benchmarks.converged`) are copied into PyTorch
twins (`twin_from_keras`) and pruned with Torch-Pruning 1.6 at a FLOPs
budget, with the calibration and BatchNormalization images every entry shares
(`benchmarks.converged.protocol_data`)::

    python -m benchmarks.torch_peer oneshot --model resnet20 --out benchmarks/results/v2/oneshot_torch_resnet20.json

Twins: ``torch.nn.Module`` in NCHW that read **NCHW raw pixels** in [0, 255]
(`to_nchw` turns the NHWC uint8/float arrays into that) and output logits. The
Keras ``Normalization`` comes first, ``(x - mean) / max(sqrt(var), 1e-7)``
as Keras computes it; Conv2D kernels ``HWIO -> OIHW``, DepthwiseConv2D
kernels ``(kh, kw, C, 1) -> (C, 1, kh, kw)`` with ``groups=C``,
BatchNormalization with Keras' epsilon (1e-3) and momentum (0.99, torch
``0.01``), Dense ``(in, out) -> (out, in)``. Keras ``padding="same"`` with
stride 2 pads ``(0, 1)`` (more at the bottom and right): the twin pads
exactly so with ``F.pad`` before an unpadded convolution.

Entries ``tp_<importance>_<scope>``: importance ``l1``
(``GroupMagnitudeImportance(p=1)``), ``taylor`` (``GroupTaylorImportance``:
cross-entropy gradients of the 1,024 calibration images, summed over 8
batches of 128 as Torch-Pruning's examples do) or ``hessian``
(``GroupHessianImportance``: the mean over the calibration images of the
squared per-sample gradients, ``H_ii ~ (1/N) sum_n (dL_n/dw_i)^2``);
scope ``global`` (``global_pruning=True``: one ranking over all groups) or
``uniform`` (the same ratio in every group). Gradients are taken once per
model in eval mode (BatchNormalization reads its moving statistics, so the
per-sample losses are independent) and installed as ``.grad`` of every
candidate. The per-sample gradients come from ``torch.func.vmap`` rather
than Torch-Pruning's ``accumulate_grad`` loop: the same quantity (a test
checks it against one backward pass per sample) in one batched pass,
where the documented loop runs a backward pass of the whole batch per
sample; and ``accumulate_grad`` in 1.6.1 keeps only the last sample (it
looks up parameter *names* in a dict keyed by parameters).

The classifier (the final ``Linear``) is never pruned (``ignored_layers``).
The pruning ratio that meets the FLOPs target is found by bisection, each
candidate pruned on a fresh deep copy and counted with
``tp.utils.count_ops_and_params`` (MACs of convolutions, BN, pooling and the
classifier). Each row then has the top-1 accuracy on the 10,000 test images
as pruned (``accuracy``) and after re-estimating the BatchNormalization
statistics on the 16 x 128 shared images (``accuracy_bn``: train mode,
cumulative average, no gradients).

This module imports neither torch, Torch-Pruning, Keras nor keras_autoprune
until a function needs them.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import pathlib
import platform
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import converged

KERAS_BN_EPSILON = 1e-3
KERAS_BN_MOMENTUM = 0.99
KERAS_NORMALIZATION_EPSILON = 1e-7
IMPORTANCES = ("l1", "taylor", "hessian")
SCOPES = ("global", "uniform")
TARGETS = (0.8, 0.65, 0.5, 0.35, 0.25)
ENTRIES = tuple(f"tp_{importance}_{scope}" for importance in IMPORTANCES for scope in SCOPES)
BATCH_SIZE = 128


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Keras/TensorFlow ``padding="same"``: ``total = max((ceil(n / s) - 1) s + k - n, 0)``,
    ``total // 2`` before and the rest after.

    >>> same_padding(32, 3, 2), same_padding(32, 3, 1)
    ((0, 1), (1, 1))
    """
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


# ---------------------------------------------------------------------------------------------- twins


def architecture_spec(keras_model) -> dict[str, Any]:
    """The twin's architecture read from a `keras_autoprune.zoo` model's layers (plain JSON data).

    ``{"family": "resnet" | "mobilenetv2", "mean", "variance", "stem", "blocks", "classes"}``;
    MobileNetV2 adds ``"head"``. Raises ValueError for other models.
    """
    layers = {layer.name: layer for layer in keras_model.layers}
    config = layers["normalize"].get_config() if "normalize" in layers else None
    spec: dict[str, Any] = {
        "mean": [float(v) for v in np.ravel(config["mean"])] if config else [0.0, 0.0, 0.0],
        "variance": [float(v) for v in np.ravel(config["variance"])] if config else [1.0, 1.0, 1.0],
        "stem": int(layers["stem_conv"].filters) if "stem_conv" in layers else None,
        "classes": int(layers["logits"].units) if "logits" in layers else None,
    }
    shape = lambda name: tuple(int(d) for d in layers[name].get_weights()[0].shape)  # noqa: E731
    resnet = [m.group(1) for name in layers if (m := re.fullmatch(r"(s\d+b\d+)_a_conv", name))]
    mobilenet = [m.group(1) for name in layers if (m := re.fullmatch(r"(b\d+_\d+)_dw", name))]
    if resnet and spec["stem"]:
        spec["family"] = "resnet"
        spec["blocks"] = [
            {"name": name, "in": shape(f"{name}_a_conv")[2], "out": shape(f"{name}_a_conv")[3],
             "stride": int(layers[f"{name}_a_conv"].strides[0]), "proj": f"{name}_proj" in layers}
            for name in resnet
        ]
    elif mobilenet and spec["stem"] and "head_conv" in layers:
        spec["family"] = "mobilenetv2"
        spec["head"] = int(layers["head_conv"].filters)
        spec["blocks"] = []
        for name in mobilenet:
            hidden = shape(f"{name}_dw")[2]
            spec["blocks"].append({
                "name": name, "in": shape(f"{name}_expand")[2] if f"{name}_expand" in layers else hidden,
                "hidden": hidden if f"{name}_expand" in layers else None, "out": shape(f"{name}_project")[3],
                "stride": int(layers[f"{name}_dw"].strides[0]), "residual": f"{name}_add" in layers,
            })
    else:
        raise ValueError(f"Expected a keras_autoprune.zoo resnet_cifar or mobilenetv2_cifar model. Received: {keras_model.name!r}")
    if spec["classes"] is None:
        raise ValueError(f"Expected a Dense layer named 'logits'. Received: {keras_model.name!r}")
    return spec


@functools.cache
def _twin_classes() -> dict[str, type]:
    """The twin modules, defined on first use so that importing this module does not import torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Normalize(nn.Module):
        """Keras ``Normalization``: ``(x - mean) / max(sqrt(variance), 1e-7)`` per channel (NCHW)."""

        def __init__(self, mean: Sequence[float], variance: Sequence[float]):
            super().__init__()
            std = np.maximum(np.sqrt(np.asarray(variance, np.float64)), KERAS_NORMALIZATION_EPSILON)
            self.register_buffer("mean", torch.tensor(np.asarray(mean, np.float32)).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std.astype(np.float32)).view(1, -1, 1, 1))

        def forward(self, x):
            return (x - self.mean) / self.std

    class ConvBN(nn.Module):
        """Conv2D or DepthwiseConv2D without bias, then BatchNormalization; ``same`` pads as Keras does."""

        def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, same: bool = False, depthwise: bool = False):
            super().__init__()
            symmetric = not same or (stride == 1 and kernel % 2 == 1)
            self.explicit_pad = same and not symmetric
            self.kernel, self.stride = kernel, stride
            self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2 if same and symmetric else 0,
                                  groups=cin if depthwise else 1, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=KERAS_BN_EPSILON, momentum=1.0 - KERAS_BN_MOMENTUM)

        def forward(self, x):
            if self.explicit_pad:
                (top, bottom), (left, right) = (same_padding(n, self.kernel, self.stride) for n in x.shape[-2:])
                x = F.pad(x, (left, right, top, bottom))
            return self.bn(self.conv(x))

    class BasicBlock(nn.Module):
        """``relu(shortcut(x) + bn(conv(relu(bn(conv(x))))))``; the shortcut projects (1x1, stride) where shapes change."""

        def __init__(self, cin: int, cout: int, stride: int, proj: bool):
            super().__init__()
            self.a = ConvBN(cin, cout, 3, stride, same=True)
            self.b = ConvBN(cout, cout, 3, 1, same=True)
            self.proj = ConvBN(cin, cout, 1, stride) if proj else None

        def forward(self, x):
            y = self.b(F.relu(self.a(x)))
            return F.relu((x if self.proj is None else self.proj(x)) + y)

    class InvertedResidual(nn.Module):
        """1x1 expansion (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear projection, plus ``x`` where shapes allow."""

        def __init__(self, cin: int, hidden: int | None, cout: int, stride: int, residual: bool):
            super().__init__()
            self.expand = ConvBN(cin, hidden, 1) if hidden else None
            width = hidden or cin
            self.dw = ConvBN(width, width, 3, stride, same=True, depthwise=True)
            self.project = ConvBN(width, cout, 1)
            self.residual = residual

        def forward(self, x):
            y = x if self.expand is None else F.relu6(self.expand(x))
            y = self.project(F.relu6(self.dw(y)))
            return x + y if self.residual else y

    class Twin(nn.Module):
        """A `keras_autoprune.zoo` CIFAR model in PyTorch: NCHW raw pixels in [0, 255] -> logits."""

        def __init__(self, spec: dict[str, Any]):
            super().__init__()
            self.spec = copy.deepcopy(spec)
            self.family = spec["family"]
            self.normalize = Normalize(spec["mean"], spec["variance"])
            self.stem = ConvBN(len(spec["mean"]), spec["stem"], 3, 1, same=True)
            if self.family == "resnet":
                self.blocks = nn.ModuleList([BasicBlock(b["in"], b["out"], b["stride"], b["proj"]) for b in spec["blocks"]])
                features = spec["blocks"][-1]["out"]
                self.head = None
            else:
                self.blocks = nn.ModuleList([InvertedResidual(b["in"], b["hidden"], b["out"], b["stride"], b["residual"])
                                             for b in spec["blocks"]])
                self.head = ConvBN(spec["blocks"][-1]["out"], spec["head"], 1)
                features = spec["head"]
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(features, spec["classes"])

        def forward(self, x):
            act = F.relu if self.family == "resnet" else F.relu6
            x = act(self.stem(self.normalize(x)))
            for block in self.blocks:
                x = block(x)
            if self.head is not None:
                x = act(self.head(x))
            return self.fc(torch.flatten(self.pool(x), 1))

        def keras_layers(self) -> dict[str, Any]:
            """``{keras layer name: torch module}`` for every layer with weights (ConvBN pairs under the conv's name)."""
            layers: dict[str, Any] = {"normalize": self.normalize, "stem_conv": self.stem, "logits": self.fc}
            for spec, block in zip(self.spec["blocks"], self.blocks):
                name = spec["name"]
                if self.family == "resnet":
                    layers.update({f"{name}_a_conv": block.a, f"{name}_b_conv": block.b})
                    if block.proj is not None:
                        layers[f"{name}_proj"] = block.proj
                else:
                    layers.update({f"{name}_dw": block.dw, f"{name}_project": block.project})
                    if block.expand is not None:
                        layers[f"{name}_expand"] = block.expand
            if self.head is not None:
                layers["head_conv"] = self.head
            return layers

    return {"Twin": Twin, "ConvBN": ConvBN}


def build_twin(spec: dict[str, Any]):
    """An untrained twin of `architecture_spec`'s ``spec``."""
    return _twin_classes()["Twin"](spec)


def _bn_name(conv_name: str) -> str:
    """The BatchNormalization after a convolution, as `keras_autoprune.zoo` names it."""
    if conv_name.endswith("_conv"):
        return conv_name[: -len("_conv")] + "_bn"
    return conv_name + "_bn"


def twin_from_keras(keras_model):
    """A `build_twin` of ``keras_model`` with its weights copied (eval mode).

    Raises:
        ValueError: a weight's shape does not match the twin's.
    """
    import torch

    twin = build_twin(architecture_spec(keras_model))

    def put(target, value: np.ndarray, name: str) -> None:
        value = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"Layer {name!r}: expected a weight of shape {tuple(target.shape)}. Received: {tuple(value.shape)}")
        with torch.no_grad():
            target.copy_(value)

    ConvBN = _twin_classes()["ConvBN"]
    for name, module in twin.keras_layers().items():
        if name == "normalize":
            continue  # the statistics came with the spec
        weights = keras_model.get_layer(name).get_weights()
        if isinstance(module, ConvBN):
            kernel = weights[0]
            if module.conv.groups > 1:  # depthwise (kh, kw, C, multiplier) -> (C * multiplier, 1, kh, kw)
                kernel = kernel.transpose(2, 3, 0, 1).reshape(-1, 1, *kernel.shape[:2])
            else:  # (kh, kw, in, out) -> (out, in, kh, kw)
                kernel = kernel.transpose(3, 2, 0, 1)
            put(module.conv.weight, kernel, name)
            bn_layer = keras_model.get_layer(_bn_name(name))
            if not (bn_layer.center and bn_layer.scale):
                raise ValueError(f"Expected BatchNormalization with center and scale. Received: {bn_layer.name!r}")
            gamma, beta, mean, variance = bn_layer.get_weights()
            for target, value in ((module.bn.weight, gamma), (module.bn.bias, beta),
                                  (module.bn.running_mean, mean), (module.bn.running_var, variance)):
                put(target, value, bn_layer.name)
            module.bn.eps = float(bn_layer.epsilon)
            module.bn.momentum = 1.0 - float(bn_layer.momentum)
        else:  # Dense
            put(module.weight, weights[0].T, name)
            put(module.bias, weights[1], name)
    return twin.eval()


def load_twin(name: str, models_dir: str | pathlib.Path = converged.MODELS_DIR):
    """The twin of the committed ``<models_dir>/<name>.keras`` (loaded in safe mode)."""
    import keras

    return twin_from_keras(keras.saving.load_model(pathlib.Path(models_dir) / f"{name}.keras", compile=False))


def to_nchw(images: np.ndarray):
    """NHWC images (uint8 or float pixels) as a float32 NCHW tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(images, np.float32).transpose(0, 3, 1, 2)))


def relative_error(reference: np.ndarray, other: np.ndarray) -> float:
    """``max |reference - other| / max |reference|``."""
    return float(np.max(np.abs(reference - other)) / np.max(np.abs(reference)))


# ------------------------------------------------------------------------------- evaluation, BN statistics


def predict(model, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Logits of NHWC raw-pixel ``images`` in eval mode."""
    import torch

    model.eval()
    with torch.no_grad():
        return np.concatenate([model(to_nchw(images[i : i + batch_size])).numpy() for i in range(0, len(images), batch_size)])


def accuracy(model, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on NHWC raw-pixel ``images``."""
    return float(np.mean(np.argmax(predict(model, images, batch_size), axis=-1) == labels))


def reestimate_batchnorm(model, images: np.ndarray, batch_size: int = BATCH_SIZE) -> None:
    """Replaces every BatchNorm's moving statistics by the cumulative average of the batch statistics of ``images``
    (train mode, ``momentum=None`` after ``reset_running_stats()``, no gradients); leaves ``model`` in eval mode."""
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            model(to_nchw(images[i : i + batch_size]))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


# ------------------------------------------------------------------------------------------- gradients


def taylor_gradients(model, images: np.ndarray, labels: np.ndarray, batch_size: int = BATCH_SIZE) -> dict[str, Any]:
    """``{parameter name: sum over batches of d mean-CE(batch) / dw}`` (eval mode), as Torch-Pruning's Taylor examples accumulate."""
    import torch
    import torch.nn.functional as F

    model.eval()
    model.zero_grad()
    for i in range(0, len(images), batch_size):
        F.cross_entropy(model(to_nchw(images[i : i + batch_size])), torch.from_numpy(labels[i : i + batch_size])).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def hessian_gradients(model, images: np.ndarray, labels: np.ndarray, chunk: int = 64) -> dict[str, Any]:
    """``{parameter name: (1/N) sum_n (d CE_n / dw)^2}``: the empirical-Fisher diagonal that
    ``GroupHessianImportance`` reads from ``.grad`` (per-sample gradients in eval mode via ``torch.func.vmap``)."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    model.eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss(params, x, y):
        return F.cross_entropy(functional_call(model, (params, buffers), (x[None],)), y[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for i in range(0, len(images), chunk):
        grads = per_sample(params, to_nchw(images[i : i + chunk]), torch.from_numpy(labels[i : i + chunk]))
        for name, g in grads.items():
            total[name] += g.pow(2).sum(0)
    return {name: t / len(images) for name, t in total.items()}


# --------------------------------------------------------------------------------------------- pruning


def make_importance(name: str):
    """The Torch-Pruning importance of entry ``tp_<name>_*``."""
    import torch_pruning as tp

    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "hessian":
        return tp.importance.GroupHessianImportance()
    raise ValueError(f"Expected one of {IMPORTANCES}. Received: importance={name!r}")


def count(model, example) -> tuple[int, int]:
    """``(MACs, parameters)`` by ``tp.utils.count_ops_and_params``."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def prune_copy(base, importance: str, global_pruning: bool, ratio: float, example, gradients: dict[str, Any] | None = None):
    """A deep copy of ``base`` pruned in one step by ``BasePruner`` at ``pruning_ratio=ratio``, classifier ignored.

    ``gradients`` (``{parameter name: tensor}``) become the copy's ``.grad`` first (Taylor, Hessian).
    """
    import torch_pruning as tp

    model = copy.deepcopy(base).eval()
    if gradients is not None:
        for name, p in model.named_parameters():
            p.grad = gradients[name].clone() if name in gradients else None
    pruner = tp.pruner.BasePruner(model, example, importance=make_importance(importance), global_pruning=global_pruning,
                                  pruning_ratio=ratio, ignored_layers=[model.fc])
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def prune_to_flops(base, importance: str, global_pruning: bool, target: float, example, gradients: dict[str, Any] | None = None,
                   *, iterations: int = 14, tolerance: float = 0.002, max_ratio: float = 0.95) -> tuple[Any, dict[str, Any]]:
    """Bisects ``pruning_ratio`` in ``[0, max_ratio]`` for ``MACs(pruned) / MACs(base)`` closest to ``target``.

    Stops when within ``tolerance`` or after ``iterations`` candidates; returns the closest candidate and
    ``{"flops_kept", "params_kept", "pruning_ratio", "candidates"}``.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"Expected a FLOPs fraction in (0, 1]. Received: target={target}")
    macs0, params0 = count(base, example)
    lo, hi, best = 0.0, max_ratio, None
    for step in range(1, iterations + 1):
        ratio = 0.5 * (lo + hi)
        model = prune_copy(base, importance, global_pruning, ratio, example, gradients)
        macs, params = count(model, example)
        kept = macs / macs0
        if best is None or abs(kept - target) < abs(best[1]["flops_kept"] - target):
            best = (model, {"flops_kept": kept, "params_kept": params / params0, "pruning_ratio": ratio})
        if abs(kept - target) <= tolerance:
            break
        lo, hi = (ratio, hi) if kept > target else (lo, ratio)
    best[1]["candidates"] = step
    return best


# ----------------------------------------------------------------------------------------------- rows


def oneshot_rows(
    name: str,
    data: converged.Cifar10,
    *,
    entries: Sequence[str] = ENTRIES,
    targets: Sequence[float] = TARGETS,
    twin=None,
    protocol: dict[str, np.ndarray] | None = None,
    test_images: int | None = None,
    hessian_images: int | None = None,
    log=print,
    on_row=None,
) -> list[dict[str, Any]]:
    """One row per (entry, target) for the committed model ``name`` (see the module docstring).

    Row: ``entry, model, target, flops_kept, params_kept, accuracy, accuracy_bn, seconds``
    (``gradient_seconds``, computed once per importance and shared by its rows, plus
    ``search_seconds``, the bisection), ``pruning_ratio``, ``candidates``, ``row_seconds``
    (evaluations included) and, for Taylor/Hessian, ``gradient_images``.

    ``protocol``: the shared calibration and BatchNormalization images (default
    ``converged.protocol_data(data)``). ``test_images`` evaluates on N evenly spaced test images only (tests: the test set is sorted by class); ``hessian_images``
    uses the first N calibration images for the Hessian (default: all 1,024). A row that fails
    holds ``"error"`` and the run goes on. ``on_row(rows)`` is called after each row.
    """
    import torch

    unknown = sorted(set(entries) - set(ENTRIES))
    if unknown:
        raise ValueError(f"Expected entries among {ENTRIES}. Received: {unknown}")
    twin = load_twin(name) if twin is None else twin
    protocol = converged.protocol_data(data) if protocol is None else protocol
    subset = slice(None) if test_images is None else np.linspace(0, len(data.x_test) - 1, test_images).astype(int)
    x_test, y_test = data.x_test[subset], data.y_test[subset]
    example = to_nchw(protocol["calibration_x"][:1])
    rows: list[dict[str, Any]] = []
    gradients: dict[str, tuple[dict | None, float, int]] = {}
    for entry in entries:
        _, importance, scope = entry.split("_")
        for target in targets:
            start = time.perf_counter()
            row: dict[str, Any] = {"entry": entry, "model": name, "target": target}
            try:
                if importance not in gradients:
                    gradients[importance] = _gradients(twin, importance, protocol, hessian_images)
                grads, grad_seconds, grad_images = gradients[importance]
                search_start = time.perf_counter()
                torch.manual_seed(0)
                pruned, found = prune_to_flops(twin, importance, scope == "global", target, example, grads)
                search_seconds = time.perf_counter() - search_start
                row.update(flops_kept=found["flops_kept"], params_kept=found["params_kept"])
                row["accuracy"] = accuracy(pruned, x_test, y_test)
                reestimate_batchnorm(pruned, protocol["batchnorm_x"])
                row["accuracy_bn"] = accuracy(pruned, x_test, y_test)
                row.update(seconds=grad_seconds + search_seconds, gradient_seconds=grad_seconds, search_seconds=search_seconds,
                           pruning_ratio=found["pruning_ratio"], candidates=found["candidates"])
                if grad_images:
                    row["gradient_images"] = grad_images
                if importance == "hessian" and grad_images < len(protocol["calibration_x"]):
                    row["note"] = f"Hessian from the first {grad_images} of the {len(protocol['calibration_x'])} calibration images"
            except Exception as error:  # noqa: BLE001 - a failed row is recorded and the run goes on
                row["error"] = f"{type(error).__name__}: {error}"
            row["row_seconds"] = time.perf_counter() - start
            rows.append(row)
            log(_describe(row))
            if on_row is not None:
                on_row(rows)
    return rows


def _gradients(twin, importance: str, protocol: dict[str, np.ndarray], hessian_images: int | None):
    """``(gradients or None, seconds, images)`` for one importance, computed on the unpruned twin."""
    start = time.perf_counter()
    x, y = protocol["calibration_x"], protocol["calibration_y"]
    if importance == "taylor":
        return taylor_gradients(twin, x, y), time.perf_counter() - start, len(x)
    if importance == "hessian":
        x, y = x[:hessian_images], y[:hessian_images]
        return hessian_gradients(twin, x, y), time.perf_counter() - start, len(x)
    return None, 0.0, 0


def _describe(row: dict[str, Any]) -> str:
    head = f"{row['model']} {row['entry']} target {row['target']:.2f}"
    if "error" in row:
        return f"{head}: ERROR {row['error']}"
    return (f"{head}: flops {row['flops_kept']:.3f} params {row['params_kept']:.3f} ratio {row['pruning_ratio']:.4f} "
            f"acc {row['accuracy']:.4f} acc_bn {row['accuracy_bn']:.4f} ({row['seconds']:.1f} s, row {row['row_seconds']:.0f} s)")


def versions() -> dict[str, str]:
    import torch
    import torch_pruning  # noqa: F401 - its version, from the installed distribution
    from importlib import metadata

    return {"torch": torch.__version__, "torch_pruning": metadata.version("torch-pruning"), "python": platform.python_version(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_peer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("oneshot", help="protocol 1: one-shot pruning at FLOPs targets, accuracy as pruned and after BN re-estimation")
    run.add_argument("--model", required=True, choices=sorted(converged.ARCHITECTURES))
    run.add_argument("--out", required=True, help="JSON file of the rows (rewritten after each row)")
    run.add_argument("--entries", default=",".join(ENTRIES), help=f"comma-separated, among {','.join(ENTRIES)}")
    run.add_argument("--targets", default=",".join(map(str, TARGETS)), help="comma-separated FLOPs fractions to keep")
    run.add_argument("--data", default=str(converged.DEFAULT_SOURCE))
    run.add_argument("--hessian-images", type=int, help="calibration images for the Hessian (default: all 1,024)")
    run.add_argument("--threads", type=int, help="torch intra-op threads")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    data = converged.load_cifar10(args.data)
    twin = load_twin(args.model)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    base = accuracy(twin, data.x_test, data.y_test)
    print(f"{args.model}: twin test accuracy {base:.4f}", flush=True)
    record = {"protocol": "one-shot, no fine-tuning (benchmark v2 protocol 1)", "model": args.model, "base_accuracy": base,
              "batchnorm_set": converged.BATCHNORM_SET,
              "versions": versions(), "command": " ".join(["python -m benchmarks.torch_peer", *(argv if argv is not None else sys.argv[1:])]),
              "rows": []}

    def save(rows):
        record.update(rows=rows, wall_seconds=time.perf_counter() - clock)
        out.write_text(json.dumps(record, indent=1) + "\n")

    rows = oneshot_rows(args.model, data, entries=[e for e in args.entries.split(",") if e],
                        targets=[float(t) for t in args.targets.split(",") if t], twin=twin,
                        hessian_images=args.hessian_images, log=lambda line: print(line, flush=True), on_row=save)
    save(rows)
    print(f"wrote {len(rows)} rows to {out} in {record['wall_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
