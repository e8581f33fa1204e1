"""The ``keras-autoprune`` command.

Subcommands:

- ``demo``: train a small CNN on scikit-learn's digits (offline), prune it
  with ``NAPCallback(budget=Budget(flops=0.5))`` during ``fit``, export both
  models to verified TFLite and print a before/after table::

      keras-autoprune demo
      keras-autoprune demo --data ../shared/data/cifar10-jpeg.tar.gz

- ``prune``: fine-tune and prune a saved model on an image data set, print
  the report, write the slim ``.keras`` (and ``.tflite`` files)::

      keras-autoprune prune resnet20.keras --data cifar10-jpeg.tar.gz --scale none \\
          --budget flops=0.5 --method nap --epochs 2 --out slim.keras --tflite slim.tflite

- ``report``: the per-layer FLOPs and parameters of a saved model::

      keras-autoprune report slim.keras

- ``red``: compress a saved model with RED, data-free and without
  fine-tuning; print the report and the per-stage figures::

      keras-autoprune red model.keras red.keras --bandwidth-scale 0.05 --separate-depthwise \\
          --budget flops=0.75 --tflite red.tflite

- ``export``: convert a saved Keras model to a verified ``.tflite`` file
  and/or a SavedModel for TF Serving, and print the verification figures::

      keras-autoprune export slim.keras --tflite slim.tflite
      keras-autoprune export slim.keras --tflite slim_int8.tflite \\
          --quantize int8 --data images/ --scale unit
      keras-autoprune export slim.keras --saved-model serving/slim

Exit status: 0 on success, 1 when conversion or verification fails, 2 for
bad arguments. `main` takes the argument list, so it can be called
in-process: ``main(["export", "m.keras", "--tflite", "m.tflite"])``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ logs: errors reach the user as exceptions

from keras_autoprune.errors import ExportError  # noqa: E402
from keras_autoprune.export.images import SCALES  # noqa: E402
from keras_autoprune.red.options import (  # noqa: E402
    BUDGET_KNOBS,
    MERGE_DISTANCES,
    MERGE_REPRESENTATIVES,
    RECONSTRUCTIONS,
    REFIT_LAYERS,
    SEPARATION_COSTS,
    SNAP_TARGETS,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="keras-autoprune",
        description="Structured pruning for Keras 3: tools around pruned models.",
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(subcommands)
    _add_prune(subcommands)
    _add_report(subcommands)
    _add_export(subcommands)
    _add_red(subcommands)
    # More subcommands go here, one `_add_<name>(subcommands)` each, which
    # adds its subparser and sets `run=_run_<name>` with `set_defaults`.
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ExportError as error:
        print(f"keras-autoprune {args.command}: failed: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"keras-autoprune {args.command}: error: {error}", file=sys.stderr)
        return 2


# -- demo -----------------------------------------------------------------
def _add_demo(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "demo",
        help="prune a small CNN with NAP during fit, export it, print before/after",
        description=(
            "Train a small CNN (scikit-learn digits by default, no network needed), prune it with "
            "NAPCallback during fit, export both models to verified TFLite and print accuracy, "
            "parameters, FLOPs, .tflite size and LiteRT latency before and after."
        ),
    )
    parser.add_argument("--data", metavar="DIR|ARCHIVE|TFDS_NAME", default=None,
                        help="image folder (<root>/{train,test}/<class>/*.jpg), a .tar.gz of one, or a TFDS "
                             "name (default: scikit-learn digits)")
    parser.add_argument("--flops", type=float, default=0.5, help="fraction of FLOPs kept (default: 0.5)")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs before pruning (default: 12)")
    parser.add_argument("--finetune-epochs", type=int, default=6,
                        help="epochs of fit with the NAP callback (default: 6)")
    parser.add_argument("--max-per-class", type=int, default=500,
                        help="training images per class for --data (default: 500)")
    parser.add_argument("--image-size", metavar="H,W",
                        help="resize --data images to this height and width (default: their own size)")
    parser.add_argument("--out", default=None, help="folder for the .tflite files and the plot (default: a temp folder)")
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from keras_autoprune.demo import run_demo

    image_size = _parse_shape(args.image_size, "--image-size", 2) if args.image_size is not None else None
    run_demo(args.data, args.epochs, args.finetune_epochs, args.flops, args.out, args.max_per_class,
             image_size=image_size)  # checks every argument before any work
    return 0


# -- prune ----------------------------------------------------------------
def _add_prune(subcommands: argparse._SubParsersAction) -> None:
    from keras_autoprune.prune_saved import METHODS, RECALIBRATION_IMAGES

    parser = subcommands.add_parser(
        "prune",
        help="prune a saved .keras model while fine-tuning it on images",
        description=(
            "Load a saved model (safe mode), fine-tune it for --epochs with a pruning callback on an image "
            "data set (pruning rounds in the first two epochs), print the report and write the slim model."
        ),
    )
    parser.add_argument("model", help="the model file (.keras)")
    parser.add_argument("--data", required=True, metavar="DIR|ARCHIVE|TFDS_NAME",
                        help="<root>/{train,test}/<class>/*.jpg, a .tar.gz of one, or a TFDS name")
    parser.add_argument("--budget", required=True, help="flops=F or params=F: the fraction kept, e.g. flops=0.5")
    parser.add_argument("--method", choices=METHODS, default="nap", help="default: nap")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs, pruning in the first two (default: 2)")
    parser.add_argument("--out", required=True, metavar="OUT.keras", help="where to write the pruned model")
    parser.add_argument("--scale", choices=list(SCALES), default="unit",
                        help="pixels the model expects: unit = [0,1] (default), symmetric = [-1,1], none = raw 0-255")
    parser.add_argument("--learning-rate", type=float, default=0.01, help="SGD rate if the model is saved uncompiled")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-per-class", type=int, default=None, help="use at most this many images per class")
    parser.add_argument("--tflite", metavar="OUT.tflite", help="also export a verified float32 .tflite")
    parser.add_argument("--int8", metavar="OUT.tflite", help="also export a verified int8 .tflite")
    parser.add_argument("--unsafe", action="store_true",
                        help="load with safe_mode=False (needed for Lambda layers; runs code stored in the file)")
    parser.add_argument("--no-recalibrate", action="store_true",
                        help="keep the BatchNormalization statistics of fine-tuning (by default they are re-estimated "
                             f"on up to {RECALIBRATION_IMAGES:,} training images after it)")
    parser.set_defaults(run=_run_prune)


def _run_prune(args: argparse.Namespace) -> int:
    from keras_autoprune.prune_saved import parse_budget, prune_saved_model

    outcome = prune_saved_model(
        args.model, args.data, parse_budget(args.budget), args.out, method=args.method, epochs=args.epochs,
        scale=args.scale, learning_rate=args.learning_rate, batch_size=args.batch_size,
        max_per_class=args.max_per_class, tflite=args.tflite, int8=args.int8, unsafe=args.unsafe,
        recalibrate=not args.no_recalibrate,
    )
    print(outcome.report.to_markdown())
    if outcome.accuracy_before is not None:
        finetuned = (f" ({outcome.accuracy_finetuned:.4f} before BatchNormalization re-estimation)"
                     if outcome.accuracy_finetuned is not None else "")
        print(f"test accuracy: {outcome.accuracy_before:.4f} before, {outcome.accuracy_after:.4f} after{finetuned}")
    print(f"wrote {', '.join(outcome.files)} ({outcome.seconds:.0f} s)")
    return 0


# -- report ---------------------------------------------------------------
def _add_report(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("report", help="per-layer FLOPs and parameters of a saved model")
    parser.add_argument("model", help="the model file (.keras)")
    parser.add_argument("--unsafe", action="store_true", help="load with safe_mode=False (runs code stored in the file)")
    parser.add_argument("--input-shape", metavar="H,W,C",
                        help="input shape without the batch axis, for a model whose inputs have unknown sizes: "
                             "the FLOPs are counted at it")
    parser.set_defaults(run=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from keras_autoprune.prune_saved import describe_model

    input_shape = _parse_shape(args.input_shape) if args.input_shape is not None else None
    print(describe_model(args.model, unsafe=args.unsafe, input_shape=input_shape))
    return 0


# -- export ---------------------------------------------------------------
def _add_export(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "export",
        help="export a .keras model to verified TFLite and/or SavedModel",
        description=(
            "Export a saved Keras model to a .tflite file (run with LiteRT and compared "
            "with Keras) and/or a SavedModel in TF Serving's <dir>/<version>/ layout."
        ),
    )
    parser.add_argument("model", help="the model file (.keras), loaded with keras.saving.load_model")
    parser.add_argument("--tflite", metavar="OUT.tflite", help="write a .tflite file here")
    parser.add_argument("--saved-model", metavar="DIR", help="write a SavedModel under DIR/<version>/")
    parser.add_argument("--version", type=int, default=None,
                        help="SavedModel version (default: one more than the highest in DIR)")
    parser.add_argument("--quantize", choices=["dynamic", "float16", "int8"], default=None,
                        help="TFLite quantization (default: float32)")
    parser.add_argument("--int8-io", action="store_true", help="int8 input/output tensors (with --quantize int8)")
    parser.add_argument("--allow-flex", action="store_true", help="allow TensorFlow Select (Flex) ops")
    parser.add_argument("--data", metavar="DIR|ARCHIVE|TFDS_NAME",
                        help="sample images: a folder of class subfolders (JPEG/PNG), a .tar.gz of one, or a TFDS name; "
                             "required for --quantize int8 (default: random inputs)")
    parser.add_argument("--split", default=None,
                        help="subfolder of --data, or TFDS split (default: the folder itself / 'train')")
    parser.add_argument("--scale", choices=list(SCALES), default="unit",
                        help="pixel scaling: unit = x/255 in [0,1] (default), symmetric = x/127.5-1 "
                             "in [-1,1], none = raw 0-255")
    parser.add_argument("--num-samples", type=int, default=100,
                        help="samples for calibration and verification (default: 100)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest relative error allowed for float32 (default: 1e-4)")
    parser.add_argument("--min-top1", type=float, default=None,
                        help="fail when top-1 agreement with Keras is below this fraction")
    parser.add_argument("--via", choices=["function", "saved_model"], default="function",
                        help="TFLite conversion path (default: function)")
    parser.add_argument("--unsafe", action="store_true",
                        help="load with safe_mode=False (needed for Lambda layers; runs code stored in the file)")
    parser.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    if not args.tflite and not args.saved_model:
        raise ValueError(
            "Expected at least one output. Received: neither --tflite nor --saved-model. "
            "Fix: e.g. `--tflite model.tflite`."
        )
    if not os.path.isfile(args.model):
        raise ValueError(f"Expected a saved model file. Received: '{args.model}', which does not exist.")
    if args.quantize == "int8" and args.data is None:
        raise ValueError(
            "Expected --data with --quantize int8 (calibration needs sample images). "
            "Received: no --data. Fix: e.g. `--data images/` (class subfolders of JPEG/PNG)."
        )
    import keras

    from keras_autoprune.export import export_saved_model, export_tflite
    from keras_autoprune.export.images import load_images
    from keras_autoprune.export.saved_model import check_saved_model_target
    from keras_autoprune.export.tflite import check_tflite_arguments
    from keras_autoprune.export.verify import check_thresholds

    # Every argument is checked before the model is loaded, and both outputs before either is written.
    if args.tflite:
        check_tflite_arguments(args.tflite, args.quantize, args.data is not None, args.int8_io, args.via,
                               args.tolerance, args.min_top1, args.num_samples)
    if args.saved_model:
        check_saved_model_target(args.saved_model, args.version)
        check_thresholds(args.tolerance, args.min_top1, args.num_samples)
    model = keras.saving.load_model(args.model, safe_mode=not args.unsafe)
    data = None
    if args.data is not None:
        data = load_images(args.data, tuple(model.inputs[0].shape[1:]), args.num_samples, args.scale, args.split)
        print(f"data: {data.shape[0]} images from {args.data} (scale={args.scale})")
    if args.tflite:
        result = export_tflite(
            model, args.tflite, quantize=args.quantize, representative_data=data,
            allow_flex=args.allow_flex, int8_io=args.int8_io, tolerance=args.tolerance,
            min_top1_agreement=args.min_top1, num_samples=args.num_samples, via=args.via,
        )
        print(result.summary())
    if args.saved_model:
        result = export_saved_model(
            model, args.saved_model, version=args.version, representative_data=data,
            tolerance=args.tolerance, min_top1_agreement=args.min_top1, num_samples=args.num_samples,
        )
        print(result.summary())
    return 0


# -- red ------------------------------------------------------------------
def _add_red(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "red",
        help="compress a saved .keras model with RED (no data, no fine-tuning)",
        description=(
            "Load a saved model (safe mode), compress it with RED (BatchNormalization folding, weight hashing, "
            "exact merging of identical neurons, optional depthwise separation, exact or approximate), print the "
            "report and the per-stage figures and write the compressed model. No data is read."
        ),
    )
    parser.add_argument("model", help="the model file (.keras)")
    parser.add_argument("out", metavar="OUT.keras", help="where to write the compressed model")
    parser.add_argument("--bandwidth-scale", type=float, default=0.05,
                        help="multiplies Silverman's bandwidth of each weight density: larger hashes coarser "
                             "(more merging, lower accuracy); 0 skips hashing (default: 0.05)")
    parser.add_argument("--snap-to", choices=SNAP_TARGETS, default="mean",
                        help="what a hashed weight becomes: the mean of the weights in its basin (default) or the "
                             "density's mode (the paper); the same neurons merge either way")
    parser.add_argument("--merge-threshold", type=float, default=0.0,
                        help="relative distance below which neurons merge; 0 merges identical ones only, "
                             "exactly (default: 0)")
    parser.add_argument("--merge-distance", choices=MERGE_DISTANCES, default="channel",
                        help="what that distance is relative to: the larger of the two channels (default) or the "
                             "layer's typical channel (weak channels merge more easily)")
    parser.add_argument("--merge-representative", choices=MERGE_REPRESENTATIVES, default="readers",
                        help="the weights a near-identical cluster keeps: the combination its readers see best "
                             "(default) or its first channel's")
    parser.add_argument("--no-merge-bias-correction", dest="correct_merge_bias", action="store_false",
                        help="with --merge-threshold > 0, leave the readers' biases as they are (by default they are "
                             "corrected for the change in the mean of what they read, from the folded "
                             "BatchNormalizations)")
    parser.add_argument("--separate-depthwise", action="store_true",
                        help="split convolutions whose hashed kernels repeat into depthwise + 1x1 where cheaper")
    parser.add_argument("--separation-tolerance", type=float, default=0.0,
                        help="> 0: split the remaining convolutions approximately into depthwise + 1x1 (the lowest "
                             "per-input-channel rank whose relative squared kernel error is within it; 0.1 kept "
                             "71%% of a CIFAR-10 ResNet-20's FLOPs for 0.6 point) (default: 0, off)")
    parser.add_argument("--reconstruction", choices=(*RECONSTRUCTIONS, "none"), default="synthetic",
                        help="what the compressed layers are refitted on: images synthesized from the "
                             "model's BatchNormalization statistics (default; no data) or nothing (no refit)")
    parser.add_argument("--refit-layers", choices=REFIT_LAYERS, default="approximated",
                        help="which layers are refitted to reproduce the original's outputs: the approximate "
                             "blocks' 1x1 parts (default) or every layer whose output changed (hashing, merging "
                             "and separation; measured in docs/methods/red.md)")
    parser.add_argument("--separation-cost", choices=SEPARATION_COSTS, default="flops",
                        help="what decides that a separated block replaces its convolution: fewer FLOPs (default) "
                             "or also measured faster on LiteRT on this machine (each layer and block timed alone, "
                             "as float32 files, or as int8 files with latency_int8)")
    parser.add_argument("--budget", default=None,
                        help="flops=F or params=F: search --budget-knob upwards for the fraction kept")
    parser.add_argument("--budget-knob", choices=BUDGET_KNOBS, default="bandwidth_scale",
                        help="what the --budget search raises: coarser hashing (default), more near-identical "
                             "merging (--bandwidth-scale fixed) or a larger --separation-tolerance")
    parser.add_argument("--hash-all-layers", action="store_true",
                        help="keep every layer's hashed weights (the paper); by default a layer whose hashing "
                             "enables no merge or separation gets its weights back")
    parser.add_argument("--restore-batchnorm", action="store_true",
                        help="put the folded BatchNormalizations back (same function), to fine-tune the result")
    parser.add_argument("--unsafe", action="store_true",
                        help="load with safe_mode=False (needed for Lambda layers; runs code stored in the file)")
    parser.add_argument("--input-shape", metavar="H,W,C",
                        help="input shape without the batch axis, for a model whose inputs have unknown sizes: "
                             "the FLOPs are counted at it (RED reads no data)")
    parser.add_argument("--tflite", metavar="OUT.tflite", help="also export a verified float32 .tflite")
    parser.set_defaults(run=_run_red)


def _parse_shape(text: str, flag: str = "--input-shape", length: int | None = None) -> tuple[int, ...]:
    """``"224,224,3"`` -> ``(224, 224, 3)`` (``length`` numbers when given); ValueError (a usage error) otherwise."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1 or length not in (None, len(shape)):
        count, example = (f"{length} positive integers", ",".join(["32"] * length)) if length else (
            "positive integers", "32,32,3")
        raise ValueError(f"Expected {flag} to be {count} separated by commas, e.g. {example}. "
                         f"Received: {flag} {text!r}")
    return shape


