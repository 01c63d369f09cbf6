"""Feature-space hijacking on the chest X-rays, and the hijack detector's record.

The demo CNN's client half (cut "pool2") on the balanced PneumoniaMNIST
subset. Three measurements:

1. **The attack** (`feature_space_hijacking`, no detector), per seed: the
   client trains on its private half of the training images (Adam 1e-4,
   batch 64) against a `HijackingServer` (Adam 1e-3, WGAN-GP penalty 10)
   that holds the other half as its public data. By default the server
   supplied the model (`knows_weights=True`: its pilot starts from the
   client's initial weights); `--blind` runs a server that did not, once.
   Every `--eval-every` steps: the reconstruction MSE of the 468 test images
   from their cut activations, against the mean public image. Prints the
   curve of the first seed, and per seed the step where the MSE has halved
   and the step where it beats the mean image.
2. **Detection**: the same runs with a `HijackDetector` (`--probability`,
   first check at the first step after `--warmup`): the detection step, next
   to the same seed's halving step without the detector.
3. **False positives**: honest servers (the demo CNN's server half, Adam
   1e-3, its running metrics) trained `--honest-epochs` epochs on the whole
   balanced training set with a check at *every* step, over `--seeds` seeds:
   flagged checks / checks, and the honest scores' quantiles. Then the
   accuracy cost of the default schedule (probability 0.05) against no
   detector.

Target (issue 11): the detector flags the hijacking server before its
reconstruction MSE halves, with at most 1 % false positives over honest runs.

    python benchmarks/hijack.py [--steps 1500] [--seeds 5] [--warmup 100] [--blind]
        [--figure hijack.png] [--grid hijack_grid.png]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_split  # noqa: E402
from keras_split.apps.demo import build_demo_cnn, demo_loss  # noqa: E402
from keras_split.privacy.hijack import (  # noqa: E402
    HijackDetector,
    HijackingServer,
    feature_space_hijacking,
)
from keras_split.roles import ServerRole  # noqa: E402
from keras_split.transport import InProcessTransport  # noqa: E402

CUT = "pool2"
BATCH = 64


def client(seed):
    keras.utils.set_random_seed(seed)
    return keras_split.split(build_demo_cnn(), CUT).client


def attack(private, public, x_test, steps, eval_every, seed, detector=None, labels=None,
           client_lr=1e-4, knows_weights=True):
    model = client(seed)
    server = HijackingServer(public, client=model, knows_weights=knows_weights, seed=seed)
    return feature_space_hijacking(
        model, private, public, x_test, steps=steps, batch_size=BATCH,
        optimizer=keras.optimizers.Adam(client_lr), eval_every=eval_every, server=server,
        detector=detector, labels=labels, seed=seed)


def curve(result, title):
    print(title)
    print("| client step | " + " | ".join(str(s) for s in result.steps) + " |")
    print("|---|" + "---:|" * len(result.steps))
    print("| reconstruction MSE | " + " | ".join(f"{m:.4f}" for m in result.mse) + " |")
    print(f"(mean public image: MSE {result.baseline_mse:.4f}; MSE halved at step "
          f"{result.halved_at}; below the mean image from step {result.below_baseline_at})")


def honest(x, y, x_test, y_test, epochs, seed, probability):
    model = build_demo_cnn()
    keras.utils.set_random_seed(seed)
    split = keras_split.split(model, CUT)
    role = ServerRole(split.server, keras.optimizers.Adam(1e-3), demo_loss(),
                      metrics=["accuracy"])
    transport = InProcessTransport(role)
    detector = None
    if probability is not None:
        detector = HijackDetector(transport, 2, probability=probability, on_detect=lambda c: None,
                                  seed=seed)
        transport = detector
    split.compile(optimizer=keras.optimizers.Adam(1e-3), transport=transport)
    split.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, seed=seed)
    merged = split.merge()
    logits = np.concatenate([np.asarray(merged(x_test[i:i + 256], training=False))
                             for i in range(0, len(x_test), 256)])
    accuracy = float(np.mean(np.argmax(logits, -1) == y_test))
    return accuracy, ([] if detector is None else detector.checks)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--probability", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--honest-epochs", type=int, default=10)
    parser.add_argument("--blind", action="store_true",
                        help="also run the attack by a server that did not supply the model")
    parser.add_argument("--figure", default=None, help="save the attack's curve (matplotlib)")
    parser.add_argument("--grid", default=None, help="save the reconstructions (matplotlib)")
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")
    start = time.perf_counter()
    (x, y), _, (x_test, y_test) = keras_split.datasets.load_pneumoniamnist_balanced()
    y, y_test = y.reshape(-1), y_test.reshape(-1)
    order = np.random.default_rng(0).permutation(len(x))
    half = len(x) // 2
    private, public = x[order[:half]], x[order[half:]]
    private_y = y[order[:half]]

    runs = [attack(private, public, x_test, args.steps, args.eval_every, seed=seed)
            for seed in range(args.seeds)]
    result = runs[0]
    curve(result, f"1. Feature-space hijacking by a server that supplied the model, demo CNN cut "
          f"at {CUT!r}: the client trains on {len(private)} private X-rays (Adam 1e-4, batch "
          f"{BATCH}); the server holds {len(public)} others; MSE of the {len(x_test)} test "
          "images' reconstructions, seed 0")
    if args.figure:
        result.plot().savefig(args.figure, dpi=120)
    if args.grid:
        result.plot_reconstructions().savefig(args.grid, dpi=120)
    if args.blind:
        curve(attack(private, public, x_test, args.steps, args.eval_every, seed=0,
                     knows_weights=False),
              "\n1b. The same attack by a server that did not supply the model (a fresh pilot), "
              "seed 0")

    print(f"\n2. Detection (probability {args.probability}, first check after {args.warmup} "
          "steps), one run per seed, beside the same seed's attack without the detector")
    print("| seed | detected at step | score | attack's MSE then | MSE halves at (no detector) "
          "| beats the mean image at | best MSE (no detector) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for seed, run in enumerate(runs):
        detected = attack(private, public, x_test, args.steps, args.eval_every, seed=seed,
                          labels=private_y, detector={"num_classes": 2,
                                                      "probability": args.probability,
                                                      "warmup": args.warmup, "seed": seed})
        check = detected.checks[-1] if detected.checks else None
        print(f"| {seed} | {detected.detected_at} | "
              f"{'-' if check is None else f'{check.score:.3f}'} | {detected.mse[-1]:.4f} | "
              f"{run.halved_at} | {run.below_baseline_at} | {min(run.mse):.4f} |")

    print(f"\n3. Honest servers, a check at every step, {args.honest_epochs} epochs on "
          f"{len(x)} X-rays, batch {BATCH}")
    scores, flagged, plain_acc, guarded_acc = [], 0, [], []
    for seed in range(args.seeds):
        _, checks = honest(x, y, x_test, y_test, args.honest_epochs, seed, 1.0)
        scores += [c.score for c in checks]
        flagged += sum(c.flagged for c in checks)
        plain_acc.append(honest(x, y, x_test, y_test, args.honest_epochs, seed, None)[0])
        guarded_acc.append(honest(x, y, x_test, y_test, args.honest_epochs, seed,
                                  args.probability)[0])
    scores = np.array(scores)
    rate = 100 * flagged / len(scores)
    print(f"false positives: {flagged} of {len(scores)} checks ({rate:.2f} %)"
          f"; honest scores: min {scores.min():.3f}, median {np.median(scores):.3f}, "
          f"99th percentile {np.quantile(scores, 0.99):.3f}, max {scores.max():.3f} "
          "(threshold 0.5)")
    print(f"test accuracy without detector {np.mean(plain_acc):.4f} ± {np.std(plain_acc):.4f}, "
          f"with it at probability {args.probability}: {np.mean(guarded_acc):.4f} ± "
          f"{np.std(guarded_acc):.4f}")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
