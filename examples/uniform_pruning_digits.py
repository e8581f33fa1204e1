"""Uniform structured pruning of a small CNN on scikit-learn's digits.

Trains a residual CNN on the bundled 8x8 digits images (no download), removes
half of every prunable channel group with `PrunePlan.uniform` (smallest L1
filters first), checks that the slim model equals the masked one, fine-tunes
it briefly and prints accuracy, parameters and FLOPs before and after::

    python examples/uniform_pruning_digits.py            # ~1 minute on 2 cores
    python examples/uniform_pruning_digits.py --smoke    # a few seconds (tests)
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_autoprune as kap  # noqa: E402

L = keras.layers


def build_model() -> keras.Model:
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(32, 3, padding="same", use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    y = L.Conv2D(32, 3, padding="same", use_bias=False)(x)
    y = L.BatchNormalization()(y)
    x = L.ReLU()(L.Add()([x, y]))
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = L.Flatten()(x)
    x = L.Dense(64, activation="relu")(x)
    outputs = L.Dense(10)(x)
    return keras.Model(inputs, outputs)


def compile_model(model: keras.Model) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of channels removed per group")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    args = parser.parse_args(argv)
    epochs, finetune = (2, 1) if args.smoke else (args.epochs, max(1, args.epochs // 3))

    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0)

    model = build_model()
    compile_model(model)
    model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)
    base_accuracy = model.evaluate(x_test, y_test, verbose=0)[1]

    graph = kap.DependencyGraph(model)
    plan = kap.PrunePlan.uniform(graph, args.ratio)
    slim = kap.apply_plan(model, plan, graph)
    masked = kap.mask_plan(model, plan, graph)
    gap = float(np.max(np.abs(np.asarray(slim(x_test)) - np.asarray(masked(x_test)))))
    pruned_accuracy = _accuracy(slim, x_test, y_test)
    compile_model(slim)
    slim.fit(x_train, y_train, epochs=finetune, batch_size=64, verbose=0)
    tuned_accuracy = slim.evaluate(x_test, y_test, verbose=0)[1]

    result = dict(
        accuracy=base_accuracy,
        accuracy_pruned=pruned_accuracy,
        accuracy_finetuned=tuned_accuracy,
        params=kap.count_params(model),
        params_pruned=kap.count_params(slim),
        flops=kap.count_flops(model),
        flops_pruned=kap.count_flops(slim),
        apply_vs_mask=gap,
    )
    print(f"{'':24s} {'original':>12s} {'pruned':>12s}")
    print(f"{'test accuracy':24s} {base_accuracy:12.4f} {tuned_accuracy:12.4f}  (before fine-tuning: {pruned_accuracy:.4f})")
    print(f"{'parameters':24s} {result['params']:12,d} {result['params_pruned']:12,d}")
    print(f"{'FLOPs':24s} {result['flops']:12,d} {result['flops_pruned']:12,d}")
    print(f"max |apply_plan - mask_plan| on the test set: {gap:.2e}")
    return result


def _accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(np.asarray(model(x)), axis=-1) == y))


if __name__ == "__main__":
    main()
