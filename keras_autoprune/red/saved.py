"""RED on a saved ``.keras`` file: what ``keras-autoprune red`` runs.

    keras-autoprune red model.keras red.keras --bandwidth-scale 0.05 --separate-depthwise --tflite red.tflite

The model is loaded in safe mode (``unsafe=True`` opts out: a ``.keras``
file with ``Lambda`` layers can then run arbitrary code), compressed with
`keras_autoprune.red.compress` (no data, no fine-tuning), saved, and
optionally exported to a float32 ``.tflite`` verified with LiteRT. Every
argument is checked before the model is read.
"""

from __future__ import annotations

import dataclasses
import os
import time

from keras_autoprune.budget import Budget
from keras_autoprune.red.compress import RedResult, check_options
from keras_autoprune.red.options import check_choice
from keras_autoprune.saved_paths import check_model_paths


@dataclasses.dataclass(frozen=True)
class RedOutcome:
    """What `compress_saved_model` produced.

    Attributes:
        result: the `RedResult` (``result.model`` is what was saved).
        files: the files written, in order.
        seconds: wall time of loading, compressing, saving and exporting.
        export_summary: the `ExportResult.summary()` line of the ``.tflite``, or None.
    """

    result: RedResult
    files: tuple[str, ...]
    seconds: float
    export_summary: str | None


def compress_saved_model(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    bandwidth_scale: float = 0.05,
    merge_threshold: float = 0.0,
    separate_depthwise: bool = False,
    budget: Budget | None = None,
    hash_all_layers: bool = False,
    merge_distance: str = "channel",
    input_shape: tuple[int, ...] | None = None,
    budget_knob: str = "bandwidth_scale",
    restore_batchnorm: bool = False,
    merge_representative: str = "readers",
    snap_to: str = "mean",
    correct_merge_bias: bool = True,
    separation_tolerance: float = 0.0,
    reconstruction: str | None = "synthetic",
    refit_layers: str = "approximated",
    separation_cost: str = "flops",
    unsafe: bool = False,
    tflite: str | os.PathLike | None = None,
) -> RedOutcome:
    """Loads ``model_path``, compresses it with RED, writes ``out`` (and ``tflite``).

    Args:
        model_path: a ``.keras`` file.
        out: the compressed model's ``.keras`` file.
        bandwidth_scale, merge_threshold, separate_depthwise, budget,
            hash_all_layers, merge_distance, input_shape, budget_knob,
            restore_batchnorm, merge_representative, snap_to,
            correct_merge_bias, separation_tolerance, separation_cost,
            refit_layers: as in `keras_autoprune.red.compress`.
        reconstruction: ``"synthetic"`` or None, as in `compress`.
        unsafe: load with ``safe_mode=False``.
        tflite: also export a float32 ``.tflite`` here, verified with LiteRT
            on random inputs.

    Returns:
        A `RedOutcome`.

    Raises:
        ValueError: a bad argument (before any work) or an unreachable budget.
        ExportError: the ``.tflite`` failed conversion or verification.
    """
    check_model_paths(model_path, out, tflite)
    check_options(bandwidth_scale, merge_threshold, separate_depthwise, budget, hash_all_layers, merge_distance,
                  budget_knob, restore_batchnorm, merge_representative, snap_to, correct_merge_bias,
                  separation_tolerance, separation_cost, refit_layers)
    if reconstruction is not None:
        check_choice("reconstruction", reconstruction)  # a saved model is refitted by name only
    import keras

    from keras_autoprune.red.compress import compress

    start = time.perf_counter()
    model = keras.saving.load_model(model_path, safe_mode=not unsafe, compile=False)
    result = compress(model, bandwidth_scale=bandwidth_scale, merge_threshold=merge_threshold,
                      separate_depthwise=separate_depthwise, budget=budget, hash_all_layers=hash_all_layers,
                      merge_distance=merge_distance, input_shape=input_shape, budget_knob=budget_knob,
                      restore_batchnorm=restore_batchnorm, merge_representative=merge_representative,
                      snap_to=snap_to, correct_merge_bias=correct_merge_bias,
                      separation_tolerance=separation_tolerance, reconstruction=reconstruction,
                      refit_layers=refit_layers, separation_cost=separation_cost)
    result.model.save(out)
    files, summary = [str(out)], None
    if tflite is not None:
        from keras_autoprune.export import export_tflite

        summary = export_tflite(result.model, tflite).summary()
        files.append(str(tflite))
    return RedOutcome(result, tuple(files), time.perf_counter() - start, summary)


def stage_details(result: RedResult) -> str:
    """The per-stage figures as text: `RedResult.summary`, then per layer the
    distinct values after hashing, the neurons merged and the separations."""
    lines = [result.summary(), "", "distinct values after hashing (per layer and weight; relative change of the weights):"]
    distinct = result.distinct_values
    if not distinct:
        lines.append("  none hashed" + (" (bandwidth_scale=0)" if result.bandwidth_scale == 0 else ""))
    if result.hashing_reverted:
        lines.append(f"  hashing undone (it enabled no merge or separation): {', '.join(result.hashing_reverted)}")
    moved = {(t.layer, t.weight): t.relative_error for t in result.hashed}
    for layer, weights in distinct.items():
        lines.append(f"  {layer}: " + ", ".join(f"{key} {count:,} ({moved[layer, key]:.1%})"
                                                for key, count in weights.items()))
    lines.append(f"neurons merged: {result.neurons_merged}" + (" (per layer below)" if result.merged_per_layer else ""))
    for layer, count in result.merged_per_layer.items():
        lines.append(f"  {layer}: {count}")
    lines.append(f"layers separated: {len(result.separations)}")
    for s in result.separations:
        lines.append(f"  {s.layer}: multiplier {s.multiplier}, {s.distinct_kernels} distinct kernels, "
                     f"FLOPs {s.flops_before:,} -> {s.flops_after:,}")
    refitted = set(result.reconstructed)
    if result.separation_tolerance > 0:
        lines.append(f"layers separated approximately: {len(result.approximations)} (separation_tolerance="
                     f"{result.separation_tolerance:g}; 1x1 parts refitted on {result.reconstruction})")
        for s in result.approximations:
            lines.append(f"  {s.layer}: rank {s.multiplier}, kernel error {s.kernel_error:.1%}, "
                         f"FLOPs {s.flops_before:,} -> {s.flops_after:,}" + ("" if s.layer in refitted else ", not refitted"))
    if result.refit_layers == "all" and result.reconstruction != "none":
        lines.append(f"layers refitted on {result.reconstruction} inputs (every changed layer): {len(refitted)}"
                     + (f": {', '.join(result.reconstructed)}" if refitted else ""))
    if result.block_timings:
        lines.append("blocks timed on LiteRT against their convolutions (median ms, 1 thread):")
        for t in result.block_timings.values():
            lines.append(f"  {t.layer}: M={t.multiplier}, convolution {t.convolution_ms:.4f}, block {t.block_ms:.4f}"
                         + ("" if t.faster else ", slower: kept as a convolution"))
    return "\n".join(lines)
