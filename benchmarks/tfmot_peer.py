"""The TFMOT peer: `prune_low_magnitude` on a `tf_keras` twin of the pretrained model.

TFMOT 0.8 only prunes legacy `tf_keras` models, and importing it switches
TensorFlow to legacy Keras (``TF_USE_LEGACY_KERAS=1``), so it runs in its
own process::

    python -m benchmarks.tfmot_peer request.json result.json

The main process (`run_tfmot`, Keras 3) writes the request: the pretrained
model's architecture (layer classes, the config fields that matter, inbound
layers; `architecture`), its weights by layer name, probe inputs with the
Keras 3 logits, the benchmark data (`BenchData` npz), the profile and the
parameter fraction to keep. The peer

1. rebuilds the model with `tf_keras` under the same layer names, copies the
   weights by name and checks the twin's logits against the probe;
2. wraps it with ``prune_low_magnitude`` and a ``PolynomialDecay`` schedule
   from 0 to the target sparsity over the same pruning epochs as the other
   entries (the sparsity of the Conv2D/Dense kernels that removes as many
   parameters as ``1 - params_kept`` of the whole model);
3. fine-tunes with the same recipe (`benchmarks.training`: same epochs,
   learning rates, optimizer, batches, fresh optimizer after the pruning
   epochs), then ``strip_pruning``; with ``max_seconds`` it stops early,
   saving a checkpoint of the wrapped model that the next call continues;
4. writes float32 and int8 ``.tflite`` files (dense shapes: zeros are
   stored), with their sizes raw and gzip-compressed, and the test accuracy.

The result JSON holds those figures, or ``{"error": reason}``; the
latency is measured by the main process together with the other entries.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import numpy as np

from benchmarks.data import BenchData, steps_per_epoch
from benchmarks.measure import file_sha256, gzip_size
from benchmarks.profiles import Profile, learning_rate
from benchmarks.stages import Deadline
from benchmarks.training import compile_model, fit_epochs

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Layer classes the twin can rebuild, and the config fields it copies.
_LAYER_FIELDS = {
    "InputLayer": ("batch_shape",),
    "Normalization": ("axis", "mean", "variance"),
    "Conv2D": ("filters", "kernel_size", "strides", "padding", "dilation_rate", "use_bias", "activation"),
    "DepthwiseConv2D": ("kernel_size", "strides", "padding", "depth_multiplier", "dilation_rate", "use_bias", "activation"),
    "BatchNormalization": ("axis", "momentum", "epsilon", "center", "scale"),
    "ReLU": ("max_value", "negative_slope", "threshold"),
    "Add": (),
    "GlobalAveragePooling2D": ("keepdims",),
    "Dense": ("units", "use_bias", "activation"),
}


# -- main process (Keras 3) ---------------------------------------------
def architecture(model: Any) -> dict:
    """A framework-neutral description of a functional Keras 3 model.

    Raises:
        ValueError: for a layer class the twin cannot rebuild.
    """
    config = model.get_config()
    layers = []
    for layer in config["layers"]:
        name, kind = layer["name"], layer["class_name"]
        if kind not in _LAYER_FIELDS:
            raise ValueError(f"The tf_keras twin cannot rebuild layer '{name}' of class {kind}.")
        fields = {k: layer["config"][k] for k in _LAYER_FIELDS[kind] if k in layer["config"]}
        inbound = _history(layer["inbound_nodes"][0]["args"]) if layer["inbound_nodes"] else []
        layers.append({"name": name, "class": kind, "config": fields, "inputs": inbound})
    outputs = config["output_layers"]
    if len(outputs) != 1 and not isinstance(outputs[0], str) or isinstance(outputs[0], list) and len(outputs) != 1:
        raise ValueError(f"The tf_keras twin needs a single-output model. Received outputs: {outputs}")
    description = {"name": config["name"], "layers": layers, "output": outputs[0] if isinstance(outputs[0], str) else outputs[0][0]}
    return json.loads(json.dumps(description))  # plain JSON types (tuples become lists)


def _history(args: Any) -> list[str]:
    if isinstance(args, dict):
        history = args.get("config", {}).get("keras_history")
        return [history[0]] if history else []
    if isinstance(args, (list, tuple)):
        return [name for item in args for name in _history(item)]
    return []


def run_tfmot(
    model: Any,
    data_path: pathlib.Path,
    params_kept: float,
    profile: Profile,
    seed: int,
    folder: pathlib.Path,
    max_seconds: float | None = None,
) -> dict:
    """Runs the peer on ``model``'s architecture and weights; returns its result.

    The result is ``{"error": why}`` if the peer could not run, and
    ``{"incomplete": why}`` if it stopped its fine-tuning to stay within
    ``max_seconds`` (its checkpoint is in ``folder``: call again to continue).
    """
    folder = pathlib.Path(folder)
    weights = {f"{layer.name}/{i}": np.asarray(w) for layer in model.layers for i, w in enumerate(layer.get_weights())}
    np.savez(folder / "weights.npz", **weights)
    probe = BenchData.load_npz(data_path).test_sample(16, seed=1)
    np.savez(folder / "probe.npz", x=probe, logits=np.asarray(model(probe, training=False)))
    request = {
        "architecture": architecture(model), "weights": str(folder / "weights.npz"), "probe": str(folder / "probe.npz"),
        "data": str(data_path), "profile": profile.to_dict(), "params_kept": params_kept, "seed": seed,
        "folder": str(folder), "max_seconds": max_seconds,
    }
    (folder / "request.json").write_text(json.dumps(request, indent=1))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    log = folder / "peer.log"
    result_path = folder / "result.json"
    result_path.unlink(missing_ok=True)
    with open(log, "a") as stream:
        code = subprocess.run(
            [sys.executable, "-m", "benchmarks.tfmot_peer", str(folder / "request.json"), str(result_path)],
            cwd=REPO_ROOT, stdout=stream, stderr=subprocess.STDOUT, env=env,
        ).returncode
    if code != 0 or not result_path.exists():
        tail = " | ".join(log.read_text().strip().splitlines()[-6:])
        return {"error": f"the TFMOT peer failed (exit {code}): {tail}"}
    return json.loads(result_path.read_text())


# -- peer process (tf_keras + TFMOT) -------------------------------------
def build_twin(tf_keras: Any, description: dict) -> Any:
    """The `tf_keras` functional model described by `architecture`."""
    tensors = {}
    inputs = None
    for layer in description["layers"]:
        config = dict(layer["config"], name=layer["name"])
        if layer["class"] == "InputLayer":
            inputs = tensors[layer["name"]] = tf_keras.Input(shape=tuple(config["batch_shape"][1:]), name=layer["name"])
            continue
        args = [tensors[name] for name in layer["inputs"]]
        module = getattr(tf_keras.layers, layer["class"])(**config)
        tensors[layer["name"]] = module(args if layer["class"] == "Add" else args[0])
    return tf_keras.Model(inputs, tensors[description["output"]], name=description["name"])


def _tflite_figures(tf: Any, model: Any, path: pathlib.Path, representative: np.ndarray, int8: bool) -> dict:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x[None]] for x in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    path.write_bytes(converter.convert())
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    runner = interpreter.get_signature_runner()
    name = next(iter(runner.get_input_details()))
    lite = np.concatenate([next(iter(runner(**{name: x[None]}).values())) for x in representative])
    keras_logits = np.asarray(model(representative, training=False))
    return {
        "path": str(path), "bytes": path.stat().st_size, "gzip_bytes": gzip_size(path),
        "sha256": file_sha256(path),
        "relative_error": float(np.max(np.abs(lite - keras_logits)) / np.max(np.abs(keras_logits))),
        "top1_agreement": float(np.mean(lite.argmax(-1) == keras_logits.argmax(-1))),
    }


def _pruned_kernel(layer: Any) -> Any:
    """The kernel TFMOT's magnitude pruning sparsifies in ``layer`` (None for the layers it leaves dense).

    Conv2D and Dense prune ``kernel``. TFMOT 0.8 wraps a DepthwiseConv2D but
    creates no mask for it (its registry prunes no weight of that class:
    checked by wrapping one and training a step), so depthwise kernels stay
    dense like biases, normalisations and BatchNormalization, and are not
    wrapped here.
    """
    return layer.kernel if type(layer).__name__ in ("Conv2D", "Dense") else None


def run_peer(request: dict) -> dict:
    """Steps 1-4 of the module docstring, in this (legacy Keras) process."""
    import tensorflow_model_optimization as tfmot  # sets TF_USE_LEGACY_KERAS=1
    import tensorflow as tf
    import tf_keras

    profile = Profile(**{k: tuple(v) if isinstance(v, list) else v for k, v in request["profile"].items()})
    data, folder, seed = BenchData.load_npz(request["data"]), pathlib.Path(request["folder"]), request["seed"]
    tf_keras.utils.set_random_seed(seed)
    model = build_twin(tf_keras, request["architecture"])
    with np.load(request["weights"]) as weights:
        for layer in model.layers:
            if layer.weights:
                layer.set_weights([weights[f"{layer.name}/{i}"] for i in range(len(layer.weights))])
    with np.load(request["probe"]) as probe:
        reference = probe["logits"]
        twin_error = float(np.max(np.abs(np.asarray(model(probe["x"], training=False)) - reference))
                           / max(float(np.max(np.abs(reference))), 1e-12))
    if not twin_error <= 1e-4:  # NaN fails too
        raise RuntimeError(f"The tf_keras twin differs from the Keras 3 model by {twin_error:.3g} (relative).")
    total = model.count_params()
    prunable = sum(int(np.prod(_pruned_kernel(layer).shape)) for layer in model.layers if _pruned_kernel(layer) is not None)
    sparsity = min(0.99, (1.0 - request["params_kept"]) * total / prunable)
    prune_steps = profile.rounds * steps_per_epoch(data, profile.batch_size)
    updates = min(8, prune_steps)
    frequency = prune_steps // updates
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, sparsity, begin_step=0, end_step=frequency * updates, frequency=frequency)

    def wrap(layer):  # the kernels that are pruned; the other layers (Normalization, BN, ...) stay as they are
        if _pruned_kernel(layer) is not None:
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    pruned = tf_keras.models.clone_model(model, clone_function=wrap)

    lr = lambda epoch: learning_rate(epoch, profile.finetune_lr, profile.finetune_epochs, "cosine")  # noqa: E731
    train = {"data": data, "batch_size": profile.batch_size, "seed": seed, "learning_rate": lr, "keras_module": tf_keras,
             "callbacks": [tfmot.sparsity.keras.UpdatePruningStep()]}
    state_path, checkpoint = folder / "peer_state.json", str(folder / "peer_checkpoint")
    if state_path.exists():  # a later stage: continue the fine-tuning
        state = json.loads(state_path.read_text())
        compile_model(pruned, tf_keras, lr(state["end_epoch"]), profile.weight_decay)
        pruned.load_weights(checkpoint)
    else:
        compile_model(pruned, tf_keras, lr(0), profile.weight_decay)
        phase = fit_epochs(pruned, first=0, last=profile.rounds, **train)
        state = {"end_epoch": phase.end_epoch, "fit_seconds": phase.seconds}
        compile_model(pruned, tf_keras, lr(phase.end_epoch), profile.weight_decay)
    max_seconds = request.get("max_seconds")
    deadline = Deadline(None if max_seconds is None else max_seconds / 60)
    phase = fit_epochs(pruned, first=state["end_epoch"], last=profile.finetune_epochs, deadline=deadline, **train)
    state = {"end_epoch": phase.end_epoch, "fit_seconds": state["fit_seconds"] + phase.seconds}
    if phase.end_epoch < profile.finetune_epochs:
        pruned.save_weights(checkpoint)
        state_path.write_text(json.dumps(state))
        return {"incomplete": f"TFMOT fine-tuning stopped after epoch {phase.end_epoch}"}
    state_path.unlink(missing_ok=True)
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    logits = stripped.predict(data.x_test, batch_size=256, verbose=0)
    nonzero = sum(int(np.count_nonzero(w)) for w in stripped.get_weights())
    representative = data.test_sample(profile.export_samples)
    return {
        "entry": "tfmot", "seed": seed, "tfmot_version": tfmot.__version__, "tf_keras_version": tf_keras.__version__,
        "twin_relative_error": twin_error, "target_kernel_sparsity": sparsity,
        "accuracy": float(np.mean(logits.argmax(-1) == data.y_test)),
        "params_kept": nonzero / total, "flops_kept": 1.0, "params": total, "nonzero_params": nonzero,
        "fit_seconds": state["fit_seconds"], "pruning_seconds": 0.0, "statistics_seconds": 0.0,
        "tflite": {
            "float32": _tflite_figures(tf, stripped, folder / "float32.tflite", representative, int8=False),
            "int8": _tflite_figures(tf, stripped, folder / "int8.tflite", representative, int8=True),
        },
    }


def main(argv: list[str] | None = None) -> int:
    request_path, result_path = argv if argv is not None else sys.argv[1:]
    request = json.loads(pathlib.Path(request_path).read_text())
    try:
        result = run_peer(request)
    except ImportError as error:  # TFMOT or tf_keras missing: say so instead of figures
        result = {"error": f"TFMOT peer not available ({error}); pip install tf_keras tensorflow-model-optimization"}
    pathlib.Path(result_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
