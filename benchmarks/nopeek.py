"""NoPeek on the shipped chest X-rays: test accuracy and dCor(x, cut) per alpha.

Trains the split demo CNN (`build_demo_cnn`, cut "pool2") on the balanced
PneumoniaMNIST subset with `compile(..., nopeek=NoPeek(alpha))` for each alpha
of the grid, from the same initial weights and batch order per seed, then
measures on the held-out test set:

- test accuracy (the server's evaluate);
- dCor(x, cut): `distance_correlation` between raw test images and the cut
  activations the client would send (inference mode), at a fixed batch size
  (`--dcor-batch`, default 256: dCor is a batch statistic), averaged over
  `--draws` random batches of the test set;
- the bias-corrected dCor^2 (Székely and Rizzo's U-statistic, whose mean is 0
  for independent samples at any batch size) on the same batches;
- on all the test images as one batch: dCor, and the square root of the
  bias-corrected dCor^2 (a dCor without the upward bias, to tell how much of
  what remains is the estimator's bias and how much is real dependence).

`--objective unbiased` trains with the bias-corrected dCor^2 in place of
NoPeek's sample dCor (the same alpha grid; a local class, not the library's
NoPeek), to see whether the biased training objective is what stops NoPeek.
`--cut` moves the cut (e.g. "dense", 64 values after the first dense layer).

The sample dCor is biased upwards, the more so the more dimensions: the
script prints the "noise floor", dCor of the test images with independent
Gaussian noise of the cut's size at the same batch size (what the bias alone
gives for features that say nothing about the images), and the table the
share of dCor above it that NoPeek removes. It is not a floor for learned
features: features that collapse onto fewer dimensions score below it (see
`--cut dense`), and the whole-test-set columns show how much of a value is
bias.

Each alpha is printed beside alpha=0. The issue's target: NoPeek cuts dCor(x,
cut) by at least 50 % for at most 2 points of accuracy.

    python benchmarks/nopeek.py [--alphas 0 0.5 1 2 5 10] [--epochs 10] [--seeds 0 1 2 3 4]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_split  # noqa: E402
from keras_split.apps.demo import DEFAULT_CUT, build_demo_cnn, demo_loss  # noqa: E402
from keras_split.privacy import NoPeek, distance_correlation  # noqa: E402
from keras_split.privacy.dcor import pairwise_distances  # noqa: E402


def _u_centre_ops(distances):
    n = ops.cast(ops.shape(distances)[0], distances.dtype)
    u = (distances - ops.sum(distances, 0, keepdims=True) / (n - 2)
         - ops.sum(distances, 1, keepdims=True) / (n - 2)
         + ops.sum(distances) / ((n - 1) * (n - 2)))
    return u * (1.0 - ops.eye(ops.shape(distances)[0], dtype=distances.dtype))


class UnbiasedNoPeek(NoPeek):
    """alpha * the bias-corrected dCor^2(x, z) as the client's term (for the experiment only)."""

    def __call__(self, inputs, activations):
        rows = [ops.reshape(ops.cast(t, "float32"), (ops.shape(t)[0], -1))
                for t in (inputs, keras.tree.flatten(activations)[0])]
        a, b = (_u_centre_ops(pairwise_distances(r)) for r in rows)
        value = ops.sum(a * b) / ops.sqrt(ops.sum(a * a) * ops.sum(b * b))
        return self.alpha * value, {"nopeek_dcor": ops.stop_gradient(value)}


def _u_centred(rows):
    rows = np.asarray(rows, np.float64).reshape(len(rows), -1)
    squares = (rows ** 2).sum(axis=1)
    d = np.sqrt(np.maximum(squares[:, None] + squares[None, :] - 2 * rows @ rows.T, 0))
    np.fill_diagonal(d, 0)
    n = len(d)
    u = (d - d.sum(axis=0)[None, :] / (n - 2) - d.sum(axis=1)[:, None] / (n - 2)
         + d.sum() / ((n - 1) * (n - 2)))
    np.fill_diagonal(u, 0)
    return u


def bias_corrected_dcor_squared(x, z) -> float:
    """Székely and Rizzo's (2014) bias-corrected dCor^2 (agrees with the `dcor`
    package's u_distance_correlation_sqr); about 0 for independent samples."""
    a, b = _u_centred(x), _u_centred(z)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def held_out_dcor(client, x, batch_size, draws, seed=0) -> tuple[float, float]:
    """Mean dCor(x, client(x)) and bias-corrected dCor^2 over `draws` random
    batches of `batch_size` (the same batches for every client)."""
    return held_out_dcor_of(lambda rows: np.asarray(client(x[rows], training=False)),
                            x, batch_size, draws, seed)


