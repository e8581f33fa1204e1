"""Benchmark v2: MetaPruning on the converged ResNet-20, in resumable stages.

    python -m benchmarks.metapruning_bench train --epochs 2      # PruningNet training, one epoch per stage
    python -m benchmarks.metapruning_bench search --target 0.5   # evolutionary search at 50% FLOPs kept
    python -m benchmarks.metapruning_bench finetune --target 0.5 --epochs 4   # searched vs uniform widths
    python -m benchmarks.metapruning_bench finetune --target 0.5 --epochs 4 --init trained   # from the converged weights
    python -m benchmarks.metapruning_bench finetune --target 0.25 --epochs 20 --init scratch  # fresh weights (--seed N)
    python -m benchmarks.metapruning_bench export --target 0.25 --dir D    # the two architectures, for a GPU
    python -m benchmarks.metapruning_bench scratch --dir D --epochs 80 --entry searched --seed 0  # Keras alone
    python -m benchmarks.metapruning_bench collect --dir D                 # files the records of `scratch`
    python -m benchmarks.metapruning_bench latency --target 0.5  # latency table, latency-budget search, check
    python -m benchmarks.metapruning_bench latency --target 0.5 --calibrate   # the same with a calibrated table
    python -m benchmarks.metapruning_bench report                # the table in docs/methods/metapruning.md

Every stage takes ``--channel-order l1`` to run the same protocol on a
PruningNet that keeps each group's channels of largest L1 norm first
(`PruningNet(channel_order="l1")`); its weights, scores and results are kept
apart (``metapruning_<model>_l1.json``). ``--pruningnet-start scratch`` likewise
runs them on a PruningNet whose generators start from a random initialisation
and train at 0.1 (the paper's; ``metapruning_<model>_scratchnet.json``). A
training from scratch at the same widths, epochs and seed is reused from
another net's results rather than trained twice.

Data (fixed, shared by every stage): the 50,000 CIFAR-10 training images are
split by a seeded permutation into 45,000 that train the PruningNet and the
fine-tuned winners (flip and crop augmentation, `converged.augment`) and
5,000 held out, of which the first 2,000 score search candidates and 2,560
(20 batches of 128) re-estimate BatchNormalization before each score. The
test images are only used for the final figures.

The PruningNet starts from the committed converged weights (warm start) and
trains with SGD (Nesterov 0.9), label smoothing 0.1 and a learning rate
decayed linearly from 0.01 to 0 over the planned epochs, one epoch per
stage; its weights stay in the cache (``$KERAS_AUTOPRUNE_CACHE``, 74 MB for
ResNet-20, too large to commit; the 2 epochs take about 5 minutes on 2 idle
cores). Results that record epochs whose weights are gone make the next
``train`` start again from the converged weights; ``finetune --init
scratch|trained`` needs only the recorded search rows, not those weights. Everything measured is written to
``benchmarks/results/v2/metapruning_<model>.json`` as soon as it is known.
A search that finds another gene, or runs on another PruningNet, moves the
rows trained from the previous search to ``finetune_superseded`` (not
reported); ``finetune`` trains a row
again unless one with the same layer widths and epochs is recorded (a
from-scratch or from-trained row with equal widths is reused from a
superseded search; a from-scratch one from another search too).
The searched widths and the uniform widths at the same FLOPs (the widest
uniform gene within the budget) both start from the PruningNet's generated
weights and are fine-tuned with the same recipe and epochs
(`benchmarks.profiles` v2: SGD 0.01 cosine, the converged recipe's weight
decay).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

from benchmarks import converged, red_bench
from benchmarks.metapruning_report import markdown

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results" / "v2"
HELD_OUT = 5000
SCORE_IMAGES = 2000
RECALIBRATION_BATCHES = 20
BATCH_SIZE = 128
SETTINGS = {"population": 16, "parents": 4, "mutations": 6, "crossovers": 6, "iterations": 5}
"""Search sizes for 2 CPU cores (the paper: 50, 10, 25, 25, 20)."""
SCRATCH_EPOCHS = 20
"""Epochs of the CPU comparison from scratch; rows trained another number of epochs are named ``..._<E>ep``."""
SCALES = tuple(round(0.1 + 0.05 * i, 2) for i in range(19))
"""Width choices 0.10, 0.15, ..., 1.00 (coarser than the paper's 31: fewer, more distinct genes)."""


@dataclasses.dataclass(frozen=True)
class NetVariant:
    """Which PruningNet a stage runs on; each variant keeps its own weights, scores and results.

    ``channel_order``: `PruningNet(channel_order=...)`. ``warm_start``: the generators start at the converged
    weights and train at 0.01 (the default), or from a random initialisation at 0.1, the paper's PruningNet
    (`PruningNet(warm_start=False)`; the results file gets a ``_scratchnet`` suffix).
    """

    channel_order: str = "index"
    warm_start: bool = True

    def run(self, model_name: str) -> str:
        """``resnet20``, ``resnet20_l1``, ``resnet20_scratchnet``, ``resnet20_l1_scratchnet``."""
        order = "" if self.channel_order == "index" else f"_{self.channel_order}"
        return f"{model_name}{order}" + ("" if self.warm_start else "_scratchnet")

    @property
    def learning_rate(self) -> float:
        """The PruningNet's initial learning rate, decayed linearly to 0 over the planned epochs."""
        from keras_autoprune.metapruning import training

        return training.WARM_START_LEARNING_RATE if self.warm_start else training.SCRATCH_LEARNING_RATE


def _paths(model_name: str, variant: NetVariant = NetVariant()) -> dict:
    from keras_autoprune.datasets import cache_dir

    cache = cache_dir() / "metapruning"
    cache.mkdir(parents=True, exist_ok=True)
    run = variant.run(model_name)
    return {"weights": cache / f"pruningnet_{run}.weights.h5", "results": RESULTS_DIR / f"metapruning_{run}.json",
            "scores": cache / f"scores_{run}_{{tag}}.json", "table": RESULTS_DIR / f"latency_table_{model_name}.json",
            "calibrated_table": RESULTS_DIR / f"latency_table_{model_name}_calibrated.json",
            "channel_order": variant.channel_order, "warm_start": variant.warm_start, "run": run}


def _tag(metric: str, target: float, calibrated: bool = False, score_images: int = SCORE_IMAGES) -> str:
    """The results row (and score cache) of a search: ``flops_0.25``, ``latency_0.5``, ``latency_0.5_calibrated``,
    ``flops_0.25_score5000`` (candidates scored on all held-out images, `_split`)."""
    return (f"{metric}_{target}" + ("_calibrated" if calibrated else "")
            + (f"_score{score_images}" if score_images != SCORE_IMAGES else ""))


def _table_path(paths: dict, calibrated: bool) -> pathlib.Path:
    return paths["calibrated_table" if calibrated else "table"]


def _split(data: converged.Cifar10, score_images: int = SCORE_IMAGES) -> dict[str, np.ndarray]:
    """The fixed split: 45,000 training images, ``score_images`` held-out images that score candidates, and
    the images that re-estimate BatchNormalization before each score.

    With the default 2,000 scored images the re-estimation takes the next 2,560 held-out images; scoring on
    all 5,000 held-out images (``score_images=HELD_OUT``: the sampling noise of an accuracy near 65% falls
    from ±1.1 to ±0.7 points, one standard deviation) re-estimates on the first 2,560 training images
    instead, as the paper does.
    """
    if score_images not in (SCORE_IMAGES, HELD_OUT):
        raise ValueError(f"Expected score_images of {SCORE_IMAGES} or {HELD_OUT} (all held-out images). "
                         f"Received: {score_images}.")
    order = np.random.default_rng(1).permutation(len(data.x_train))
    train, held = order[HELD_OUT:], order[:HELD_OUT]
    scored, rest = held[:score_images], held[score_images:]
    recalibration = (rest if score_images == SCORE_IMAGES else train)[:RECALIBRATION_BATCHES * BATCH_SIZE]
    return {"train_x": data.x_train[train], "train_y": data.y_train[train],
            "score_x": data.x_train[scored].astype(np.float32), "score_y": data.y_train[scored],
            "bn_x": data.x_train[recalibration].astype(np.float32)}


def _full_batches(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first ``floor(N / 128) * 128`` examples (44,928 of 45,000): no ragged last batch."""
    count = len(x) // BATCH_SIZE * BATCH_SIZE
    return x[:count], y[:count]


def _load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _store(path: pathlib.Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=True))


def _network(model_name: str, paths: dict, trained_weights: bool = True):
    """The converged model and its PruningNet, with the trained generators where ``trained_weights``.

    Without them (``trained_weights=False``) the net only maps genes to widths and plans, which is all
    the trainings from scratch or from the converged weights need: they run where the cached PruningNet
    weights are gone (a new machine) as long as the search rows are recorded.
    """
    import keras

    from keras_autoprune import metapruning as mp

    model = keras.saving.load_model(converged.MODELS_DIR / f"{model_name}.keras")
    net = mp.PruningNet(model, scales=SCALES, seed=0, channel_order=paths["channel_order"],
                        warm_start=paths["warm_start"])
    if not trained_weights:
        return model, net
    trained = _load(paths["results"]).get("pruningnet", {}).get("epochs_done", 0)
    if trained and not paths["weights"].exists():
        raise FileNotFoundError(f"The results record {trained} PruningNet epoch(s) but {paths['weights']} is missing; "
                                f"rerun `python -m benchmarks.metapruning_bench train --model {model_name} --epochs N` "
                                f"(it starts again from the converged weights).")
    if paths["weights"].exists():
        net(np.zeros((1, 32, 32, 3), np.float32))
        net.load_weights(paths["weights"])
    return model, net


def train(model_name: str, epochs: int, variant: NetVariant = NetVariant(), log=print) -> None:
    """Trains the PruningNet up to ``epochs`` epochs in all, one epoch per stage (resumes)."""
    from keras_autoprune import metapruning as mp

    paths = _paths(model_name, variant)
    results = _load(paths["results"])
    if not paths["weights"].exists():  # weights lost (or never kept): the recorded epochs describe another net
        results["pruningnet"] = {"epochs_done": 0, "seconds": [], "loss": [], "planned_epochs": epochs}
        _store(paths["results"], results)
    state = results.setdefault("pruningnet", {"epochs_done": 0, "seconds": [], "loss": [], "planned_epochs": epochs})
    state["planned_epochs"] = max(epochs, state.get("planned_epochs", epochs))
    state["warm_start"] = variant.warm_start
    _store(paths["results"], results)
    data = converged.load_cifar10()
    split = _split(data)
    model, net = _network(model_name, paths)
    for epoch in range(state["epochs_done"], epochs):
        x, y = _full_batches(*converged.augment(split["train_x"], split["train_y"], seed=2, epoch=epoch))
        rate = variant.learning_rate * (1 - epoch / state["planned_epochs"])
        start = time.perf_counter()
        history = mp.train_pruningnet(net, (x, y), epochs=1, learning_rate=rate, decay=False, seed=epoch,
                                      batch_size=BATCH_SIZE, verbose=2)
        state["seconds"].append(time.perf_counter() - start)
        state["loss"].append(float(history.history["loss"][-1]))
        state["epochs_done"] = epoch + 1
        net.save_weights(paths["weights"])
        results = _load(paths["results"])  # other stages may have written meanwhile: replace only this state
        results["pruningnet"] = state
        _store(paths["results"], results)
        log(f"PruningNet epoch {epoch + 1}/{epochs}: loss {state['loss'][-1]:.4f}, {state['seconds'][-1]:.0f} s")


def search(model_name: str, target: float, metric: str = "flops", variant: NetVariant = NetVariant(), calibrated: bool = False,
           score_images: int = SCORE_IMAGES, log=print) -> dict:
    """Searches at ``target`` (FLOPs or latency kept); scores the uniform gene of the same budget too.

    ``calibrated``: a latency search uses the calibrated table (`LatencyTable.calibrate`); its row is
    ``latency_<target>_calibrated``. ``score_images``: 2,000 held-out images, or all 5,000 (`_split`; the
    row gets a ``_score5000`` suffix and its own trained rows).
    """
    import keras_autoprune as kap
    from keras_autoprune import metapruning as mp

    paths = _paths(model_name, variant)
    results = _load(paths["results"])
    split = _split(converged.load_cifar10(), score_images)
    model, net = _network(model_name, paths)
    budget = kap.Budget(**{metric: target})
    table = mp.LatencyTable.load(_table_path(paths, calibrated)) if metric == "latency" else None
    cost = mp.cost_function(net, budget, table)
    scorer = mp.CandidateScorer(net, (split["score_x"], split["score_y"]), split["bn_x"],
                                recalibration_batches=RECALIBRATION_BATCHES, batch_size=BATCH_SIZE)
    tag = _tag(metric, target, calibrated, score_images)
    start = time.perf_counter()
    key = mp.fingerprint(net, RECALIBRATION_BATCHES, BATCH_SIZE, score_images)  # a retrained net never reuses scores
    evolution = mp.EvolutionarySearch(net.space, scorer, cost, high=target, low=target - 0.05,
                                      settings=mp.SearchSettings(**SETTINGS), seed=0,
                                      cache_path=str(paths["scores"]).format(tag=f"{tag}_{key}"), cache_key=key)
    gene, score = evolution.run()
    seconds = time.perf_counter() - start
    uniform = mp.uniform_gene(net.space, cost, target)
    row = {"gene": list(gene), "score": score, "cost": evolution.history.costs[gene],
           "widths": net.space.group_widths(gene), "best_scores": evolution.history.best_scores,
           "candidates": len(evolution.history.scores), "rejected": evolution.history.rejected, "seconds": seconds,
           "uniform_gene": list(uniform), "uniform_score": scorer(uniform), "uniform_cost": cost(uniform),
           "uniform_widths": net.space.group_widths(uniform),
           "pruningnet_epochs": results.get("pruningnet", {}).get("epochs_done", 0), "pruningnet_key": key}
    results = _load(paths["results"])
    replace_search_row(results, tag, row, log)
    _store(paths["results"], results)
    log(f"search {tag}: best {score:.4f} at cost {row['cost']:.3f} ({row['candidates']} candidates, {seconds:.0f} s); "
        f"uniform {row['uniform_score']:.4f} at cost {row['uniform_cost']:.3f}")
    return row


def replace_search_row(results: dict, tag: str, row: dict, log=print) -> None:
    """Stores the search ``row`` as ``results["search"][tag]``.

    When it replaces a search with another gene, or one run on another PruningNet (``pruningnet_key``,
    `mp.fingerprint`: generated weights differ even for the same gene), the rows trained from that search
    move to ``results["finetune_superseded"][tag]`` (replacing older superseded ones): they no longer
    describe the search, and `finetune` reuses one only where its widths equal what it would train and it
    did not start from generated weights.
    """
    previous = results.setdefault("search", {}).get(tag)
    same = previous and previous["gene"] == row["gene"] and previous.get("pruningnet_key") == row.get("pruningnet_key")
    if previous and not same and results.get("finetune", {}).get(tag):
        results.setdefault("finetune_superseded", {})[tag] = results["finetune"].pop(tag)
        log(f"search {tag}: the rows trained from the previous search moved to 'finetune_superseded'")
    results["search"][tag] = row


def finetune(model_name: str, target: float, epochs: int, metric: str = "flops", variant: NetVariant = NetVariant(),
             init: str = "generated", seed: int = 0, entries: tuple[str, ...] = ("searched", "uniform"),
             score_images: int = SCORE_IMAGES, log=print) -> None:
    """Trains the searched and the uniform gene of ``target`` the same epochs; test accuracy of each.

    ``init``: ``"generated"`` starts each from the PruningNet's generated weights (rows ``searched``,
    ``uniform``); ``"trained"`` from the converged model cut to the gene's channels by `kap.apply_plan`
    (the channels the net's order keeps first; rows ``searched_from_trained``, ``uniform_from_trained``),
    both fine-tuned with protocol 2's learning rate and schedule (the converged recipe's weight decay, 5e-3). ``"scratch"`` trains the slim architectures from a fresh
    initialisation with the converged models' recipe (`converged.Recipe`: warm-up, cosine from 0.1) over
    ``epochs``, the paper's comparison (rows ``searched_from_scratch``, ``uniform_from_scratch``); it
    checkpoints every epoch in the cache and resumes. ``seed`` seeds the augmentation (and, from scratch,
    the initialisation and batch order; not with ``"generated"``); its rows get a ``_seed<N>`` suffix when
    it is not 0. From scratch or trained, under a FLOPs budget, the uniform widths are the same fraction
    of every group, to a channel, with the largest FLOPs not above the searched widths'
    (`_matched_uniform`), instead of the coarser uniform gene.
    ``entries``: which of the two to train (two processes, one each, share 2 cores better than one runs
    both in turn). ``score_images``: which search's genes (`search`; the rows go under its tag).
    """
    if seed and init == "generated":
        raise ValueError(f"`seed` applies to the trainings from scratch or from the trained weights only. "
                         f"Received: seed={seed} with init={init!r}. Pass --init scratch or --init trained.")
    import keras

    import keras_autoprune as kap
    from benchmarks.profiles import PROFILES, learning_rate

    paths = _paths(model_name, variant)
    tag = _tag(metric, target, score_images=score_images)
    row = _load(paths["results"])["search"][tag]
    data = converged.load_cifar10()
    split = _split(data, score_images)
    profile = PROFILES["v2"]
    model, net = _network(model_name, paths, trained_weights=init == "generated")
    for base in ("searched", "uniform"):
        if base not in entries:
            continue
        entry = row_name(base, init, seed, epochs)
        slim = _architecture(model, net, row, base, init, metric, variant.channel_order)
        widths = layer_widths(slim)
        results = _load(paths["results"])
        done = _trained_row(results, tag, entry, widths, epochs, superseded=init != "generated",
                            other_searches=init == "scratch")
        if done is None and init == "scratch":
            done = _scratch_row_of_another_net(model_name, paths, entry, widths, epochs)
        if done is not None:
            if results.setdefault("finetune", {}).setdefault(tag, {}).get(entry) is not done:
                results["finetune"][tag][entry] = done
                _store(paths["results"], results)
                log(f"{tag} {entry}: reused a row trained at the same widths ({done['epochs']} epochs)")
            continue
        if init == "scratch":
            record = train_from_scratch(slim, split, data, epochs,
                                        paths["weights"].parent / f"scratch_{paths['run']}_{tag}_{entry}", seed, log)
            record["flops_kept"] = kap.count_flops(slim) / kap.count_flops(model)
        else:
            kap.recalibrate_batchnorm(slim, split["bn_x"], batch_size=BATCH_SIZE)
            before = converged.test_accuracy(slim, data)
            slim.compile(optimizer=keras.optimizers.SGD(profile.finetune_lr, momentum=0.9, nesterov=True,
                                                        weight_decay=converged.Recipe().weight_decay),
                         loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            start = time.perf_counter()
            for epoch in range(epochs):
                slim.optimizer.learning_rate = learning_rate(epoch, profile.finetune_lr, epochs, "cosine")
                x, y = _full_batches(*converged.augment(split["train_x"], split["train_y"], seed=3 + seed, epoch=epoch))
                slim.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=2)
            record = {"epochs": epochs, "test_before": before, "test_after": converged.test_accuracy(slim, data),
                      "flops_kept": kap.count_flops(slim) / kap.count_flops(model),
                      "seconds": time.perf_counter() - start}
        record["widths"] = widths
        results = _load(paths["results"])
        results.setdefault("finetune", {}).setdefault(tag, {})[entry] = record
        _store(paths["results"], results)
        log(f"{tag} {entry}: {record}")


def row_name(entry: str, init: str, seed: int = 0, epochs: int = SCRATCH_EPOCHS) -> str:
    """The results row of ``entry`` (``"searched"`` or ``"uniform"``) trained from ``init`` with ``seed``:
    ``searched``, ``uniform_from_trained_seed1``, ``searched_from_scratch``, ``uniform_from_scratch_80ep_seed1``
    (from scratch, epochs other than `SCRATCH_EPOCHS` are part of the name: a longer training is another row)."""
    start = {"generated": "", "trained": "_from_trained", "scratch": "_from_scratch"}[init]
    length = f"_{epochs}ep" if init == "scratch" and epochs != SCRATCH_EPOCHS else ""
    return f"{entry}{start}{length}" + (f"_seed{seed}" if seed else "")


def _architecture(model, net, row: dict, entry: str, init: str, metric: str, channel_order: str):
    """The slim model ``entry`` of a search ``row`` starts from: generated weights, the converged model cut to
    the gene, or (from scratch) the architecture; uniform widths matched to the searched FLOPs where they can be."""
    import keras_autoprune as kap

    if init != "generated" and entry == "uniform" and metric == "flops":
        return _matched_uniform(model, net, row["cost"], init, channel_order)
    gene = row["gene" if entry == "searched" else "uniform_gene"]
    return net.materialize(gene) if init != "trained" else kap.apply_plan(model, net.space.plan(gene))


EXPORT_FILE = "export.json"


def export_scratch(model_name: str, target: float, directory: str | pathlib.Path, metric: str = "flops",
                   variant: NetVariant = NetVariant(), score_images: int = SCORE_IMAGES, log=print) -> dict:
    """Writes a search's two architectures for `train_exported` on a machine without TensorFlow.

    ``<directory>/searched.keras`` and ``uniform.keras`` (the widths ``finetune --init scratch`` trains; their
    weights are re-initialised there) and ``export.json``: the model, the search tag, each one's widths and
    FLOPs kept. A JAX GPU machine can then train them (stage ``scratch``) and `collect_exported` files the
    records here.
    """
    import keras_autoprune as kap

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = _paths(model_name, variant)
    tag = _tag(metric, target, score_images=score_images)
    row = _load(paths["results"])["search"][tag]
    model, net = _network(model_name, paths, trained_weights=False)
    exported = {"model": model_name, "channel_order": variant.channel_order, "warm_start": variant.warm_start,
                "tag": tag, "score_images": score_images, "gene": row["gene"], "cost": row["cost"], "entries": {}}
    for entry in ("searched", "uniform"):
        slim = _architecture(model, net, row, entry, "scratch", metric, variant.channel_order)
        slim.save(directory / f"{entry}.keras")
        exported["entries"][entry] = {"widths": layer_widths(slim),
                                      "flops_kept": kap.count_flops(slim) / kap.count_flops(model)}
        log(f"{tag} {entry}: {exported['entries'][entry]['flops_kept']:.1%} of the FLOPs -> {directory / entry}.keras")
    (directory / EXPORT_FILE).write_text(json.dumps(exported, indent=1))
    return exported


def train_exported(directory: str | pathlib.Path, entry: str, epochs: int, seed: int = 0,
                   data_source: str | pathlib.Path = converged.DEFAULT_SOURCE, log=print) -> dict:
    """Trains ``<directory>/<entry>.keras`` (from `export_scratch`) from fresh weights, as ``finetune --init
    scratch`` does, checkpointing in ``directory``; writes the record to ``<directory>/<row name>.json``.

    Keras alone (any backend): no TensorFlow, no keras_autoprune.
    """
    import keras

    directory = pathlib.Path(directory)
    exported = json.loads((directory / EXPORT_FILE).read_text())
    data = converged.load_cifar10(data_source)
    architecture = keras.saving.load_model(directory / f"{entry}.keras", compile=False)
    name = row_name(entry, "scratch", seed, epochs)
    record = train_from_scratch(architecture, _split(data, exported["score_images"]), data, epochs,
                                directory / f"checkpoint_{name}", seed, log)
    record.update(exported["entries"][entry])
    (directory / f"{name}.json").write_text(json.dumps(record, indent=1))
    log(f"{exported['tag']} {name}: {record['test_after']:.4f} after {epochs} epochs ({record['seconds']:.0f} s)")
    return record


def collect_exported(directory: str | pathlib.Path, log=print) -> list[str]:
    """Files the records of `train_exported` in ``directory`` under their search's row; returns their names.

    Refuses an export whose search was run again since (another gene), and records not trained at the
    exported widths. The checkpoint state of a training still under way (``checkpoint_<row>.json``) is not a
    record and is left alone.
    """
    directory = pathlib.Path(directory)
    exported = json.loads((directory / EXPORT_FILE).read_text())
    paths = _paths(exported["model"], NetVariant(exported["channel_order"], exported.get("warm_start", True)))
    results = _load(paths["results"])
    current = results["search"][exported["tag"]]
    if (current["gene"], current["cost"]) != (exported["gene"], exported["cost"]):
        raise ValueError(f"Expected the search {exported['tag']!r} that {directory} was exported from. Received "
                         f"a search that found another gene since. Fix: export again and train again.")
    filed = []
    records = [(entry, path) for entry in exported["entries"]
               for path in sorted(directory.glob(f"{entry}_from_scratch*.json"))]
    for entry, path in records:
        record = json.loads(path.read_text())
        if record["widths"] != exported["entries"][entry]["widths"]:
            raise ValueError(f"Expected {path.name} to be trained at the exported widths of {entry!r}. Received "
                             f"other widths. Fix: export again and train again.")
        results.setdefault("finetune", {}).setdefault(exported["tag"], {})[path.stem] = record
        filed.append(path.stem)
        log(f"{exported['tag']} {path.stem}: {record['test_after']:.4f} ({record['epochs']} epochs, {record['machine']})")
    _store(paths["results"], results)
    return filed


def _matched_uniform(model, net, cost: float, init: str, channel_order: str):
    """The uniform widths with the largest FLOPs not above ``cost`` (to a channel, `red_bench.uniform_ratio`).

    ``init="scratch"``: the architecture (its weights are re-initialised); ``"trained"``: ``model`` cut to
    those widths keeping the channels the searched widths keep too: each group's first channels for the
    ``"index"`` order (`PrunePlan.uniform(importance="last")`), its largest L1 norms for ``"l1"``.
    """
    import keras_autoprune as kap

    ratio, architecture = red_bench.uniform_ratio(net.base, cost, net.graph)
    if init == "scratch":
        return architecture
    graph = kap.DependencyGraph(model)
    importance = {"index": "last", "l1": "l1"}[channel_order]
    return kap.apply_plan(model, kap.PrunePlan.uniform(graph, ratio, importance=importance), graph)


def _scratch_row_of_another_net(model_name: str, paths: dict, entry: str, widths: dict[str, int],
                                epochs: int) -> dict | None:
    """A from-scratch row of ``entry`` trained at ``widths`` in the results of another PruningNet of the same
    model (`NetVariant`, and the kept results of earlier nets), or None.

    A training from scratch depends on the widths, the epochs and the seed alone (the entry name), not on the
    net whose search chose the widths, so the uniform widths matched to the same FLOPs are not trained twice.
    """
    for other in sorted(RESULTS_DIR.glob(f"metapruning_{model_name}*.json")):
        if other != paths["results"]:
            done = _trained_row(_load(other), "", entry, widths, epochs)
            if done is not None:
                return done
    return None


def layer_widths(model) -> dict[str, int]:
    """``{layer name: output channels}`` of every convolution and dense layer: what a trained row was trained at."""
    return {layer.name: int(getattr(layer, "filters", None) or layer.units) for layer in model.layers
            if getattr(layer, "filters", None) or getattr(layer, "units", None)}


def _trained_row(results: dict, tag: str, entry: str, widths: dict[str, int], epochs: int,
                 superseded: bool = True, other_searches: bool = True) -> dict | None:
    """The row of ``entry`` already trained at ``widths`` for at least ``epochs``; else None.

    A row without widths, or with others (trained before the search was replaced), does not count.
    Besides the current rows of ``tag`` it looks at, where allowed:

    - ``superseded``: the rows of ``tag`` that an earlier search left behind. Not for rows that started
      from the generated weights of another PruningNet.
    - ``other_searches``: the rows of every other search (the same entry name means the same start and
      seed). Only for trainings from scratch, which depend on the widths alone: the trainings from the
      converged weights re-estimate BatchNormalization on their search's images first (`_split`).
    """
    sections = ("finetune", "finetune_superseded") if superseded else ("finetune",)
    places = [(section, tag) for section in sections]
    if other_searches:
        places += [(section, other) for section in sections
                   for other in sorted(results.get(section, {})) if other != tag]
    for section, where in places:
        done = results.get(section, {}).get(where, {}).get(entry)
        if done and done.get("widths") == widths and done["epochs"] >= epochs:
            return done
    return None


def checkpoint_files(checkpoint: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """``<checkpoint>.keras`` and ``<checkpoint>.json``, appended to the whole name: a tag such as
    ``flops_0.5`` holds a dot, and `pathlib.Path.with_suffix` would cut the name there (until session 12 every
    entry of a budget shared one checkpoint, ``scratch_resnet20_flops_0.keras``)."""
    return checkpoint.parent / f"{checkpoint.name}.keras", checkpoint.parent / f"{checkpoint.name}.json"


def train_from_scratch(architecture, split: dict, data: converged.Cifar10, epochs: int, checkpoint: pathlib.Path,
                       seed: int = 0, log=print) -> dict:
    """``architecture`` re-initialised (`keras.models.clone_model`, seeded) and trained ``epochs`` with `converged.Recipe`.

    Saves ``<checkpoint>.keras`` and ``<checkpoint>.json`` (epochs done, seconds) after every epoch and
    continues from them; removes them when done. Needs Keras alone (no TensorFlow, no keras_autoprune), so
    it also runs on a JAX GPU machine (stage ``scratch``); the caller adds ``flops_kept``.
    """
    import keras

    recipe = converged.Recipe(seed=seed)
    model_path, state_path = checkpoint_files(checkpoint)
    if model_path.exists() and state_path.exists():
        slim, state = keras.saving.load_model(model_path), json.loads(state_path.read_text())
        log(f"{checkpoint.name}: continuing after epoch {state['epoch']} of {epochs}")
    else:
        keras.utils.set_random_seed(recipe.seed)
        slim = keras.models.clone_model(architecture)  # the same layers, fresh weights from their initialisers
        converged.compile_with(slim, recipe)
        state = {"epoch": 0, "seconds": 0.0}
    while state["epoch"] < epochs:
        start = time.perf_counter()
        slim.optimizer.learning_rate = recipe.learning_rate(state["epoch"], epochs)
        x, y = _full_batches(*converged.augment(split["train_x"], split["train_y"], seed=3 + seed, epoch=state["epoch"]))
        logs = slim.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=0).history
        state["epoch"] += 1
        state["seconds"] += time.perf_counter() - start
        log(f"{checkpoint.name} epoch {state['epoch']}/{epochs}: loss {logs['loss'][0]:.4f} "
            f"accuracy {logs['accuracy'][0]:.4f} ({state['seconds']:.0f} s)")
        slim.save(model_path)
        state_path.write_text(json.dumps(state))
    record = {"epochs": epochs, "test_after": converged.test_accuracy(slim, data), "seconds": state["seconds"],
              "machine": converged.machine_description()}
    model_path.unlink(missing_ok=True)
    state_path.unlink(missing_ok=True)
    return record


def latency(model_name: str, target: float, variant: NetVariant = NetVariant(), calibrate: bool = False, log=print) -> None:
    """Builds the latency table (once), searches under a latency budget, checks the table on the candidates.

    ``calibrate``: search with a calibrated copy of the table (calibrated once, kept beside it).
    """
    import keras

    import keras_autoprune as kap
    from keras_autoprune import metapruning as mp

    paths = _paths(model_name, variant)
    model = keras.saving.load_model(converged.MODELS_DIR / f"{model_name}.keras")
    if not paths["table"].exists():
        start = time.perf_counter()
        mp.LatencyTable.build(model).save(paths["table"])
        log(f"latency table: {time.perf_counter() - start:.0f} s")
    if calibrate and not paths["calibrated_table"].exists():
        start = time.perf_counter()
        table = mp.LatencyTable.load(paths["table"]).calibrate(model)
        table.save(paths["calibrated_table"])
        log(f"latency table calibrated: k = {table.savings_scale:.3f}, T_full {table.full_ms:.4f} ms, "
            f"{time.perf_counter() - start:.0f} s")
    winner = search(model_name, target, metric="latency", variant=variant, calibrated=calibrate, log=log)["gene"]
    table = mp.LatencyTable.load(_table_path(paths, calibrate))
    tag = _tag("latency", target, calibrate)
    _, net = _network(model_name, paths)
    key = mp.fingerprint(net, RECALIBRATION_BATCHES, BATCH_SIZE, SCORE_IMAGES)
    cost = mp.cost_function(net, kap.Budget(latency=target), table)
    # The winner, then the best other candidates within the search's window under this table.
    scored = sorted(_load(pathlib.Path(str(paths["scores"]).format(tag=f"{tag}_{key}")))["scores"],
                    key=lambda r: -r["score"])
    others = [r["gene"] for r in scored if r["gene"] != winner and target - 0.05 <= cost(r["gene"]) <= target][:9]
    # The full model is measured in the same interleaved rounds: the winner's fraction is of that measurement.
    check = mp.check_latency(table, model, [kap.PrunePlan({})] + [net.space.plan(g) for g in [winner, *others]])
    full_measured = check.measured_ms[0]
    results = _load(paths["results"])
    results["search"][tag]["check"] = {
        "predicted_ms": check.predicted_ms, "measured_ms": check.measured_ms, "correlation": check.correlation,
        "mean_relative_error": check.mean_relative_error, "max_relative_error": check.max_relative_error,
        "winner_measured_fraction": check.measured_ms[1] / full_measured, "full_measured_ms": full_measured,
        "full_ms": table.full_ms, "savings_scale": table.savings_scale}
    _store(paths["results"], results)
    log(f"latency check (full model + {len(check.measured_ms) - 1} candidates): r={check.correlation:.3f}, "
        f"mean error {check.mean_relative_error:.1%}, winner at {check.measured_ms[1] / full_measured:.1%} of the "
        f"full model's measured latency (budget {target:.0%}; table k = {table.savings_scale:.3f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metapruning_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("train", "search", "finetune", "latency", "report", "export", "scratch",
                                          "collect"))
    parser.add_argument("--model", default="resnet20", choices=sorted(converged.ARCHITECTURES))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--channel-order", default="index", choices=("index", "l1"), help="`PruningNet(channel_order=...)`")
    parser.add_argument("--pruningnet-start", default="warm", choices=("warm", "scratch"),
                        help="the PruningNet's generators start at the converged weights (lr 0.01) or from a random "
                             "initialisation (lr 0.1, the paper's); results in metapruning_<model>_scratchnet.json")
    parser.add_argument("--calibrate", action="store_true", help="latency stage: search with a calibrated table")
    parser.add_argument("--score-images", type=int, default=SCORE_IMAGES, choices=(SCORE_IMAGES, HELD_OUT),
                        help="search and finetune: held-out images that score a candidate (5000: all, with "
                             "BatchNormalization re-estimated on training images; rows tagged _score5000)")
    parser.add_argument("--seed", type=int, default=0, help="finetune --init scratch|trained: seed of the augmentation (and of the fresh weights)")
    parser.add_argument("--entry", action="append", choices=("searched", "uniform"),
                        help="finetune stage: train only this one (repeatable; default both)")
    parser.add_argument("--init", default="generated", choices=("generated", "trained", "scratch"),
                        help="finetune stage: start from the generated weights, the converged model's channels, "
                             "or a fresh initialisation (trained with the converged recipe)")
    parser.add_argument("--dir", help="export, scratch, collect: the folder of the exported architectures and records")
    parser.add_argument("--data", default=str(converged.DEFAULT_SOURCE), help="scratch stage: the CIFAR-10 archive")
    args = parser.parse_args(argv)
    log = lambda line: print(line, flush=True)  # noqa: E731
    variant = NetVariant(args.channel_order, warm_start=args.pruningnet_start == "warm")
    if args.stage == "train":
        train(args.model, args.epochs, variant, log=log)
    elif args.stage == "search":
        search(args.model, args.target, variant=variant, score_images=args.score_images, log=log)
    elif args.stage == "finetune":
        finetune(args.model, args.target, args.epochs, variant=variant, score_images=args.score_images,
                 init=args.init, seed=args.seed,
                 entries=tuple(args.entry or ("searched", "uniform")), log=log)
    elif args.stage in ("export", "scratch", "collect") and not args.dir:
        parser.error(f"the {args.stage} stage needs --dir FOLDER (the exported architectures and their records)")
    elif args.stage == "export":
        export_scratch(args.model, args.target, args.dir, variant=variant, score_images=args.score_images, log=log)
    elif args.stage == "scratch":
        for entry in args.entry or ("searched", "uniform"):
            train_exported(args.dir, entry, args.epochs, seed=args.seed, data_source=args.data, log=log)
    elif args.stage == "collect":
        collect_exported(args.dir, log=log)
    elif args.stage == "latency":
        latency(args.model, args.target, variant, calibrate=args.calibrate, log=log)
    else:
        from benchmarks.report import update_docs

        paths = _paths(args.model, variant)
        page = pathlib.Path(__file__).resolve().parents[1] / "docs" / "methods" / "metapruning.md"
        update_docs(page, f"metapruning_{paths['run']}", markdown(_load(paths["results"])))
        for kept in sorted(RESULTS_DIR.glob(f"metapruning_{paths['run']}_*.json")):  # earlier nets' kept results
            if f"<!-- benchmarks:{kept.stem}:begin -->" in page.read_text():
                update_docs(page, kept.stem, markdown(_load(kept)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
