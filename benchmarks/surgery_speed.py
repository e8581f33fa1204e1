"""Surgery speed: graph building and `apply_plan` time on big models.

Run from the repository root::

    python -m benchmarks.surgery_speed [--size 224] [--repeats 3]

Prints, per model, the median time (seconds) to build the
`DependencyGraph` and to run `apply_plan` with a uniform 30% plan, and their
sum. Goal (issue 2): ResNet50 graph + apply_plan under 5 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import keras_autoprune as kap  # noqa: E402

MODELS = ["ResNet50", "MobileNetV2", "EfficientNetB0", "DenseNet121"]


def measure(name: str, size: int, repeats: int) -> tuple[float, float]:
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    graph_times, apply_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        graph = kap.DependencyGraph(model)
        graph_times.append(time.perf_counter() - start)
        plan = kap.PrunePlan.uniform(graph, 0.3)
        start = time.perf_counter()
        kap.apply_plan(model, plan, graph)
        apply_times.append(time.perf_counter() - start)
    return statistics.median(graph_times), statistics.median(apply_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=MODELS)
    args = parser.parse_args()
    print(f"{'model':16s} {'graph s':>8s} {'apply s':>8s} {'total s':>8s}")
    for name in args.models:
        graph_s, apply_s = measure(name, args.size, args.repeats)
        print(f"{name:16s} {graph_s:8.2f} {apply_s:8.2f} {graph_s + apply_s:8.2f}", flush=True)


if __name__ == "__main__":
    main()
