"""Training throughput: split `fit` vs unsplit `keras.Model.fit` on the demo CNN.

Same data (the shipped balanced PneumoniaMNIST subset), batch size, optimizer
and epochs for both. Each run builds fresh models, does one warm-up epoch
(tracing), then times `--epochs` epochs. Runs alternate between the two so
machine drift hits both alike. Prints medians and the ratio split/unsplit
(target: at least 0.95).

    python benchmarks/throughput.py [--runs 5] [--epochs 3] [--batch-size 64] [--cut pool2]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import keras_split  # noqa: E402
from keras_split.apps.demo import build_demo_cnn, demo_loss  # noqa: E402


def samples_per_second(train, x, y, batch_size, epochs):
    train(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)  # warm-up
    start = time.perf_counter()
    train(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return len(x) * epochs / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cut", default="pool2")
    args = parser.parse_args()

    (x, y), _, _ = keras_split.datasets.load_pneumoniamnist_balanced()
    split_rates, unsplit_rates = [], []
    for run in range(args.runs):
        keras.utils.set_random_seed(run)
        model = build_demo_cnn()
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=demo_loss(),
                      metrics=["accuracy"])
        unsplit_rates.append(samples_per_second(model.fit, x, y, args.batch_size, args.epochs))

        split = keras_split.split(build_demo_cnn(), args.cut)
        split.compile(optimizer=keras.optimizers.Adam(1e-3), loss=demo_loss(),
                      metrics=["accuracy"])
        split_rates.append(samples_per_second(split.fit, x, y, args.batch_size, args.epochs))
        print(f"run {run + 1}: unsplit {unsplit_rates[-1]:8.0f} samples/s, "
              f"split {split_rates[-1]:8.0f} samples/s")

    unsplit, split_ = statistics.median(unsplit_rates), statistics.median(split_rates)
    print(f"median unsplit model.fit: {unsplit:8.0f} samples/s")
    print(f"median split fit:         {split_:8.0f} samples/s")
    print(f"ratio split/unsplit:      {split_ / unsplit:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
