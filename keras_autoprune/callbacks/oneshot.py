"""`OneShotMixin`: a pruning callback's lifecycle run once on a trained model, without training.

``cb.prune(model)`` is post-training pruning: the same checks, rounds,
rebuild and report as ``fit`` with the callback, on a copy of the model,
with the rounds back to back (`keras_autoprune.callbacks.base` holds the
lifecycle it drives).
"""

from __future__ import annotations

from typing import Any

import keras

from keras_autoprune.batchnorm import recalibrate_batchnorm
from keras_autoprune.callbacks.calibration import CalibrationSource, check_readable
from keras_autoprune.surgery.clone import clone_layers, copy_layer


class OneShotMixin:
    """The ``prune`` method of `PruningCallback`.

    Reads ``rounds``, ``_epochs`` (the scheduled rounds), ``_store`` and
    ``pruned_model``, and drives the lifecycle methods ``on_train_begin``,
    ``on_epoch_begin``, ``on_epoch_end`` and ``on_train_end``.
    """

    def prune(self, model: keras.Model, batchnorm_data: Any = None) -> keras.Model:
        """One-shot pruning of a trained model, without training; returns the slim model.

        Runs the callback's lifecycle on a copy of ``model`` (the user's model
        is not changed): the checks of ``on_train_begin``, the callback's
        rounds back to back with no training in between (statistics from the
        callback's calibration data where the method reads data, collected
        again on the masked model before each round: with ``rounds=k`` each
        round removes a ``1/k`` share of the reduction, seeing the channels
        already removed), then the slim model, its check against the masked
        copy and the report, exactly as at the end of ``fit``. In NAP's
        tolerance mode each round is judged right after it (in ``fit``, after
        its epoch): one that costs more than ``max_accuracy_drop`` is undone
        and pruning stops. Afterwards
        ``plan``, ``pruned_model``, ``report``, ``history`` and
        ``pruning_seconds`` are set as after ``fit``. The copy is compiled
        with ``model``'s loss (and loss weights) when ``model`` has one (the
        curvature methods read it).

        Re-estimating the BatchNormalization statistics of the result on
        training images (`kap.recalibrate_batchnorm`) usually recovers much of
        the accuracy one-shot pruning loses.

        Args:
            model: the trained model (not changed).
            batchnorm_data: with ``rounds > 1``, training images (any form
                `kap.recalibrate_batchnorm` takes) on which the masked copy's
                BatchNormalization statistics are re-estimated before every
                round after the first, as training would update them between
                the rounds of ``fit``: later rounds then measure the network
                that the earlier ones left, not one with stale statistics
                (measured in docs/methods/nap.md, "Rounds without training").
                None (default): not re-estimated. The result keeps the
                statistics of the last re-estimation.

        Raises:
            ValueError: what ``fit`` would raise; ``batchnorm_data`` with
                ``rounds=1``, whose first batch does not fit ``model``, or a
                one-shot iterator that more than one re-estimation would need
                to read again (all before the first round).
        """
        if batchnorm_data is not None:
            if self.rounds < 2:
                raise ValueError(
                    "`batchnorm_data` is used between rounds, and this callback has rounds=1. "
                    f"Received: rounds={self.rounds}. Fix: a callback with rounds > 1, or re-estimate the result "
                    "with kap.recalibrate_batchnorm(slim, data)."
                )
            owner = f"{type(self).__name__}.prune(batchnorm_data=...)"
            check_readable(batchnorm_data, self.rounds - 1, owner)
            # Its first batch is checked against the model now, before any round (a one-shot iterator gets it back).
            batchnorm_data = CalibrationSource(batchnorm_data, model, batch_size=128, require_labels=False, owner=owner).data
        copy = clone_layers(model, copy_layer)  # surgery's copy: custom layers are copied, not rebuilt from config
        self.set_params({})  # not a fit: no epoch count to check against the rounds
        if getattr(model, "loss", None) is not None:
            config = getattr(getattr(model, "_compile_config", None), "config", None) or {}
            copy.compile(loss=model.loss, loss_weights=config.get("loss_weights"))
        self.set_model(copy)
        store, self._store = self._store, None  # one-shot: no fit's state is resumed (nor written)
        try:
            self.on_train_begin()
            try:
                for index, epoch in enumerate(sorted(self._epochs)):
                    if index and batchnorm_data is not None:
                        recalibrate_batchnorm(copy, batchnorm_data)
                    self.on_epoch_begin(epoch)
                    self.on_epoch_end(epoch)  # where fit ends the round's epoch: NAP's tolerance mode judges it
            finally:
                self.on_train_end()
        finally:
            self._store = store
        return self.pruned_model
