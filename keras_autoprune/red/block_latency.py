"""``separation_cost="latency"``: a separated block is kept only where LiteRT runs it faster than its convolution.

`kap.count_flops` counts a depthwise + 1×1 block as cheaper whenever
``M·(K + C_out) < K·C_out``, but LiteRT's kernels are not equally efficient:
with 16 channels at 32×32, a tiled block with ``M = 4`` takes 55.5 µs where
the 3×3 convolution takes 46.6 µs (docs/methods/red.md), so a model with
fewer FLOPs can run slower.

Decision (how the time is measured): the convolution and the block that
would replace it are each built alone at the layer's input shape, with
their initial weights (dense arithmetic does not depend on the values), converted
to float32 ``.tflite`` and timed side by side (`kap.measure_latencies`:
batch 1, ``num_threads``, interleaved rounds, on the machine that runs
`compress`); the block is kept when its median time is lower. Each distinct
layer configuration, input shape and ``M`` is timed once per `BlockTimer`.
Run it on the deployment target, or accept that this machine's CPU stands
in for it.

``separation_cost="latency_int8"`` times both as full-integer int8
``.tflite`` files instead (calibrated on 8 standard-normal inputs), for a
model deployed quantized: on an x86 CPU with AVX512-VNNI LiteRT runs a 3×3
convolution 3.2-3.8 times faster in int8 than in float32 and a tiled block
only 1.1-1.9 times, so a block faster in float32 can be slower in int8
(docs/methods/red.md).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
import warnings

import keras
import numpy as np

from keras_autoprune.graph.handlers import CallInfo
from keras_autoprune.red.separation import Separation, separated_block
from keras_autoprune.surgery.weights import layer_weights


@dataclasses.dataclass(frozen=True)
class BlockTiming:
    """Median LiteRT latency (ms) of one convolution alone and of its separated block alone."""

    layer: str
    multiplier: int
    convolution_ms: float
    block_ms: float

    @property
    def faster(self) -> bool:
        """Whether the block runs faster than the convolution."""
        return self.block_ms < self.convolution_ms


class BlockTimer:
    """Times convolutions against their separated blocks on LiteRT, caching each configuration.

    Args:
        quantize: None (float32 files) or ``"int8"`` (full-integer files).
        num_threads: LiteRT CPU threads (1: a phone's single big core).
        runs: timed calls of each model, in ``rounds`` interleaved rounds.
        rounds: see ``runs``.
    """

    def __init__(self, quantize: str | None = None, num_threads: int = 1, runs: int = 60, rounds: int = 6):
        if quantize not in (None, "int8"):
            raise ValueError(f"Expected `quantize` to be None or 'int8'. Received: quantize={quantize!r}")
        self.quantize, self.num_threads, self.runs, self.rounds = quantize, num_threads, runs, rounds
        self._cache: dict[str, tuple[float, float]] = {}
        self.timings: dict[str, BlockTiming] = {}

    def keep(self, layer: keras.layers.Layer, call: CallInfo, separation: Separation) -> bool:
        """Whether ``separation``'s block (``M = separation.multiplier``) runs faster than ``layer``; recorded in
        ``timings`` under the layer's qualified name."""
        key = json.dumps({"class": type(layer).__name__, "input": [int(d) for d in call.in_shapes[0][1:]],
                          "multiplier": separation.multiplier, "config": _config(layer)}, sort_keys=True, default=str)
        if key not in self._cache:
            self._cache[key] = self._time(layer, call, separation.multiplier)
        convolution_ms, block_ms = self._cache[key]
        timing = BlockTiming(separation.layer, separation.multiplier, convolution_ms, block_ms)
        self.timings[separation.layer] = timing
        return timing.faster

    def _time(self, layer, call: CallInfo, multiplier: int) -> tuple[float, float]:
        from keras_autoprune.export.convert import convert
        from keras_autoprune.export.latency import measure_latencies

        kernel = layer_weights(layer)["kernel"]
        c_in, c_out = kernel.shape[-2:]
        taps = kernel.shape[:-2]
        # the block's layers only (their values are not used: `replacement.weights` is never assigned)
        depthwise = np.zeros(taps + (multiplier * c_in, 1), np.float32)
        pointwise = np.zeros((1,) * len(taps) + (multiplier * c_in, c_out), np.float32)
        bias = np.zeros(c_out, np.float32) if layer.use_bias else None
        replacement, _, _ = separated_block(layer, depthwise, pointwise, bias, call) or (None, 0, 0)
        if replacement is None:  # not cheaper in FLOPs: never kept, nothing to time
            return 0.0, float("inf")
        inputs = keras.Input(tuple(int(d) for d in call.in_shapes[0][1:]))
        convolution = keras.Model(inputs, type(layer).from_config(_config(layer))(inputs))
        x = inputs
        for part in replacement.layers:
            x = part(x)
        block = keras.Model(inputs, x)
        shape = (_CALIBRATION_SAMPLES,) + tuple(int(d) for d in call.in_shapes[0][1:])
        calibration = [np.random.default_rng(0).normal(size=shape).astype(np.float32)] if self.quantize else []
        with tempfile.TemporaryDirectory() as scratch:
            paths = []
            for name, model in (("convolution", convolution), ("block", block)):
                path = pathlib.Path(scratch) / f"{name}.tflite"
                with warnings.catch_warnings():  # TensorFlow's int8 calibrator still runs tf.lite.Interpreter
                    warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
                    path.write_bytes(convert(model, self.quantize, calibration)[0])
                paths.append(path)
            timed = measure_latencies(paths, num_threads=self.num_threads, warmup=10, runs=self.runs,
                                      rounds=self.rounds)
        return timed[0].median_ms, timed[1].median_ms


_CALIBRATION_SAMPLES = 8


def _config(layer) -> dict:
    """The layer's config without its name and trainability (what its arithmetic depends on)."""
    return {key: value for key, value in layer.get_config().items() if key not in ("name", "trainable")}
