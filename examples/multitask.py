"""Multi-task split learning: one hospital body, two server heads with their own
labels and losses: the diagnosis (classification) and an auxiliary regression
target. The hospital's body receives the sum of both heads' cut gradients.

The auxiliary target is derived from the image itself (its mean brightness),
standing in for a second label a second server might hold.

    python examples/multitask.py [--epochs 3]
"""

import argparse

import _quiet  # noqa: F401 - first: TensorFlow starts quietly
import keras
import numpy as np
from _common import LOSS, xray_data

import keras_split


def build(seed=0):
    keras.utils.set_random_seed(seed)
    image = keras.Input((28, 28, 1))
    x = keras.layers.Rescaling(1 / 255)(image)
    x = keras.layers.MaxPooling2D()(keras.layers.Conv2D(16, 3, activation="relu")(x))
    x = keras.layers.Flatten(name="body")(x)
    diagnosis = keras.layers.Dense(2, name="diagnosis")(keras.layers.Dense(32, "relu")(x))
    brightness = keras.layers.Dense(1, name="brightness")(keras.layers.Dense(8, "relu")(x))
    return keras.Model(image, {"diagnosis": diagnosis, "brightness": brightness})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    (x, y), (x_test, y_test) = xray_data()
    labels = {"diagnosis": y, "brightness": x.reshape(len(x), -1).mean(1, keepdims=True) / 255}
    split = keras_split.split_multitask(build(), "body")
    split.compile(keras.optimizers.Adam(1e-3), {"diagnosis": LOSS, "brightness": "mse"},
                  metrics={"diagnosis": ["accuracy"]})
    history = split.fit(x, labels, batch_size=64, epochs=args.epochs, seed=0, verbose=0)
    test = {"diagnosis": y_test,
            "brightness": x_test.reshape(len(x_test), -1).mean(1, keepdims=True) / 255}
    logs = split.evaluate(x_test, test, verbose=0, return_dict=True)
    print(f"heads {sorted(split.heads)}; last epoch loss {history.history['loss'][-1]:.4f}")
    print(f"test: diagnosis accuracy {logs['diagnosis_accuracy']:.4f}, brightness mse "
          f"{logs['brightness_loss']:.5f} (target variance "
          f"{np.var(test['brightness']):.5f})")


if __name__ == "__main__":
    main()
