"""ResNet-20 on CIFAR-10, pruned during fit (NAP, EigenDamage or PSAP), exported to TFLite.

    python examples/cifar10_pruning.py --data ../shared/data/cifar10-jpeg.tar.gz
    python examples/cifar10_pruning.py --method eigendamage --flops 0.25
    python examples/cifar10_pruning.py --data cifar10            # TFDS, when online
    python examples/cifar10_pruning.py --smoke                   # tiny subset (tests)

Trains a ResNet-20 (`keras_autoprune.zoo.resnet_cifar`) for ``--epochs``,
then continues for ``--finetune-epochs`` with the ``--method`` callback
(``NAPCallback``, ``EigenDamageCallback`` or ``PSAPCallback``, each with
``budget=Budget(flops=--flops)`` and ``rounds=--rounds``), reports test
accuracy, FLOPs and parameters before/after, and writes the pruned model as
``.keras`` and verified float32 and int8 ``.tflite`` files. Full-size runs
take about 80 s per epoch of 10,000 images on two CPU cores.
"""

from __future__ import annotations

import argparse
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_autoprune as kap  # noqa: E402
from keras_autoprune.datasets import load_images  # noqa: E402
from keras_autoprune.evaluation import accuracy  # noqa: E402
from keras_autoprune.export import export_tflite  # noqa: E402
from keras_autoprune.zoo import resnet_cifar  # noqa: E402

_DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


METHODS = {
    "nap": lambda data, budget, rounds: kap.NAPCallback(data, budget=budget, rounds=rounds, num_batches=8, batch_size=128),
    "eigendamage": lambda data, budget, rounds: kap.EigenDamageCallback(
        data, budget=budget, rounds=rounds, num_batches=8, batch_size=128),
    "psap": lambda data, budget, rounds: kap.PSAPCallback(budget, data, rounds=rounds, num_batches=2, batch_size=128),
}
"""``--method``: the callback for a calibration set, a budget and a number of rounds."""


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flips and 4-pixel translations (pad-and-crop)."""
    flipped = np.where(rng.random(len(x))[:, None, None, None] < 0.5, x[:, :, ::-1], x)
    padded = np.pad(flipped, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    dy, dx = rng.integers(0, 9, 2)
    return padded[:, dy : dy + 32, dx : dx + 32]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(_DEFAULT_DATA), help="image folder, .tar.gz or TFDS name")
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--flops", type=float, default=0.5, help="fraction of FLOPs kept")
    parser.add_argument("--method", choices=sorted(METHODS), default="nap")
    parser.add_argument("--out", default="cifar10_pruning_out")
    parser.add_argument("--smoke", action="store_true", help="tiny subset, 1+1 epochs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_per_class, args.epochs, args.finetune_epochs, args.rounds = 20, 1, 1, 1

    keras.utils.set_random_seed(0)
    x_train, y_train, _ = load_images(args.data, "train", max_per_class=args.train_per_class)
    x_test, y_test, _ = load_images(args.data, "test", max_per_class=max(10, args.train_per_class // 5))
    mean, std = x_train.mean(axis=(0, 1, 2)), x_train.std(axis=(0, 1, 2))
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    rng = np.random.default_rng(0)

    model = resnet_cifar(20)
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    for _ in range(args.epochs):
        model.fit(augment(x_train, rng), y_train, epochs=1, batch_size=128, verbose=0)
    before = accuracy(model, (x_test, y_test))
    flops, params = kap.count_flops(model), kap.count_params(model)

    calibration = (x_train[:1024], y_train[:1024])
    callback = METHODS[args.method](calibration, kap.Budget(flops=args.flops), args.rounds)
    model.optimizer.learning_rate.assign(0.01)
    model.fit(augment(x_train, rng), y_train, epochs=args.finetune_epochs, batch_size=128, verbose=0, callbacks=[callback])
    slim = callback.pruned_model
    after = accuracy(slim, (x_test, y_test))

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slim.save(out / f"resnet20_{args.method}.keras")
    float32 = export_tflite(slim, out / f"resnet20_{args.method}.tflite", representative_data=x_test[:100])
    int8 = export_tflite(slim, out / f"resnet20_{args.method}_int8.tflite", quantize="int8", representative_data=x_test[:100])
    print(callback.report.to_markdown())
    print(f"test accuracy {before:.4f} -> {after:.4f}; FLOPs {kap.count_flops(slim) / flops:.1%} kept, "
          f"params {kap.count_params(slim) / params:.1%} kept")
    print(f"TFLite float32: {float32.summary()}")
    print(f"TFLite int8:    {int8.summary()}")
    return {"before": before, "after": after, "flops_kept": kap.count_flops(slim) / flops, "float32": float32, "int8": int8}


if __name__ == "__main__":
    main()
