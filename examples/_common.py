"""Shared by the examples: the shipped chest X-rays and a small CNN."""

import _quiet  # noqa: F401 - first: TensorFlow starts quietly
import keras

import keras_split
from keras_split.apps.demo import build_demo_cnn, demo_loss

LOSS = demo_loss()


def xray_data():
    """(x, y) train and test of the shipped balanced PneumoniaMNIST subset."""
    (x, y), _, (x_test, y_test) = keras_split.datasets.load_pneumoniamnist_balanced()
    return (x, y), (x_test, y_test)


def demo_model(seed=0):
    keras.utils.set_random_seed(seed)
    return build_demo_cnn()


def unsplit_accuracy(seed, x, y, x_test, y_test, epochs, batch_size=64):
    model = demo_model(seed)
    model.compile(keras.optimizers.Adam(1e-3), LOSS, metrics=["accuracy"])
    # The shipped training set is ordered by class: always shuffle.
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0)
    return model.evaluate(x_test, y_test, verbose=0)[1]