def held_out_dcor_of(features, x, batch_size, draws, seed=0) -> tuple[float, float]:
    """As `held_out_dcor`, for `features(rows)`: any per-image values of the rows."""
    rng = np.random.default_rng(seed)
    values, corrected = [], []
    for _ in range(draws):
        rows = rng.choice(len(x), size=min(batch_size, len(x)), replace=False)
        z = np.asarray(features(rows), np.float32).reshape(len(rows), -1)
        values.append(float(distance_correlation(x[rows], z)))
        corrected.append(bias_corrected_dcor_squared(x[rows], z))
    return float(np.mean(values)), float(np.mean(corrected))


def task_references(x, y, args) -> None:
    """dCor of the test images with what the task itself is made of, on the same batches.

    dCor has no data-processing inequality, so none of these is a bound on a cut's
    dCor; they say how much of the images' distance structure a single scalar or the
    label already carries, and so how far below them a useful cut can be pushed."""
    flat = x.reshape(len(x), -1).astype(np.float32)
    references = {
        "the label y (a perfect cut for the task)": lambda rows: y[rows],
        "mean brightness (1 value)": lambda rows: flat[rows].mean(axis=1),
        "mean and contrast (2 values)":
            lambda rows: np.stack([flat[rows].mean(axis=1), flat[rows].std(axis=1)], 1),
    }
    for name, features in references.items():
        dcor, corrected = held_out_dcor_of(features, x, args.dcor_batch, args.draws)
        print(f"reference: dCor(x, {name}) {dcor:.3f}, bias-corrected dCor^2 "
              f"{corrected:.3f}")


