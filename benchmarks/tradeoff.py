"""The accuracy-leakage trade-off on the chest X-rays: NoPeek and cut noise side by side.

For each defence setting (NoPeek alpha, or `CutNoise` clip + Gaussian sigma),
train the split demo CNN (cut "pool2", Adam 1e-3, batch 64) on the balanced
PneumoniaMNIST subset, then measure on the 468 test images:

- test accuracy;
- dCor(x, cut) at batch 256, the mean over 8 random test batches (as in
  benchmarks/nopeek.py);
- model inversion: an inverse network trained on the 2,428 training images
  with their activations reconstructs the test images (`model_inversion`);
  SSIM (higher leaks more), beside the mean training image's SSIM.

Prints one Markdown table (means over `--seeds`) and, with `--figure`, draws
accuracy against dCor and against inversion SSIM, one curve per defence.

    python benchmarks/tradeoff.py [--seeds 0 1] [--epochs 10] [--figure tradeoff.png]
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from nopeek import held_out_dcor  # noqa: E402

import keras_split  # noqa: E402
from keras_split.apps.demo import DEFAULT_CUT, build_demo_cnn, demo_loss  # noqa: E402
from keras_split.privacy import NoPeek, add_cut_noise, model_inversion  # noqa: E402


def run(kind, value, seed, data, args):
    (x, y), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    split = keras_split.split(build_demo_cnn(), DEFAULT_CUT)
    nopeek = None
    if kind == "NoPeek":
        nopeek = NoPeek(value)
    elif value > 0:
        client = add_cut_noise(split.client, clip_norm=args.clip, scale=value, seed=seed)
        split = keras_split.SplitModel(client=client, server=split.server)
    split.compile(optimizer=keras.optimizers.Adam(1e-3), loss=demo_loss(), metrics=["accuracy"],
                  nopeek=nopeek)
    split.fit(x, y, batch_size=64, epochs=args.epochs, seed=seed, verbose=0)
    _, accuracy = split.evaluate(x_test, y_test, batch_size=256, verbose=0)
    # A noisy client's cut is what the server sees: noise included (inference mode
    # keeps CutNoise's noise on, as the defence requires).
    dcor, _ = held_out_dcor(split.client, x_test, 256, 8)
    inversion = model_inversion(split.client, x, x_test, epochs=args.inversion_epochs)
    return {"accuracy": float(accuracy), "dcor": dcor, "ssim": inversion.ssim,
            "mse": inversion.mse, "baseline_ssim": inversion.baseline_ssim}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 5.0])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.2, 0.4, 0.8])
    parser.add_argument("--clip", type=float, default=10.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--inversion-epochs", type=int, default=20)
    parser.add_argument("--figure", default=None)
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")
    start = time.perf_counter()
    (x, y), _, (x_test, y_test) = keras_split.datasets.load_pneumoniamnist_balanced()
    data = ((x, y.reshape(-1)), (x_test, y_test.reshape(-1)))
    settings = [("NoPeek", a) for a in args.alphas] + [("noise", s) for s in args.sigmas]
    rows = []
    for kind, value in settings:
        runs = [run(kind, value, seed, data, args) for seed in args.seeds]
        row = {key: statistics.mean(r[key] for r in runs) for key in runs[0]}
        row["accuracy_sd"] = statistics.stdev([r["accuracy"] for r in runs]) \
            if len(runs) > 1 else 0.0
        rows.append((kind, value, row))
        print(f"  ... {kind} {value:g}: accuracy {row['accuracy']:.4f}, dCor {row['dcor']:.3f}, "
              f"SSIM {row['ssim']:.3f}", flush=True)
    base = rows[0][2]
    print(f"\n{args.epochs} epochs, mean of seeds {args.seeds}; cut noise clips to norm "
          f"{args.clip} first; inversion decoder {args.inversion_epochs} epochs; mean-image "
          f"SSIM {base['baseline_ssim']:.3f}")
    print("| defence | setting | test accuracy | vs none (points) | dCor(x, cut) @256 | "
          "inversion MSE | inversion SSIM |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, value, row in rows:
        name = "none" if kind == "NoPeek" and value == 0 else kind
        setting = "alpha" if kind == "NoPeek" else "sigma"
        print(f"| {name} | {setting} {value:g} | {row['accuracy']:.4f} ± {row['accuracy_sd']:.4f} "
              f"| {100 * (row['accuracy'] - base['accuracy']):+.1f} | {row['dcor']:.3f} | "
              f"{row['mse']:.4f} | {row['ssim']:.3f} |")
    if args.figure:
        from keras_split.privacy.attacks import _pyplot

        plt = _pyplot()
        figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for kind, marker in [("NoPeek", "o"), ("noise", "s")]:
            points = [(value, row) for k, value, row in rows if k == kind]
            if kind == "noise":
                points = [(0.0, base), *points]
            for axis, key, label in [(axes[0], "dcor", "dCor(x, cut), batch 256"),
                                     (axes[1], "ssim", "inversion SSIM")]:
                axis.plot([r[key] for _, r in points], [r["accuracy"] for _, r in points],
                          marker=marker, label="NoPeek (alpha)" if kind == "NoPeek"
                          else f"clip {args.clip:g} + Gaussian noise (sigma)")
                for value, r in points:
                    axis.annotate(f"{value:g}", (r[key], r["accuracy"]), fontsize=8,
                                  textcoords="offset points", xytext=(4, 4))
                axis.set_xlabel(f"{label} (lower leaks less)")
        axes[1].axvline(base["baseline_ssim"], color="gray", linestyle="--",
                        label="mean training image")
        axes[0].set_ylabel("test accuracy")
        axes[1].legend(fontsize=8)
        figure.suptitle("Accuracy against leakage, demo CNN on the shipped chest X-rays")
        figure.tight_layout()
        figure.savefig(args.figure, dpi=110)
        print(f"(figure: {args.figure})")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
