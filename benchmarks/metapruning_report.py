"""MetaPruning benchmark's figures as markdown: the PruningNet, the searches, the latency checks, the trainings.

`benchmarks.metapruning_bench report` writes them into `docs/methods/metapruning.md`
from the results JSON (``benchmarks/results/v2/metapruning_<model>.json``).
"""

from __future__ import annotations

import numpy as np


def markdown(results: dict) -> str:
    """The figures measured so far, as markdown."""
    lines = []
    state = results.get("pruningnet")
    if state:
        start = ("from the converged weights" if state.get("warm_start", True)
                 else "from a random initialisation (learning rate 0.1)")
        lines.append(f"PruningNet: {state['epochs_done']} epoch(s) {start}, "
                     f"{sum(state['seconds']) / 60:.0f} min on 2 shared CPU cores; training loss (label-smoothed, "
                     f"random genes) per epoch: {', '.join(f'{v:.3f}' for v in state['loss'])}.\n")
    rows = results.get("search", {})
    if rows:
        lines += ["| budget | searched: held-out top-1 | cost | uniform: held-out top-1 | cost | candidates | search min |",
                  "|---|---|---|---|---|---|---|"]
        for tag, row in sorted(rows.items()):
            lines.append(f"| {tag.replace('_', ' ')} | {row['score']:.4f} | {row['cost']:.3f} | {row['uniform_score']:.4f} | "
                         f"{row['uniform_cost']:.3f} | {row['candidates']} | {row['seconds'] / 60:.0f} |")
        lines.append("\nHeld-out top-1: 2,000 training images kept out of the PruningNet's training (rows "
                     "`score5000`: all 5,000, BatchNormalization re-estimated on 2,560 training images instead of "
                     "2,560 other held-out ones), generated weights, BatchNormalization re-estimated, no "
                     "fine-tuning.\n")
    checks = [(tag, row["check"]) for tag, row in sorted(rows.items()) if "check" in row]
    if checks:
        lines += ["| latency budget | table | candidates measured | correlation | mean error (ms) | mean error "
                  "(fraction of the full latency) | winner: measured latency kept | winner vs budget |",
                  "|---|---|---|---|---|---|---|---|"]
        for tag, check in checks:
            budget = float(tag.split("_")[1])
            fraction = check["winner_measured_fraction"]
            lines.append(f"| {budget:.0%} | {_table_label(check)} | {_candidate_figures(check)} | {fraction:.1%} | "
                         f"{fraction / budget - 1:+.1%} |")
        lines.append("\nLatency: LiteRT, float32 `.tflite`, batch 1, 1 thread, this machine; the table's "
                     "estimates against the winner and the best other candidates within the search's window, "
                     "measured interleaved with the full model (rows without a fraction error: the first runs, "
                     "which measured the candidates only and divide by the full latency measured when the table "
                     "was built).\n")
    tuned = results.get("finetune", {})
    if tuned:
        lines += ["| budget | entry | epochs | test top-1 before | after training | FLOPs kept |", "|---|---|---|---|---|---|"]
        for tag, entries in sorted(tuned.items()):
            for entry, row in sorted(entries.items()):
                before = f"{row['test_before']:.4f}" if "test_before" in row else "(fresh weights)"
                lines.append(f"| {tag.replace('_', ' ')} | {entry} | {row['epochs']} | {before} | "
                             f"{row['test_after']:.4f} | {row['flops_kept']:.3f} |")
        lines += ["", *gap_rows(tuned)]
        lines.append("\nRows `searched`, `uniform`: from the PruningNet's generated weights; `_from_trained`: the "
                     "converged model cut to the gene's channels; both fine-tuned with protocol 2's learning rate and schedule with the converged recipe's weight decay (5e-3; protocol 2 uses 5e-4). "
                     "`_from_scratch`: fresh weights trained with the converged models' recipe (warm-up, cosine "
                     "from 0.1), 20 epochs unless the row says `_<E>ep`. The uniform widths are matched to the searched "
                     "FLOPs to a channel in the "
                     "`_from_scratch` rows and in the `_from_trained` rows of session 11 on; earlier "
                     "`_from_trained` rows used the widest uniform gene within the budget.")
    return "\n".join(lines) or "Not run yet."


def gap_rows(tuned: dict) -> list[str]:
    """Markdown: each searched row beside the uniform row trained the same way (budget, start, seed)."""
    lines = ["| budget | start | epochs | seed | searched | uniform | searched - uniform (points) |",
             "|---|---|---|---|---|---|---|"]
    for tag, entries in sorted(tuned.items()):
        for entry, row in sorted(entries.items()):
            uniform = entries.get("uniform" + entry[len("searched"):]) if entry.startswith("searched") else None
            if uniform is None:
                continue
            start = ("converged weights" if "_from_trained" in entry else
                     "fresh weights" if "_from_scratch" in entry else "generated weights")
            seed = entry.rsplit("_seed", 1)[1] if "_seed" in entry else "0"
            lines.append(f"| {tag.replace('_', ' ')} | {start} | {row['epochs']} | {seed} | {row['test_after']:.2%} | "
                         f"{uniform['test_after']:.2%} | {100 * (row['test_after'] - uniform['test_after']):+.2f} |")
    return lines if len(lines) > 2 else []


def _table_label(check: dict) -> str:
    scale = check.get("savings_scale", 1.0)
    return "k = 1 (as built)" if scale == 1.0 else f"calibrated, k = {scale:.3f}"


def _candidate_figures(check: dict) -> str:
    """Count, correlation, mean relative error in ms and in fraction of the full latency, over the candidates.

    The fraction error compares ``measured / measured full`` with ``predicted / predicted full``: what the
    search constrains. Checks from before the full model was measured with the candidates have no fraction.
    """
    predicted, measured = np.asarray(check["predicted_ms"]), np.asarray(check["measured_ms"])
    with_full = "full_measured_ms" in check
    candidates = slice(1, None) if with_full else slice(None)
    p, m = predicted[candidates], measured[candidates]
    figures = [str(len(p)), f"{np.corrcoef(p, m)[0, 1]:.3f}", f"{np.mean(np.abs(p - m) / m):.1%}"]
    if with_full:
        ratio = (m / measured[0]) / (p / predicted[0])
        figures.append(f"{np.mean(np.abs(ratio - 1)):.1%}")
    else:
        figures.append("n/a")
    return " | ".join(figures)
