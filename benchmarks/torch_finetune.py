"""The Torch-Pruning peer of Benchmark v2, protocol 2 (pruned, then fine-tuned with our recipe).

::

    python -m benchmarks.torch_finetune --model resnet20 --entries tp_l1_global,tp_taylor_global \\
        --targets 0.5,0.25 --seeds 0 --out benchmarks/results/v2/finetune_torch_resnet20.json

The twin of the committed model (`benchmarks.torch_peer.load_twin`) is pruned
and fine-tuned as the Keras entries of profile ``v2`` are
(`benchmarks.entries.run_entry`), step for step:

- **Batches**: the very batches of `benchmarks.data.train_dataset` (same
  seed, same permutation, flips and crops per epoch), turned NCHW.
- **Rounds**: ``rounds`` pruning rounds at the start of epochs
  ``0 .. rounds - 1``, to the FLOPs fractions of
  `keras_autoprune.allocation.schedule.round_targets` (linear: 0.75 then
  0.5 of the original MACs for a 50% target in 2 rounds). Each round
  computes its importance's gradients on the current model from the shared
  1,024 calibration images (`BenchData.calibration`, which the Keras entries
  read) and bisects Torch-Pruning's ratio to the round's target
  (`torch_peer.prune_to_flops`, against the original MACs).
- **Optimizer**: SGD, Nesterov momentum 0.9, cross-entropy on logits, the
  per-epoch cosine learning rate of `benchmarks.profiles.learning_rate`
  from ``finetune_lr``, and Keras' decoupled weight decay on every
  parameter, ``w <- w - lr * wd * w`` before each update (not torch's
  coupled ``weight_decay``). Pruning changes the parameters' shapes, so
  each round starts a fresh optimizer; Keras' masked rounds keep the
  momentum of the unmasked weights: a small difference, in the peer's
  favour if any (no stale momentum).

Each row: ``entry, model, target, seed, flops_kept, params_kept, accuracy``
(all 10,000 test images), ``fit_seconds`` (training and pruning rounds),
``pruning_seconds`` (gradients and bisection), ``epochs``,
``round_targets``. Rows are written to ``--out`` as they finish; a row
already there is not run again, so the command resumes after a stop.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks import torch_peer
from benchmarks.data import BenchData, load_converged, steps_per_epoch, train_dataset
from benchmarks.profiles import PROFILES, Profile, learning_rate

ENTRIES = ("tp_l1_global", "tp_taylor_global")
"""The default entries: the two best Torch-Pruning importances of protocol 1 on ResNet-20 at 50% FLOPs kept
(after re-estimation: global L1 42.7%, global Taylor 34.5%; docs/benchmarks.md)."""


PROFILE_OF_MODEL = {profile.base_model: name for name, profile in PROFILES.items() if profile.base_model}
"""The protocol-2 profile of each committed model (``resnet20``: ``v2``, ``mobilenetv2``: ``v2_mobilenetv2``)."""


def decoupled_weight_decay(model, learning_rate_now: float, weight_decay: float) -> None:
    """Keras' weight decay: ``w <- w - lr * wd * w`` for every trainable parameter."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.0 - learning_rate_now * weight_decay)


