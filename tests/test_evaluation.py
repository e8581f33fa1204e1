"""`keras_autoprune.evaluation`: top-1 accuracy of multi-class and binary classifiers."""

import keras
import numpy as np
import pytest

from keras_autoprune.evaluation import accuracy, output_activation

L = keras.layers


def _classifier(units: int, last: keras.layers.Layer | None = None, activation: str | None = None) -> keras.Model:
    inputs = keras.Input((3,))
    x = L.Dense(units, activation=activation, kernel_initializer="ones", bias_initializer="zeros")(inputs)
    return keras.Model(inputs, last(x) if last is not None else x)


def test_output_activation_reads_the_last_layer():
    assert output_activation(_classifier(3)) is None
    assert output_activation(_classifier(3, activation="softmax")) == "softmax"
    assert output_activation(_classifier(3, last=L.Softmax())) == "softmax"
    assert output_activation(_classifier(3, last=L.Activation("softmax"))) == "softmax"
    assert output_activation(_classifier(1, activation="sigmoid")) == "sigmoid"


def test_output_activation_follows_ops_and_nested_models():
    inputs = keras.Input((3,))
    logits = L.Dense(1, name="d")(inputs)
    by_op = keras.Model(inputs, keras.ops.sigmoid(logits))
    assert output_activation(by_op) == "sigmoid"
    assert output_activation(keras.Model(inputs, keras.ops.softmax(L.Dense(3)(inputs)))) == "softmax"
    outer = keras.Input((3,))
    nested = keras.Model(outer, _classifier(1, activation="sigmoid")(outer))
    assert output_activation(nested) == "sigmoid"
    x = np.array([[1, 1, 1], [-1, -1, -1]], "float32")
    by_op.get_layer("d").set_weights([np.ones((3, 1), "float32"), np.zeros(1, "float32")])
    assert accuracy(by_op, (x, np.array([1, 0]))) == 1.0  # before: probabilities thresholded at 0, 0.5


@pytest.mark.parametrize("activation", [None, "sigmoid"])
def test_a_single_unit_classifier_is_thresholded_not_arg_maxed(activation):
    model = _classifier(1, activation=activation)  # output: sum of the inputs (through a sigmoid or not)
    x = np.array([[1, 1, 1], [-1, -1, -1], [2, 0, 0], [-2, 0, 1]], "float32")  # sums 3, -3, 2, -1
    y = np.array([1, 0, 1, 0])
    assert accuracy(model, (x, y), batch_size=2) == 1.0  # the arg-max of one unit, always class 0, would give 0.5
    assert accuracy(model, (x, np.array([1, 1, 0, 0])), batch_size=2) == 0.5


def test_multi_class_accuracy_takes_the_arg_max_with_integer_or_one_hot_labels():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, L.Softmax()(inputs))  # the prediction is the larger input
    x = np.array([[0, 1], [1, 0], [2, 3]], "float32")
    assert accuracy(model, (x, np.array([1, 0, 0]))) == pytest.approx(2 / 3)
    assert accuracy(model, (x, np.eye(2)[[1, 0, 0]])) == pytest.approx(2 / 3)


def test_accuracy_weighs_the_examples_by_their_sample_weights():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, L.Softmax()(inputs))
    x = np.array([[0, 1], [1, 0], [2, 3]], "float32")  # predicted 1, 0, 1
    y = np.array([1, 0, 0])  # the third is wrong
    weights = np.array([1.0, 0.0, 3.0])
    assert accuracy(model, (x, y, weights), batch_size=2) == pytest.approx(1 / 4)
    assert accuracy(model, (x, y, np.ones(3))) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="sum"):
        accuracy(model, (x, y, np.zeros(3)))
