"""Multi-hop split learning: client -> middle party -> server, each holding its
own layers; the middle forwards activations and returns gradients.

    python examples/multihop.py [--epochs 3]
"""

import argparse

import _quiet  # noqa: F401 - first: TensorFlow starts quietly
import keras
from _common import LOSS, demo_model, unsplit_accuracy, xray_data

import keras_split


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    (x, y), (x_test, y_test) = xray_data()
    chain = keras_split.split_chain(demo_model(), cuts=["pool1", "pool2"])
    chain.compile(keras.optimizers.Adam(1e-3), LOSS, metrics=["accuracy"])
    chain.fit(x, y, batch_size=64, epochs=args.epochs, seed=0, verbose=0)
    got = chain.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]
    want = unsplit_accuracy(0, x, y, x_test, y_test, args.epochs)
    print(f"parties: {chain.parties}; {chain}")
    print(f"multi-hop test accuracy {got:.4f}, unsplit {want:.4f}")


if __name__ == "__main__":
    main()
