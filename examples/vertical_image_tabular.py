"""Two modalities held by two parties: a radiology department holds the chest
X-rays, a clinic holds tabular records of the same patients; the server holds
the diagnosis and merges the two branches.

The tabular records are SYNTHETIC (no public tabular data comes with these
images): four noisy measurements generated from the label (e.g. a fever-like
reading) and four pure-noise columns, so that the example shows the plumbing
of two modalities, not a clinical finding.

    python examples/vertical_image_tabular.py [--epochs 3]
"""

import argparse

import _quiet  # noqa: F401 - first: TensorFlow starts quietly
import keras
import numpy as np
from _common import LOSS, xray_data

import keras_split


def records(y, seed):
    rng = np.random.default_rng(seed)
    signal = y.reshape(-1, 1) * 1.5 + rng.normal(size=(len(y), 4))
    return np.concatenate([signal, rng.normal(size=(len(y), 4))], axis=1).astype("float32")


def build(seed=0):
    keras.utils.set_random_seed(seed)
    image = keras.Input((28, 28, 1), name="xray")
    table = keras.Input((8,), name="record")
    a = keras.layers.Rescaling(1 / 255)(image)
    a = keras.layers.MaxPooling2D()(keras.layers.Conv2D(8, 3, activation="relu")(a))
    a = keras.layers.Flatten(name="image_cut")(a)
    b = keras.layers.Dense(8, activation="relu", name="record_cut")(table)
    merged = keras.layers.Concatenate()([keras.layers.Dense(16, activation="relu")(a), b])
    return keras.Model([image, table], keras.layers.Dense(2)(merged))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    (x, y), (x_test, y_test) = xray_data()
    r, r_test = records(y, 0), records(y_test, 1)
    for name, parts in (("X-rays + records", None), ("X-rays only", "image")):
        model = build()
        split = keras_split.split_vertical(model, ["image_cut", "record_cut"])
        split.compile(keras.optimizers.Adam(1e-3), LOSS, metrics=["accuracy"])
        tables = (r, r_test) if parts is None else (np.zeros_like(r), np.zeros_like(r_test))
        split.fit([x, tables[0]], y, batch_size=64, epochs=args.epochs, seed=0, verbose=0)
        logs = split.evaluate([x_test, tables[1]], y_test, verbose=0, return_dict=True)
        print(f"{name:17}: test accuracy {logs['accuracy']:.4f}")


if __name__ == "__main__":
    main()
