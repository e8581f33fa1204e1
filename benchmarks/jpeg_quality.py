"""Does the JPEG codec's quality move a base model's accuracy? A probe for Benchmark v2's accuracy targets.

The CIFAR-10 archive (``../shared/data``) holds JPEG files encoded at quality
75 with 4:2:0 chroma subsampling, not the original arrays on which published
figures are measured, and those arrays cannot be downloaded here. What can be
measured is the slope: the same recipe, seed and epochs (`converged.train`,
`converged.Recipe`) on the archive's images as they are and on the same images
encoded once more at a lower quality ``Q`` (Pillow, its default 4:2:0
subsampling), training and test images alike. A clear loss from one more
encoding says that the codec's quality matters at this level of accuracy:

    python -m benchmarks.jpeg_quality --quality 0 --epochs 20    # the archive as it is
    python -m benchmarks.jpeg_quality --quality 50 --epochs 20   # re-encoded at quality 50

Each run appends one row (quality, epochs, test and final training accuracy,
seconds, machine) to ``--results``. On a GPU machine run both side by side
under JAX (``KERAS_BACKEND=jax``); on two CPU cores 20 epochs of ResNet-20
take about two hours.
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import sys
import tempfile

import numpy as np

from benchmarks.converged import DEFAULT_SOURCE, Cifar10, Recipe, load_cifar10, machine_description, train

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "v2" / "jpeg_quality_resnet20.json"


def reencode(images: np.ndarray, quality: int) -> np.ndarray:
    """``images`` (uint8, ``(N, H, W, 3)``) encoded as JPEG at ``quality`` (1-95) with Pillow and decoded again."""
    from PIL import Image

    if not 1 <= quality <= 95:
        raise ValueError(f"Expected a JPEG quality in [1, 95] (Pillow's useful range). Received: quality={quality}. "
                         "Fix: pass a quality in that range (`reencoded(data, 0)` keeps the images as they are).")
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def reencoded(data: Cifar10, quality: int) -> Cifar10:
    """The data set with its training and test images re-encoded at ``quality``; 0 returns it unchanged."""
    if not quality:
        return data
    return Cifar10(reencode(data.x_train, quality), data.y_train, reencode(data.x_test, quality), data.y_test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.jpeg_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quality", type=int, required=True, help="JPEG quality of the extra encoding; 0: the archive as it is")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--data", default=str(DEFAULT_SOURCE))
    parser.add_argument("--results", default=str(RESULTS), help="JSON file the row is appended to")
    args = parser.parse_args(argv)
    data = reencoded(load_cifar10(args.data), args.quality)
    with tempfile.TemporaryDirectory() as folder:
        record = train("resnet20", folder, data, Recipe(epochs=args.epochs, seed=args.seed), log=lambda line: print(line, flush=True))
    row = {"quality": args.quality or "archive", "epochs": args.epochs, "seed": args.seed,
           "test_accuracy": record["test_accuracy"], "train_accuracy": record["history"][-1]["accuracy"],
           "train_seconds": round(record["train_seconds"], 1), "machine": machine_description()}
    results = pathlib.Path(args.results)
    rows = json.loads(results.read_text())["rows"] if results.exists() else []
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"model": "resnet20", "recipe": "benchmarks.converged.Recipe", "rows": [*rows, row]}, indent=1))
    print(f"quality {row['quality']}: test {row['test_accuracy']:.4f} after {args.epochs} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
