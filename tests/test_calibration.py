"""Calibration data and losses: every accepted form gives the same statistics."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_autoprune.stats import SUPPORTED_LOSSES, collect_kfac, resolve_likelihood

L = keras.layers
N, CLASSES = 12, 3


def build(head_activation=None, split_softmax=False, units=CLASSES, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 4, 2), name="image")
    h = L.Conv2D(3, 3, activation="relu", name="conv")(inputs)
    h = L.Flatten()(h)
    outputs = L.Dense(units, activation=None if split_softmax else head_activation, name="head")(h)
    if split_softmax:
        outputs = L.Activation(head_activation)(outputs)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 4, 4, 2)).astype("float32"), rng.integers(0, CLASSES, N)


@pytest.fixture(scope="module")
def logits_model():
    model = build()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.fixture(scope="module")
def reference(logits_model, data):
    return collect_kfac(logits_model, data, fisher="empirical", batch_size=4, verbose=0)


def assert_same(got, want, tolerance=1e-12):
    """Equal factors, to ``tolerance`` relative to the largest entry (float32 models:
    a different batch composition changes the forward pass by rounding)."""
    assert list(got) == list(want)
    for name in want:
        for key in ("A", "G"):
            expected = getattr(want[name], key)
            np.testing.assert_allclose(getattr(got[name], key), expected, rtol=0, atol=tolerance * np.abs(expected).max())


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return self.x[4 * i : 4 * i + 4], self.y[4 * i : 4 * i + 4]


def test_dataset_numpy_generator_and_pydataset_give_identical_factors(logits_model, data, reference):
    x, y = data
    sources = {
        "dataset": tf.data.Dataset.from_tensor_slices((x, y)).batch(4),
        "generator": ((x[i : i + 4], y[i : i + 4]) for i in range(0, N, 4)),
        "dict inputs": iter([({"image": x[i : i + 4]}, y[i : i + 4]) for i in range(0, N, 4)]),
        "pydataset": Batches(x, y),
    }
    for name, source in sources.items():
        got = collect_kfac(logits_model, source, fisher="empirical", verbose=0)
        assert got.num_batches == 3 and got.num_examples == N, name
        assert_same(got, reference)


def test_num_batches_and_progress_bar(logits_model, data, reference, capsys):
    x, y = data
    part = collect_kfac(logits_model, data, fisher="empirical", batch_size=4, num_batches=2, verbose=1)
    assert part.num_batches == 2 and part.num_examples == 8 and part.seconds > 0
    assert "2/2" in capsys.readouterr().out
    assert_same(part, collect_kfac(logits_model, (x[:8], y[:8]), fisher="empirical", verbose=0), 1e-6)
    repeated = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).repeat()
    assert collect_kfac(logits_model, repeated, fisher="empirical", num_batches=5, verbose=0).num_examples == 20


def test_label_forms_and_loss_spellings_give_identical_factors(logits_model, data, reference):
    x, y = data
    one_hot = np.eye(CLASSES)[y]
    for labels in (y[:, None], one_hot, y.astype("float32")):
        assert_same(collect_kfac(logits_model, (x, labels), fisher="empirical", batch_size=4, verbose=0), reference)
    probs = build(head_activation="softmax")
    probs.compile(loss="categorical_crossentropy")
    assert resolve_likelihood(probs).from_logits is False
    assert_same(collect_kfac(probs, (x, one_hot), fisher="empirical", batch_size=4, verbose=0), reference)
    split = build(head_activation="softmax", split_softmax=True)
    loss = keras.losses.SparseCategoricalCrossentropy()
    assert_same(collect_kfac(split, (x, y), fisher="empirical", loss=loss, batch_size=4, verbose=0), reference)
    # A softmax hidden from the graph: log-probabilities from clipped probabilities.
    hidden = keras.Model(logits_model.inputs, L.Lambda(lambda t: keras.ops.softmax(t))(logits_model.output))
    got = collect_kfac(hidden, (x, y), fisher="empirical", loss=keras.losses.sparse_categorical_crossentropy, verbose=0)
    assert_same(got, reference, 1e-5)


def test_binary_single_unit_output():
    model = build(head_activation="sigmoid", units=1)
    model.compile(loss="binary_crossentropy")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 4, 4, 2)).astype("float32"), rng.integers(0, 2, 6)
    factors = collect_kfac(model, (x, y), fisher="empirical", verbose=0)
    p = model.predict(x, verbose=0)[:, 0].astype(np.float64)
    np.testing.assert_allclose(factors["head"].G, [[np.mean((p - y) ** 2)]], rtol=1e-5)
    assert factors["head"].G.shape == (1, 1)


def counting(batches, seen):
    for batch in batches:
        seen.append(1)
        yield batch


@pytest.mark.parametrize(
    "loss, match",
    [
        ("nonsense", "Expected a loss Keras knows"),
        ({"a": "mse", "b": "mse"}, r"keys among the output names \['head'\]"),
        (["mse", "mae"], "one `loss` entry per output"),
    ],
)
def test_bad_losses_fail_before_any_batch(logits_model, data, loss, match):
    seen = []
    with pytest.raises(ValueError, match=match):
        collect_kfac(logits_model, counting([data], seen), loss=loss, verbose=0)
    assert seen == []


def test_model_checks():
    plain = build()
    with pytest.raises(ValueError, match="compile the model, or pass `loss=`") as info:
        collect_kfac(plain, np.zeros((2, 4, 4, 2)), verbose=0)
    assert SUPPORTED_LOSSES in str(info.value)
    one = build(units=1)
    with pytest.raises(ValueError, match=r"class axis .* Received: output shape \(None, 1\)"):
        collect_kfac(one, np.zeros((2, 4, 4, 2)), loss="categorical_crossentropy", verbose=0)


def test_bad_arguments_and_layers(logits_model, data):
    x, y = data
    with pytest.raises(ValueError, match="fisher='fake'"):
        collect_kfac(logits_model, data, fisher="fake", verbose=0)
    with pytest.raises(ValueError, match="num_batches=0"):
        collect_kfac(logits_model, data, num_batches=0, verbose=0)
    with pytest.raises(ValueError, match="Valid names: .*'conv'"):
        collect_kfac(logits_model, data, layers=["nope"], verbose=0)
    with pytest.raises(ValueError, match="layer 'flatten.*' with Flatten"):
        collect_kfac(logits_model, data, layers=[logits_model.layers[2].name], verbose=0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, y: x, "empirical Fisher uses the real labels"),
        (lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)), "batch the data"),
        (lambda x, y: (x[:, :3], y), r"Expected inputs of shape \(None, 4, 4, 2\)"),
        (lambda x, y: [x, y], "labels as the second item of a tuple"),
        (lambda x, y: (x, y[:5]), "same number of examples"),
        (lambda x, y: (x, y + 3), r"integer class labels in \[0, 3\)"),
        (lambda x, y: (x, np.ones((N, CLASSES))), "rows that sum to 1"),
        (lambda x, y: (x, np.zeros((N, 2, 2))), r"labels of shape \(batch,\)"),
        (lambda x, y: (x, y, -np.ones(N)), "non-negative sample weight"),
        (lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(4).repeat(), "infinite"),
        (lambda x, y: "images/", "Received: data of type str"),
        (lambda x, y: iter([]), "at least one calibration batch"),
    ],
)
def test_bad_data_fails_clearly_before_work(logits_model, data, make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        collect_kfac(logits_model, make(*data), fisher="empirical", verbose=0)


def test_true_fisher_accepts_inputs_without_labels(logits_model, data):
    x, _ = data
    first = collect_kfac(logits_model, tf.data.Dataset.from_tensor_slices(x).batch(5), verbose=0)
    # float64 products: weighting by 2 is then exact (sqrt(2) rounds in float32 products)
    second = collect_kfac(logits_model, x, batch_size=3, precision="float64", verbose=0)
    weighted = collect_kfac(logits_model, (x, None, np.full(N, 2.0)), batch_size=3, precision="float64", verbose=0)
    assert first.num_examples == N and first.fisher == "true" and weighted.num_examples == 2 * N
    assert_same(first, second, 1e-6)
    assert_same(weighted, second, 1e-12)


def test_labels_outside_the_models_classes_are_refused():
    from keras_autoprune.stats.calibration import CalibrationData

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    x = np.zeros((8, 4), "float32")
    assert next(iter(CalibrationData((x, np.arange(8) % 3), model))).y.max() == 2
    with pytest.raises(ValueError, match=r"labels in \[0, 3\).*from 0 to 7 in batch 0"):
        CalibrationData((x, np.arange(8)), model)
    with pytest.raises(ValueError, match="labels from -1 to"):
        CalibrationData((x, -np.ones(8, "int64")), model)
    with pytest.raises(ValueError, match="one-hot labels with 3 columns"):
        CalibrationData((x, np.eye(4, dtype="float32")[np.arange(8) % 4]), model)
    assert CalibrationData((x, np.arange(8) % 4), model, require_labels=False)  # labels unused: not checked


def test_progress_bar_prints_plain_lines_when_not_a_terminal(capsys):
    from keras_autoprune.stats.calibration import progress_bar

    bar = progress_bar(3, verbose=1)  # pytest captures stdout: not a terminal
    for step in range(3):
        bar.update(step + 1)
    assert bar.verbose == 2
    printed = capsys.readouterr().out
    assert "3/3" in printed and "\r" not in printed and "\x1b" not in printed
    assert progress_bar(3, verbose=0).verbose == 0


def test_inputs_of_the_wrong_kind_are_refused():
    from keras_autoprune.stats.calibration import CalibrationData

    ids = keras.Input((5,), dtype="int32", name="token_ids")
    model = keras.Model(ids, keras.layers.Dense(3)(keras.layers.Flatten()(keras.layers.Embedding(10, 4)(ids))))
    good = np.arange(20).reshape(4, 5) % 10
    assert next(iter(CalibrationData((good, np.zeros(4, "int64")), model))).x[0].shape == (4, 5)
    assert CalibrationData((good.astype("float32"), np.zeros(4, "int64")), model)  # whole numbers as floats: fine
    with pytest.raises(ValueError, match="whole numbers for the integer input 'token_ids'"):
        CalibrationData((good + 0.5, np.zeros(4, "int64")), model)
    with pytest.raises(TypeError, match="numeric inputs"):
        CalibrationData((np.full((4, 5), "a"), np.zeros(4, "int64")), model)
