"""SplitFed: four hospitals train in parallel from the same client half each
round; client halves are averaged (FedAvg), and with SFLv1 the per-client server
copies too. Compared with centralized training on the same data.

    python examples/splitfed.py [--rounds 5] [--version 1|2] [--alpha A]
"""

import argparse

import _quiet  # noqa: F401 - first: TensorFlow starts quietly
import keras
from _common import LOSS, demo_model, unsplit_accuracy, xray_data

import keras_split
from keras_split.configurations import sharding
from keras_split.configurations.federation import SplitFed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--version", type=int, default=1, choices=[1, 2])
    parser.add_argument("--alpha", type=float, default=None,
                        help="Dirichlet label skew (non-IID); IID shards if omitted")
    args = parser.parse_args()
    (x, y), (x_test, y_test) = xray_data()
    shards = (sharding.shard_iid(x, y, 4, seed=0) if args.alpha is None
              else sharding.shard_dirichlet(x, y, 4, alpha=args.alpha, seed=0))
    split = keras_split.split(demo_model(), "pool2")
    fed = SplitFed(split.client, split.server, clients=4, version=args.version)
    fed.compile(keras.optimizers.Adam(1e-3), LOSS, metrics=["accuracy"])
    fed.fit(shards, rounds=args.rounds, batch_size=64, shuffle=True, seed=0)
    merged = split.merge()
    merged.compile(loss=LOSS, metrics=["accuracy"])
    got = merged.evaluate(x_test, y_test, verbose=0)[1]
    want = unsplit_accuracy(0, x, y, x_test, y_test, args.rounds)
    sizes = [len(s[0]) for s in shards]
    print(f"SFLv{args.version}, 4 clients {sizes}, {args.rounds} rounds: test accuracy "
          f"{got:.4f}; centralized, {args.rounds} epochs: {want:.4f}")


if __name__ == "__main__":
    main()
