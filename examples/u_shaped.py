"""U-shaped split learning: the hospital keeps the first layers, the last layer
and the labels; the server trains the middle. Labels never leave the hospital.

    python examples/u_shaped.py [--epochs 3]
"""

import argparse

import _quiet  # noqa: F401 - first: TensorFlow starts quietly
import keras
import numpy as np
from _common import LOSS, demo_model, unsplit_accuracy, xray_data

import keras_split


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    (x, y), (x_test, y_test) = xray_data()
    chain = keras_split.split_chain(demo_model(), cuts=["pool1", "dense"])
    chain.compile(keras.optimizers.Adam(1e-3), LOSS, metrics=["accuracy"], labels="client")
    history = chain.fit(x, y, batch_size=64, epochs=args.epochs, seed=0, verbose=0)
    got = chain.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]
    want = unsplit_accuracy(0, x, y, x_test, y_test, args.epochs)
    print(f"parties: {chain.parties}; {chain}")
    print(f"U-shaped test accuracy {got:.4f}, unsplit {want:.4f}")
    first = int(np.prod(chain.cut_specs[0][0].shape[1:])) * 4
    second = int(np.prod(chain.cut_specs[1][0].shape[1:])) * 4
    print(f"hospital -> server, bytes per sample in the last epoch: up "
          f"{history.history['bytes_up'][-1] / len(x):.0f}, down "
          f"{history.history['bytes_down'][-1] / len(x):.0f} (the {first}-byte activation "
          f"and its gradient: no label); server -> hospital: the {second}-byte activation of "
          "the second cut and its gradient")


if __name__ == "__main__":
    main()