def noise_floor(x, features, batch_size, draws, seed=0) -> float:
    """Mean dCor of `x` with independent Gaussian noise of `features` per sample."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        rows = rng.choice(len(x), size=min(batch_size, len(x)), replace=False)
        noise = rng.normal(size=(len(rows), features)).astype("float32")
        values.append(float(distance_correlation(x[rows], noise)))
    return float(np.mean(values))


def run(alpha, seed, data, args):
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    split = keras_split.split(build_demo_cnn(), args.cut)
    split.compile(optimizer=keras.optimizers.Adam(args.learning_rate), loss=demo_loss(),
                  metrics=["accuracy"],
                  nopeek=(UnbiasedNoPeek if args.objective == "unbiased" else NoPeek)(alpha))
    start = time.perf_counter()
    history = split.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                        shuffle=True, seed=seed, verbose=0)
    seconds = time.perf_counter() - start
    _, accuracy = split.evaluate(x_test, y_test, batch_size=256, verbose=0)
    dcor, corrected = held_out_dcor(split.client, x_test, args.dcor_batch, args.draws)
    # What the server ends with: the model's own output and its predicted class.
    logits = np.asarray(split.predict(x_test, batch_size=256, verbose=0))
    output_dcor = held_out_dcor_of(lambda rows: logits[rows], x_test, args.dcor_batch,
                                   args.draws)[0]
    predicted_dcor = held_out_dcor_of(lambda rows: logits[rows].argmax(axis=1), x_test,
                                      args.dcor_batch, args.draws)[0]
    cut = np.asarray(split.client(x_test, training=False))
    whole = float(distance_correlation(x_test, cut))
    unbiased = max(bias_corrected_dcor_squared(x_test, cut), 0.0) ** 0.5
    return {"accuracy": float(accuracy), "dcor": dcor, "corrected": corrected,
            "whole": whole, "unbiased": unbiased,
            "seconds": seconds, "train_dcor": history.history["nopeek_dcor"][-1],
            "output_dcor": output_dcor, "predicted_dcor": predicted_dcor}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=float, nargs="+",
                        default=[0.0, 0.5, 1.0, 2.0, 5.0, 10.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--dcor-batch", type=int, default=256)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--cut", default=DEFAULT_CUT)
    parser.add_argument("--objective", choices=["plain", "unbiased"], default="plain",
                        help="train with NoPeek's dCor (plain) or the bias-corrected dCor^2")
    args = parser.parse_args()
    if 0.0 not in args.alphas:
        args.alphas = [0.0, *args.alphas]

    (x_train, y_train), _, (x_test, y_test) = keras_split.datasets.load_pneumoniamnist_balanced()
    data = ((x_train, y_train), (x_test, y_test))
    print(f"balanced PneumoniaMNIST subset: {len(x_train)} train / {len(x_test)} test; "
          f"cut {args.cut!r}, batch {args.batch_size}, {args.epochs} epochs, Adam "
          f"{args.learning_rate:g}, seeds {args.seeds}, objective {args.objective}")
    keras.utils.set_random_seed(0)
    untrained = keras_split.split(build_demo_cnn(), args.cut).client
    features = int(np.prod(untrained.outputs[0].shape[1:]))
    dcor, corrected = held_out_dcor(untrained, x_test, args.dcor_batch, args.draws)
    print(f"untrained client half: dCor(x, cut) {dcor:.3f}, bias-corrected dCor^2 "
          f"{corrected:.3f} (batches of {args.dcor_batch} test images)")
    floor = noise_floor(x_test, features, args.dcor_batch, args.draws)
    task_references(x_test, y_test, args)
    print(f"floor: dCor(x, independent noise of the cut's {features} values) {floor:.3f}; "
          f"of 1 value {noise_floor(x_test, 1, args.dcor_batch, args.draws):.3f}")

    results = {}
    for alpha in args.alphas:
        results[alpha] = [run(alpha, seed, data, args) for seed in args.seeds]
        for seed, r in zip(args.seeds, results[alpha], strict=True):
            print(f"  alpha {alpha:g} seed {seed}: accuracy {r['accuracy']:.4f}, "
                  f"dCor {r['dcor']:.3f} (train batches {r['train_dcor']:.3f}), "
                  f"bias-corrected dCor^2 {r['corrected']:.3f}; dCor(x, model output) "
                  f"{r['output_dcor']:.3f}, dCor(x, predicted class) "
                  f"{r['predicted_dcor']:.3f}; {r['seconds']:.0f} s", flush=True)

    def mean(alpha, key):
        return statistics.mean(r[key] for r in results[alpha])

    def spread(alpha, key):
        values = [r[key] for r in results[alpha]]
        return statistics.stdev(values) if len(values) > 1 else 0.0

    base_accuracy, base_dcor = mean(0.0, "accuracy"), mean(0.0, "dcor")
    base_corrected = mean(0.0, "corrected")
    print()
    print(f"{'alpha':>6} | {'test accuracy':>15} | {'vs alpha=0':>10} | "
          f"{'dCor(x, cut) @' + str(args.dcor_batch):>17} | {'vs alpha=0':>10} | "
          f"{'above floor':>11} | {'bias-corr. dCor^2':>17} | {'vs alpha=0':>10} | "
          f"dCor, all {len(x_test)} | vs alpha=0 | sqrt(bias-corr.), all | vs alpha=0 | target")
    for alpha in args.alphas:
        accuracy, dcor = mean(alpha, "accuracy"), mean(alpha, "dcor")
        corrected = mean(alpha, "corrected")
        drop = 100 * (accuracy - base_accuracy)
        cut_by = 100 * (1 - dcor / base_dcor)
        met = "" if alpha == 0 else ("met" if cut_by >= 50 and drop >= -2 else "not met")
        print(f"{alpha:>6g} | {accuracy:.4f} ± {spread(alpha, 'accuracy'):.4f} | "
              f"{drop:+7.2f} pt | {dcor:.3f} ± {spread(alpha, 'dcor'):.3f}     | "
              f"{-cut_by:+8.1f} % | "
              f"{-100 * (1 - (dcor - floor) / (base_dcor - floor)):+9.1f} % | "
              f"{corrected:.3f} ± {spread(alpha, 'corrected'):.3f}     | "
              f"{100 * (corrected / base_corrected - 1):+8.1f} % | "
              f"{mean(alpha, 'whole'):.3f} | "
              f"{100 * (mean(alpha, 'whole') / mean(0.0, 'whole') - 1):+6.1f} % | "
              f"{mean(alpha, 'unbiased'):.3f} | "
              f"{100 * (mean(alpha, 'unbiased') / mean(0.0, 'unbiased') - 1):+6.1f} % | {met}")
    print("(means ± standard deviations over the seeds; 'above floor': the change of dCor "
          "minus the noise floor; target: dCor down >= 50 % for <= 2 points of accuracy)")
    print()
    print("what the server ends with, on the same batches (target: dCor(x, cut) "
          f"<= {base_dcor / 2:.3f}):")
    for alpha in args.alphas:
        print(f"  alpha {alpha:g}: dCor(x, cut) {mean(alpha, 'dcor'):.3f}, dCor(x, model "
              f"output) {mean(alpha, 'output_dcor'):.3f} ± {spread(alpha, 'output_dcor'):.3f}, "
              f"dCor(x, predicted class) {mean(alpha, 'predicted_dcor'):.3f} ± "
              f"{spread(alpha, 'predicted_dcor'):.3f}")

if __name__ == "__main__":
    main()
