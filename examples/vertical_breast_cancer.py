"""Vertically partitioned data: three hospitals hold different features of the
same patients (Wisconsin breast cancer: the mean, standard-error and worst
groups of 10 features each); the server merges their branches and holds the
diagnosis. Compared with the same model trained unsplit.

The data come with scikit-learn: pip install 'keras-split[examples]'.

    python examples/vertical_breast_cancer.py [--epochs 20]
"""

import argparse

import _quiet  # noqa: F401 - first: TensorFlow starts quietly
import keras
import numpy as np

import keras_split
from keras_split.configurations import sharding
from keras_split_wire.optional import require

GROUPS = {"mean": slice(0, 10), "error": slice(10, 20), "worst": slice(20, 30)}
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def build(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = [keras.Input((10,), name=name) for name in GROUPS]
    branches = [keras.layers.Dense(8, activation="relu", name=f"{t.name}_branch")(t)
                for t in inputs]
    merged = keras.layers.Concatenate(name="merge")(branches)
    hidden = keras.layers.Dense(8, activation="relu")(merged)
    return keras.Model(inputs, keras.layers.Dense(2)(hidden))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    try:
        datasets = require("sklearn.datasets", "This example (the Wisconsin breast-cancer data)",
                           "keras-split[examples]", package="scikit-learn")
    except ImportError as error:
        raise SystemExit(f"error: {error}") from None
    data = datasets.load_breast_cancer()
    order = np.random.default_rng(0).permutation(len(data.data))
    train, test = order[:450], order[450:]
    mean, std = data.data[train].mean(0), data.data[train].std(0)
    x = ((data.data - mean) / std).astype("float32")
    hospitals = sharding.split_columns(x, list(GROUPS.values()))
    vertical = keras_split.split_vertical(build(), [f"{g}_branch" for g in GROUPS])
    vertical.compile(keras.optimizers.Adam(1e-2), LOSS, metrics=["accuracy"])
    vertical.fit([h[train] for h in hospitals], data.target[train], batch_size=32,
                 epochs=args.epochs, seed=0, verbose=0)
    got = vertical.evaluate([h[test] for h in hospitals], data.target[test], verbose=0,
                            return_dict=True)
    unsplit = build()
    unsplit.compile(keras.optimizers.Adam(1e-2), LOSS, metrics=["accuracy"])
    unsplit.fit([h[train] for h in hospitals], data.target[train], batch_size=32,
                epochs=args.epochs, verbose=0)
    want = unsplit.evaluate([h[test] for h in hospitals], data.target[test], verbose=0)[1]
    print(f"3 hospitals x 10 features, {len(train)} training patients: vertical split test "
          f"accuracy {got['accuracy']:.4f}, unsplit {want:.4f}")


if __name__ == "__main__":
    main()
