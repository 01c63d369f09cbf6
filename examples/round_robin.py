"""Round-robin split learning: four hospitals, each with its own share of the
X-rays, train in turn against one server; the client half is handed from one
hospital to the next.

    python examples/round_robin.py [--rounds 3] [--handoff peer|server]
"""

import argparse

import _quiet  # noqa: F401 - first: TensorFlow starts quietly
import keras
from _common import LOSS, demo_model, unsplit_accuracy, xray_data

import keras_split
from keras_split.configurations import sharding
from keras_split.configurations.federation import RoundRobin


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--handoff", default="peer", choices=["peer", "server"])
    args = parser.parse_args()
    (x, y), (x_test, y_test) = xray_data()
    shards = sharding.shard_iid(x, y, 4, seed=0)
    split = keras_split.split(demo_model(), "pool2")
    rr = RoundRobin(split.client, split.server, clients=4, handoff=args.handoff)
    rr.compile(keras.optimizers.Adam(1e-3), LOSS, metrics=["accuracy"])
    for record in rr.fit(shards, rounds=args.rounds, batch_size=64):
        print(f"round {record['round']}: loss by client "
              + ", ".join(f"{k}: {v:.3f}" for k, v in record["loss"].items()))
    merged = split.merge()
    merged.compile(loss=LOSS, metrics=["accuracy"])
    got = merged.evaluate(x_test, y_test, verbose=0)[1]
    want = unsplit_accuracy(0, x, y, x_test, y_test, args.rounds)
    print(f"round-robin ({args.handoff} hand-off; client weights seen by "
          f"{sorted(rr.weights_seen_by)}) test accuracy {got:.4f}, centralized {want:.4f}")


if __name__ == "__main__":
    main()
