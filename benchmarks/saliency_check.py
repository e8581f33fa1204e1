"""Issue 12's diagnosis: NAP's predicted loss increase against the measured one, group by group.

For a converged model of Benchmark v2 and one protocol-1 plan (an entry of
`benchmarks.oneshot` at a FLOPs target), each prunable channel group ``g``
that the plan shrinks gets:

- **predicted**: ``Σ_{c removed in g} S_c``, the NAP saliencies of its
  removed channels (`keras_autoprune.methods.nap.channel_saliencies`, not
  divided by cost: the OBS estimate of the increase of the mean negative
  log-likelihood per example, summed over channels, cross terms left out);
- **K-FAC, uncompensated**: the K-FAC quadratic form of the same removal
  as the readers see it (the post-BatchNormalization channel becomes 0):
  ``Σ_readers ½ tr(W_Rᵀ A_RR W_R G)`` over the non-depthwise layers that
  read the group, ``R`` the rows of the removed channels (all taps), with
  all removed channels together (cross terms within a reader included, no
  damping, no OBS compensation). NAP's saliency assumes the OBS
  compensation (``[(A⁻¹)_RR]⁻¹`` instead of ``A_RR``, ``1/[G⁻¹]_ii``
  instead of ``G_ii``) that ``obs_update=False``, the default, does not
  apply;
- **exact quadratic**: the same second-order model without the K-FAC
  approximation: with ``Δ`` the change of every weight that masking ``g``
  makes (``W_masked − W``) and ``u_b = J_b Δ`` the change of example
  ``b``'s logits to first order (a central difference,
  ``(f(W + εΔ) − f(W − εΔ)) / 2ε``, ``ε = 0.01``),
  ``q = ½ mean_b [Σ_k p_bk u_bk² − (Σ_k p_bk u_bk)²]``, the true Fisher
  (Gauss-Newton) quadratic form ``½ Δᵀ F Δ`` on the held-out images. NAP's
  prediction far below it: K-FAC's factorisation (independent locations,
  ``A ⊗ G``) underestimates; measured far above it: the removal leaves
  the quadratic regime;
- **measured**: ``L(masked_g) − L(model)``, the mean cross-entropy on 2,048
  held-out training images (not the calibration nor the BatchNormalization
  set of protocol 1) of the model with only ``g``'s removed channels zeroed
  (`kap.mask_plan`, no BatchNormalization re-estimation), minus the
  unpruned model's.

The last row removes every group's channels at once (the plan itself).
A ratio measured/predicted far above 1 is a group whose channels are
individually cheap but jointly expensive (super-additive removal: the
single-channel saliency cannot see it); far below 1, the saliency
overestimates the damage.

    python -m benchmarks.saliency_check --model mobilenetv2 --entry nap_cost_aware --target 0.5

Writes ``benchmarks/results/v2/saliency_check_<model>_<entry>_<target>.json``
and prints the table of ``docs/methods/nap.md``.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from benchmarks import converged, oneshot

HELD_OUT = 2048
"""Held-out training images: those after protocol 1's calibration and BatchNormalization images."""


