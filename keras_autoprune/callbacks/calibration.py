"""The calibration data of a pruning callback, checked before training.

Every statistics-based callback (NAP, EigenDamage, PSAP) reads ``data`` once
per pruning round. Re-iterable sources (arrays, a `tf.data.Dataset`, a
`keras.utils.PyDataset`, a list of batches) are read afresh each round; a
one-shot iterator (a generator) can be read only once, so it is refused with
``rounds > 1`` (`check_readable`), and `CalibrationSource` reads its first
batch to check it against the model and puts it back in front.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import keras

from keras_autoprune.stats.calibration import CalibrationData, check_batch_count, check_count
from keras_autoprune.stats.loss import Likelihood, resolve_likelihood


def check_readable(data: Any, rounds: int, owner: str, passes_per_round: int = 1, once: str = "") -> None:
    """Raises if ``data`` is a one-shot iterator that would be read more than once (``rounds × passes_per_round > 1``).

    ``once``: the setting that reads the data once per round, offered in the fix (e.g. ``"scorer='kfac'"``).
    """
    if isinstance(data, Iterator) and rounds * passes_per_round > 1:
        per_round = "once per round" if passes_per_round == 1 else f"{passes_per_round} times per round"
        single = "rounds=1" if passes_per_round == 1 else f"{once} and rounds=1" if once else ""
        raise ValueError(
            f"{owner}: expected calibration data that can be read {per_round} (rounds={rounds}). Received: a "
            f"one-shot iterator ({type(data).__name__}), which the first pass would exhaust. Fix: pass arrays "
            "(x, y), a tf.data.Dataset, a keras.utils.PyDataset or a list of batches "
            f"(e.g. `list(itertools.islice(generator, 8))`){', or use ' + single if single else ''}."
        )


def check_counts(num_batches: Any, batch_size: Any) -> None:
    """Raises ValueError unless ``num_batches`` is None or an int >= 1 and ``batch_size`` an int >= 1 (in ``__init__``)."""
    if num_batches is not None:
        check_count("num_batches", num_batches)
    check_count("batch_size", batch_size)


class CalibrationSource:
    """``data`` checked against ``model``, with its first batch.

    Args:
        data: the callback's ``data`` argument.
        model: the model being pruned.
        batch_size: batch size for in-memory arrays.
        require_labels: whether batches must carry labels (empirical Fisher).
        owner: the callback's name, for error messages.
        likelihood: the model's `Likelihood` (from `resolve_fisher`): labels
            are checked against its outputs and losses.
        num_batches: the batches each statistics pass will read (None: all
            of ``data``, which must then be finite); checked here, before
            training, not at the first round.

    Attributes:
        data: what the statistics should read (for a one-shot iterator: its
            first batch chained back in front of the rest).
        first: the first batch (`CalibrationBatch`).

    Raises:
        ValueError, TypeError: data that does not fit the model (the message
            names the callback and the model), or an exhausted iterator.
    """

    def __init__(
        self, data: Any, model: keras.Model, *, batch_size: int, require_labels: bool, owner: str,
        likelihood: Likelihood | None = None, num_batches: int | None = None,
    ):
        try:  # checked now, before training, not at the first round
            check_batch_count(data, num_batches)
        except ValueError as error:
            raise ValueError(f"{owner}: {error}") from error
        self.data = data
        checked = data
        if isinstance(data, Iterator):  # read the first batch once and put it back
            first = next(data, None)
            if first is None:
                raise ValueError(
                    f"{owner}: expected calibration batches in `data`. Received: an exhausted "
                    f"{type(data).__name__} (a one-shot iterator is read once, e.g. by an earlier fit). Fix: give the "
                    "callback a new generator before each fit, or a re-iterable source (arrays, a tf.data.Dataset, "
                    "a list of batches)."
                )
            self.data = itertools.chain([first], data)
            checked = iter([first])
        try:
            self.first = next(iter(CalibrationData(
                checked, model, batch_size=batch_size, num_batches=1, require_labels=require_labels,
                likelihood=likelihood if require_labels else None,
                labels_reason=likelihood.labels_reason() if likelihood is not None else None,
            )))
        except (TypeError, ValueError) as error:
            raise type(error)(f"{owner} `data` does not fit model '{model.name}': {error}") from error

    @property
    def sample_inputs(self):
        """The first batch's inputs, as the model takes them (one array, or a list for several inputs)."""
        return self.first.x if len(self.first.x) > 1 else self.first.x[0]


def resolve_fisher(model: keras.Model, requested: str, owner: str, verbose: int) -> tuple[Likelihood, str]:
    """The model's `Likelihood` and the Fisher its statistics will use; says which in one line when verbose.

    ``requested`` (``"true"`` or ``"empirical"``) is kept unless a loss
    defines no distribution to sample: then the empirical Fisher is used.

    Raises:
        ValueError: no loss, or a loss that does not fit the model's outputs
            (the message names the callback).
    """
    try:
        likelihood = resolve_likelihood(model)
        likelihood.check_model(model)
    except ValueError as error:
        raise ValueError(f"{owner}: {error}") from error
    fisher = likelihood.fisher(requested)
    if verbose:
        print(f"{owner}: {likelihood.describe(fisher)}.")
    return likelihood, fisher


def fisher_facts(likelihood: Likelihood, fisher: str) -> dict:
    """The report's ``extra`` entries that say which Fisher the statistics used."""
    return {"fisher": fisher, "likelihood": likelihood.describe(fisher)}