def _run_red(args: argparse.Namespace) -> int:
    from keras_autoprune.prune_saved import parse_budget
    from keras_autoprune.red.saved import compress_saved_model, stage_details

    budget = parse_budget(args.budget) if args.budget is not None else None
    input_shape = _parse_shape(args.input_shape) if args.input_shape is not None else None
    outcome = compress_saved_model(
        args.model, args.out, bandwidth_scale=args.bandwidth_scale, merge_threshold=args.merge_threshold,
        separate_depthwise=args.separate_depthwise, budget=budget, hash_all_layers=args.hash_all_layers,
        merge_distance=args.merge_distance, input_shape=input_shape, budget_knob=args.budget_knob,
        restore_batchnorm=args.restore_batchnorm, merge_representative=args.merge_representative,
        snap_to=args.snap_to, correct_merge_bias=args.correct_merge_bias,
        separation_tolerance=args.separation_tolerance, separation_cost=args.separation_cost,
        reconstruction=None if args.reconstruction == "none" else args.reconstruction,
        refit_layers=args.refit_layers,
        unsafe=args.unsafe, tflite=args.tflite,
    )
    report = outcome.result.report
    print(report.to_markdown() if report is not None else "(no per-layer report for this model)")
    print()
    print(stage_details(outcome.result))
    if outcome.export_summary:
        print(outcome.export_summary)
    print(f"wrote {', '.join(outcome.files)} ({outcome.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