def held_out(data: converged.Cifar10, count: int = HELD_OUT, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` training images used by no other part of protocol 1 (same permutation as `converged.protocol_data`)."""
    order = np.random.default_rng(seed).permutation(len(data.x_train))
    start = sum(converged.PROTOCOL_IMAGES.values())
    chosen = order[start:start + count]
    return data.x_train[chosen].astype(np.float32), data.y_train[chosen]


def logits_of(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``model(x, training=False)`` in batches, float64."""
    return np.concatenate([np.asarray(model(x[i:i + batch_size], training=False))
                           for i in range(0, len(x), batch_size)]).astype(np.float64)


def mean_nll(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of ``logits`` at the true labels."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-np.mean(log_p[np.arange(len(y)), y]))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``logits``."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def kfac_reader_quadratic(graph, factors, group, removed: np.ndarray) -> float:
    """``Σ_readers ½ tr(W_Rᵀ A_RR W_R G)`` (see the module docstring)."""
    layers = {record.name: record.operation for record in graph.records}
    total = 0.0
    for member in group.members:
        factor = factors.get(member.layer)
        if member.side != "input" or member.tensor_index != 0 or factor is None or factor.depthwise:
            continue
        positions = member.positions[np.isin(member.channels, removed)]
        if positions.size == 0:
            continue
        layer = layers[member.layer]
        W = factor.weight_matrix(np.asarray(layer.kernel), np.asarray(layer.bias) if factor.has_bias else None)
        taps, in_channels = factor.patch_layout
        rows = (np.arange(taps)[:, None] * in_channels + positions).ravel()
        W_R = W[rows]
        total += 0.5 * float(np.trace(W_R.T @ factor.A[np.ix_(rows, rows)] @ W_R @ factor.G))
    return total


def exact_quadratic(model, masked, x: np.ndarray, probabilities: np.ndarray, step: float = 0.01) -> float:
    """``½ Δᵀ F Δ`` with the true Fisher of the softmax outputs ``probabilities`` (``softmax(model(x))``),
    ``Δ = weights(masked) − weights(model)`` (see the module docstring)."""
    import keras

    start, end = model.get_weights(), masked.get_weights()
    shifted = keras.models.clone_model(model)
    logits = {}
    for sign in (1.0, -1.0):
        shifted.set_weights([a + sign * step * (b - a) for a, b in zip(start, end)])
        logits[sign] = logits_of(shifted, x)
    u = (logits[1.0] - logits[-1.0]) / (2 * step)
    p = probabilities
    return float(0.5 * np.mean(np.sum(p * u**2, axis=1) - np.sum(p * u, axis=1) ** 2))


def check(model_name: str, entry: str, target: float, data: converged.Cifar10, max_layer_ratio: float | None = None,
          log=print, held_out_images: int = HELD_OUT) -> dict:
    """The table rows for one plan (see the module docstring)."""
    import keras_autoprune as kap
    from keras_autoprune.methods import nap
    from keras_autoprune.stats import collect_kfac

    shared = converged.protocol_data(data)
    calibration = (shared["calibration_x"], shared["calibration_y"])
    model = oneshot.load_model(model_name)
    graph = kap.DependencyGraph(model)
    callback = oneshot.make_callback(entry, target, calibration, max_layer_ratio=max_layer_ratio)
    callback.prune(model)
    plan = callback.plan
    factors = collect_kfac(model, calibration, num_batches=len(calibration[0]) // oneshot.BATCH_SIZE,
                           batch_size=oneshot.BATCH_SIZE, graph=graph, verbose=0)
    saliency = nap.channel_saliencies(model, graph, factors)
    x, y = held_out(data, held_out_images)
    base_logits = logits_of(model, x)
    base, probabilities = mean_nll(base_logits, y), softmax(base_logits)
    rows = []
    for group_id, kept in plan.kept.items():
        group = graph.group(group_id)
        removed = np.setdiff1d(np.arange(group.size), kept)
        if removed.size == 0:
            continue
        masked = kap.mask_plan(model, kap.PrunePlan({group_id: kept}), graph)
        measured = mean_nll(logits_of(masked, x), y) - base
        predicted = float(saliency[group_id][removed].sum())
        quadratic = exact_quadratic(model, masked, x, probabilities)
        uncompensated = kfac_reader_quadratic(graph, factors, group, removed)
        rows.append({"group": group_id, "size": group.size, "removed": int(removed.size), "predicted": predicted,
                     "kfac_uncompensated": uncompensated, "exact_quadratic": quadratic, "measured": measured})
        log(f"{group_id}: {removed.size}/{group.size} removed, predicted {predicted:.4f}, K-FAC uncompensated "
            f"{uncompensated:.4f}, exact quadratic {quadratic:.4f}, measured {measured:.4f}")
    masked = kap.mask_plan(model, plan, graph)
    total = {"predicted": sum(r["predicted"] for r in rows),
             "exact_quadratic": exact_quadratic(model, masked, x, probabilities),
             "kfac_uncompensated": sum(r["kfac_uncompensated"] for r in rows),
             "measured": mean_nll(logits_of(masked, x), y) - base}
    log(f"all groups: predicted {total['predicted']:.4f}, exact quadratic {total['exact_quadratic']:.4f}, "
        f"measured {total['measured']:.4f}")
    return {"model": model_name, "entry": entry, "target": target, "max_layer_ratio": callback.max_layer_ratio,
            "held_out_images": len(x), "base_nll": base, "groups": rows, "all": total}


def markdown(result: dict) -> str:
    """Per group: channels removed, predicted and measured loss increase, their ratio."""
    lines = ["| group | removed | NAP saliency | K-FAC uncompensated | exact quadratic | measured ΔL | "
             "exact / NAP | exact / K-FAC unc. | measured / exact |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["groups"] + [dict(result["all"], group="**all at once**", removed="", size="")]:
        removed = f"{row['removed']}/{row['size']}" if row["size"] != "" else ""
        lines.append(f"| {row['group']} | {removed} | {row['predicted']:.4f} | {row['kfac_uncompensated']:.4f} | "
                     f"{row['exact_quadratic']:.4f} | {row['measured']:.4f} | "
                     f"{_ratio(row['exact_quadratic'], row['predicted'])} | "
                     f"{_ratio(row['exact_quadratic'], row['kfac_uncompensated'])} | "
                     f"{_ratio(row['measured'], row['exact_quadratic'])} |")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}" if b > 0 else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.saliency_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(converged.ARCHITECTURES), required=True)
    parser.add_argument("--entry", default="nap_cost_aware", choices=oneshot.RANKED_ENTRIES)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--max-layer-ratio", type=float)
    parser.add_argument("--data", default=str(converged.DEFAULT_SOURCE))
    args = parser.parse_args(argv)
    result = check(args.model, args.entry, args.target, converged.load_cifar10(args.data), args.max_layer_ratio,
                   log=lambda line: print(line, flush=True))
    suffix = "" if args.max_layer_ratio is None else f"_max_layer_ratio_{args.max_layer_ratio:g}"
    out = oneshot.RESULTS_DIR / f"saliency_check_{args.model}_{args.entry}_{args.target:g}{suffix}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
