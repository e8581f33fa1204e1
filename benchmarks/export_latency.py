"""Export latency: does the LiteRT speedup of a pruned model track its FLOPs?

Run from the repository root::

    python -m benchmarks.export_latency [--size 224] [--runs 200] [--rounds 20]

For MobileNetV2 (``weights=None``, ``--size`` x ``--size``) and a CIFAR
ResNet-20 (16/32/64 channels, 32x32), the model is pruned uniformly
(`PrunePlan.uniform`, L1 importance) with the ratio, found by bisection,
that keeps ``--target`` of its FLOPs (`kap.count_flops`). Original and
pruned are exported to float32 and int8 ``.tflite`` files (int8 calibrated
on 32 random inputs: latency does not depend on the calibration data), and
their LiteRT latencies (batch 1, ``--threads`` threads, XNNPACK) are
measured side by side: all files of a model take turns in ``--rounds``
rounds (`measure_latencies`). The latency speedup is the median over rounds
of the ratio of the two files' medians in that round (pairs timed seconds
apart, so load from other processes affects both).

Printed per model and precision: the FLOPs kept, the latency (median ms)
of original and pruned, the speedups ``1 / flops ratio`` and
``latency_orig / latency_pruned``, their quotient (goal of issue 3: >= 0.8,
the latency speedup tracks the FLOPs reduction) and the file size ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_autoprune as kap  # noqa: E402
from keras_autoprune.export import export_tflite, measure_latencies  # noqa: E402

GOAL = 0.8


def resnet20(input_shape=(32, 32, 3), classes: int = 10) -> keras.Model:
    """CIFAR ResNet-20 (He et al., 2016): 3 stages x 3 basic blocks, 16/32/64 channels."""
    def conv_bn(x, filters, strides=1):
        x = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
        return keras.layers.BatchNormalization()(x)

    inputs = keras.Input(input_shape)
    x = keras.layers.ReLU()(conv_bn(inputs, 16))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            strides = 2 if stage > 0 and block == 0 else 1
            y = conv_bn(keras.layers.ReLU()(conv_bn(x, filters, strides)), filters)
            if strides != 1:
                x = keras.layers.BatchNormalization()(
                    keras.layers.Conv2D(filters, 1, strides=strides, use_bias=False)(x))
            x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes)(x), name="resnet20")


def prune_to_flops(
    model: keras.Model, target: float, round_to: int = 1, steps: int = 12
) -> tuple[keras.Model, float, float]:
    """Bisects the uniform ratio so that the pruned model keeps ~``target`` of the FLOPs.

    ``round_to``: kept channels per group rounded up to a multiple of it.

    Returns ``(pruned model, ratio, FLOPs kept)``.
    """
    graph = kap.DependencyGraph(model)
    total = kap.count_flops(model)
    low, high, best = 0.0, 0.95, None
    for _ in range(steps):
        ratio = (low + high) / 2
        slim = kap.apply_plan(model, kap.PrunePlan.uniform(graph, ratio, round_to=round_to), graph)
        kept = kap.count_flops(slim) / total
        if best is None or abs(kept - target) < abs(best[2] - target):
            best = (slim, ratio, kept)
        if abs(kept - target) < 0.005:
            break
        low, high = (ratio, high) if kept > target else (low, ratio)
    return best


def run(name: str, model: keras.Model, args: argparse.Namespace, workdir: str) -> list[dict]:
    slim, ratio, kept = prune_to_flops(model, args.target, args.round_to)
    print(f"\n{name}: uniform ratio {ratio:.3f} (round_to={args.round_to}) keeps {kept:.3f} of "
          f"{kap.count_flops(model):,} FLOPs ({kap.count_params(model):,} -> {kap.count_params(slim):,} "
          "params)", flush=True)
    shape = tuple(model.inputs[0].shape[1:])
    data = np.random.default_rng(0).uniform(-1, 1, (32, *shape)).astype("float32")
    files = {}
    for precision in ("float32", "int8"):
        for label, m in (("original", model), ("pruned", slim)):
            path = os.path.join(workdir, f"{name}_{label}_{precision}.tflite")
            quantize = None if precision == "float32" else "int8"
            files[precision, label] = export_tflite(m, path, quantize=quantize, representative_data=data,
                                                    num_samples=8 if quantize is None else 32)
    keys = list(files)
    timings = dict(zip(keys, measure_latencies([files[k].path for k in keys], num_threads=args.threads,
                                               warmup=args.warmup, runs=args.runs, rounds=args.rounds)))
    rows = []
    for precision in ("float32", "int8"):
        original, pruned = timings[precision, "original"], timings[precision, "pruned"]
        speedup_latency = paired_speedup(original.times_ms, pruned.times_ms, args.rounds)
        rows.append({
            "model": name, "precision": precision, "flops_kept": kept,
            "orig_ms": original.median_ms, "pruned_ms": pruned.median_ms,
            "orig_p90": original.p90_ms, "pruned_p90": pruned.p90_ms,
            "speedup_flops": 1 / kept, "speedup_latency": speedup_latency,
            "efficiency": speedup_latency * kept,
            "size_ratio": files[precision, "pruned"].size_bytes / files[precision, "original"].size_bytes,
        })
    return rows


def paired_speedup(original: tuple[float, ...], pruned: tuple[float, ...], rounds: int) -> float:
    """Median over rounds of ``median(original round) / median(pruned round)``.

    Each round times the two files one after the other, so a ratio within a
    round is not skewed by load that comes and goes on a shared machine.
    """
    ratios = [np.median(a) / np.median(b)
              for a, b in zip(np.array_split(original, rounds), np.array_split(pruned, rounds))]
    return float(np.median(ratios))


def format_rows(rows: list[dict]) -> str:
    header = ("| model | precision | FLOPs kept | latency orig / pruned (median ms) | FLOPs speedup "
              "| latency speedup | latency / FLOPs speedup | >= 0.8 | size ratio |\n"
              "|---|---|---:|---:|---:|---:|---:|:---:|---:|")
    lines = [
        f"| {r['model']} | {r['precision']} | {r['flops_kept']:.3f} | {r['orig_ms']:.2f} / {r['pruned_ms']:.2f} "
        f"| {r['speedup_flops']:.2f}x | {r['speedup_latency']:.2f}x | {r['efficiency']:.2f} "
        f"| {'yes' if r['efficiency'] >= GOAL else 'no'} | {r['size_ratio']:.3f} |"
        for r in rows
    ]
    return "\n".join([header, *lines])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="MobileNetV2 input size (default 224)")
    parser.add_argument("--target", type=float, default=0.5, help="fraction of FLOPs kept (default 0.5)")
    parser.add_argument("--round-to", type=int, default=1,
                        help="keep a multiple of this many channels per group (default 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--runs", type=int, default=200, help="timed runs per file (default 200)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaving rounds (default 20)")
    parser.add_argument("--models", nargs="*", choices=["mobilenetv2", "resnet20"],
                        default=["mobilenetv2", "resnet20"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and few runs (a quick check)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.runs, args.rounds, args.warmup = 64, 10, 2, 2
    if args.runs % args.rounds:
        parser.error(f"--runs must be a multiple of --rounds (rounds of equal length); got {args.runs}, "
                     f"{args.rounds}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} logical CPUs; "
          f"keras {keras.__version__}; threads={args.threads}, runs={args.runs}, rounds={args.rounds}")
    builders = {
        "mobilenetv2": (f"MobileNetV2 {args.size}x{args.size}", lambda: keras.applications.MobileNetV2(
            weights=None, input_shape=(args.size, args.size, 3))),
        "resnet20": ("ResNet-20 32x32", resnet20),
    }
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for key in args.models:
            name, build = builders[key]
            rows.extend(run(name, build(), args, workdir))
    print("\n" + format_rows(rows))
    return rows


if __name__ == "__main__":
    main()