def train_step(model, optimizer, images: np.ndarray, labels: np.ndarray, learning_rate_now: float, weight_decay: float) -> float:
    """One SGD step on a batch of NHWC raw pixels, as Keras' ``SGD(weight_decay=...)`` takes it; returns the loss.

    The gradient is taken at the current weights, then the weights decay
    (`decoupled_weight_decay`) and the optimizer applies the gradient.
    """
    import torch
    import torch.nn.functional as F

    loss = F.cross_entropy(model(torch_peer.to_nchw(images)), torch.from_numpy(np.array(labels, np.int64)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    decoupled_weight_decay(model, learning_rate_now, weight_decay)
    optimizer.step()
    return float(loss.detach())


def prune_round(model, entry: str, fraction_of_original: float, macs0: int, calibration: tuple[np.ndarray, np.ndarray]):
    """``model`` pruned to ``fraction_of_original`` of the original MACs ``macs0``; returns ``(model, seconds)``."""
    import torch

    start = time.perf_counter()
    _, importance, scope = entry.split("_")
    x, y = calibration
    gradients = {"taylor": torch_peer.taylor_gradients, "hessian": torch_peer.hessian_gradients}.get(importance)
    grads = gradients(model, x, y) if gradients else None
    example = torch_peer.to_nchw(x[:1])
    macs, _ = torch_peer.count(model, example)
    torch.manual_seed(0)
    pruned, _ = torch_peer.prune_to_flops(model, importance, scope == "global", fraction_of_original * macs0 / macs, example, grads)
    return pruned, time.perf_counter() - start


def finetune_row(
    twin,
    entry: str,
    target: float,
    seed: int,
    data: BenchData,
    profile: Profile,
    *,
    model_name: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Prunes a copy of ``twin`` in ``profile.rounds`` rounds inside ``profile.finetune_epochs`` epochs (module docstring)."""
    import copy

    import torch

    from keras_autoprune.allocation.schedule import round_targets  # the Keras callbacks' ramp

    if entry not in torch_peer.ENTRIES:
        raise ValueError(f"Expected an entry among {torch_peer.ENTRIES}. Received: entry={entry!r}")
    torch.manual_seed(seed)
    model = copy.deepcopy(twin)
    calibration = data.calibration(profile.calibration_batches * profile.batch_size)
    example = torch_peer.to_nchw(calibration[0][:1])
    macs0, params0 = torch_peer.count(model, example)
    fractions = round_targets(target, profile.rounds)
    epochs, steps = profile.finetune_epochs, steps_per_epoch(data, profile.batch_size)
    batches = train_dataset(data, profile.batch_size, seed, 0, epochs).as_numpy_iterator()
    fit_start, pruning_seconds = time.perf_counter(), 0.0
    optimizer = None
    for epoch in range(epochs):
        lr = learning_rate(epoch, profile.finetune_lr, epochs, "cosine")
        if epoch < len(fractions):
            model, seconds = prune_round(model, entry, fractions[epoch], macs0, calibration)
            pruning_seconds += seconds
            optimizer = None
        if optimizer is None:
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        total = 0.0
        for _ in range(steps):
            images, labels = next(batches)
            total += train_step(model, optimizer, images, labels, lr, profile.weight_decay)
        log(f"{model_name} {entry} target {target} seed {seed}: epoch {epoch + 1}/{epochs} loss {total / steps:.4f} lr {lr:.5f}")
    fit_seconds = time.perf_counter() - fit_start
    macs, params = torch_peer.count(model, example)
    return {
        "entry": entry, "model": model_name, "target": target, "seed": seed,
        "flops_kept": macs / macs0, "params_kept": params / params0,
        "accuracy": torch_peer.accuracy(model, data.x_test, data.y_test),
        "fit_seconds": fit_seconds, "pruning_seconds": pruning_seconds, "epochs": epochs, "round_targets": fractions,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20", choices=sorted(PROFILE_OF_MODEL),
                        help="a committed model of Benchmark v2 (its protocol-2 profile gives the recipe)")
    parser.add_argument("--out", required=True, help="JSON file of the rows (rewritten after each row; finished rows are kept)")
    parser.add_argument("--entries", default=",".join(ENTRIES), help=f"comma-separated, among {','.join(torch_peer.ENTRIES)}")
    parser.add_argument("--targets", default="0.5,0.25", help="comma-separated FLOPs fractions to keep")
    parser.add_argument("--seeds", default="0", help="comma-separated fine-tuning seeds")
    parser.add_argument("--data", default=None, help="CIFAR-10 archive (default: ../shared/data/cifar10-jpeg.tar.gz)")
    args = parser.parse_args(argv)
    profile = PROFILES[PROFILE_OF_MODEL[args.model]]
    data = load_converged(args.data) if args.data else load_converged()
    twin = torch_peer.load_twin(args.model)
    out = pathlib.Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {
        "protocol": f"pruned and fine-tuned (benchmark v2 protocol 2), the recipe of profile {profile.name}",
        "model": args.model, "profile": profile.to_dict(), "versions": torch_peer.versions(), "rows": []}
    record["command"] = " ".join(["python -m benchmarks.torch_finetune", *(argv if argv is not None else sys.argv[1:])])
    done = {(r["entry"], r["target"], r["seed"]) for r in record["rows"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        for target in [float(t) for t in args.targets.split(",") if t]:
            for entry in [e for e in args.entries.split(",") if e]:
                if (entry, target, seed) in done:
                    continue
                row = finetune_row(twin, entry, target, seed, data, profile, model_name=args.model,
                                   log=lambda line: print(line, flush=True))
                print(f"{entry} target {target} seed {seed}: accuracy {row['accuracy']:.4f}, FLOPs kept "
                      f"{row['flops_kept']:.3f}, params kept {row['params_kept']:.3f}, fit {row['fit_seconds']:.0f} s", flush=True)
                record["rows"].append(row)
                out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
