"""The `keras-split` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from keras_split.demo import build_demo_cnn, run_demo
    from keras_split.partition import cut_candidates

    if args.list_cuts:
        print(f"{'layer':<10} {'bytes/sample':>12} {'client params':>14} {'client FLOPs':>13}")
        for c in cut_candidates(build_demo_cnn()):
            print(f"{c.layer:<10} {c.bytes_per_sample:>12,} {c.client_params:>14,} "
                  f"{c.client_flops_fraction:>12.1%}")
        return 0
    run_demo(epochs=args.epochs, cut=args.cut, batch_size=args.batch_size,
             learning_rate=args.learning_rate, seed=args.seed, verbose=2 if args.quiet else 1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-split", description="Split learning for TensorFlow/Keras."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train a split CNN on the shipped chest X-rays, beside the unsplit model",
        description=(
            "Train a small CNN on the shipped balanced PneumoniaMNIST subset (real pediatric "
            "chest X-rays, offline) twice from the same initial weights: split at --cut, with "
            "only cut activations and gradients crossing, and unsplit with keras.Model.fit. "
            "Prints both test accuracies and the bytes per sample that crossed the cut."
        ),
    )
    demo.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    demo.add_argument(
        "--cut", default="pool2",
        help="layer whose output is sent to the server (default pool2; see --list-cuts)",
    )
    demo.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    demo.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--quiet", action="store_true", help="one line per epoch, no progress bar")
    demo.add_argument(
        "--list-cuts", action="store_true",
        help="list the valid cut layers with bytes per sample, client parameters and FLOPs",
    )
    demo.set_defaults(run=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("epochs", "batch_size"):
        value = getattr(args, name, 1)
        if value < 1:
            print(f"keras-split: --{name.replace('_', '-')} must be at least 1, got {value}.",
                  file=sys.stderr)
            return 2
    try:
        return args.run(args)
    except (ValueError, TypeError) as error:
        # User errors (a bad --cut, say) get the message, not a traceback.
        print(f"keras-split: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
