"""`python -m keras_split_edge train ...`: train an exported client half on a
dataset file against a keras_split server, keeping the device's state."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from keras_split_edge.client import EdgeClient
from keras_split_wire import device_names
from keras_split_wire.rpc import ServerError


def _read_data(path, x_key, y_key, input_shape):
    if not Path(path).is_file():
        raise FileNotFoundError(f"Cannot read the data file {path}: no such file. Pass --data "
                                "the .npz file that holds the device's data.")
    with np.load(path, allow_pickle=False) as data:
        missing = {x_key, y_key} - set(data.files)
        if missing:
            raise ValueError(f"{path} has no {sorted(missing)}; it holds {sorted(data.files)}. "
                             "Pass --x-key/--y-key.")
        x, y = data[x_key], data[y_key]
    if x.shape[1:] != tuple(input_shape) and x[0].size == np.prod(input_shape):
        x = x.reshape((len(x), *input_shape))  # e.g. MedMNIST's (N, 28, 28) for (28, 28, 1)
    return x, y.reshape(len(y)) if y.ndim == 2 and y.shape[1] == 1 else y


def _read_weights(path):
    """The weights w000, w001, ... of a hand-off file, in order."""
    with np.load(path, allow_pickle=False) as data:
        keys = device_names.numbered(data.files, device_names.WEIGHT_PREFIX)
        if not keys:
            raise ValueError(
                f"{path} holds no weights named {device_names.weight(0)}, "
                f"{device_names.weight(1)}, ...; it holds {sorted(data.files)}. Save the "
                "weights under those names in get_weights() order, as --weights-out does.")
        return [data[k] for k in keys]


def _write_weights(path, weights):
    np.savez(path, **{device_names.weight(i): w for i, w in enumerate(weights)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keras_split_edge")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the device's client half")
    train.add_argument("--model", required=True, help="exported client half (.tflite/.onnx)")
    train.add_argument("--server", required=True, help="HOST:PORT of the split server")
    train.add_argument("--token", help="bearer token")
    train.add_argument("--ca", help="CA certificate of the server (PEM)")
    train.add_argument("--cert", help="client certificate (mutual TLS)")
    train.add_argument("--key", help="client private key (mutual TLS)")
    train.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    train.add_argument("--data", required=True, help=".npz file with the device's data")
    train.add_argument("--x-key", default="train_images")
    train.add_argument("--y-key", default="train_labels")
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-shuffle", action="store_true")
    train.add_argument("--compression", default=None)
    train.add_argument("--state-dir", help="keep weights, optimizer state and progress here; "
                                           "a rerun resumes where the last run stopped")
    train.add_argument("--restart", action="store_true",
                       help="start a new fit from the saved state even if it finished")
    train.add_argument("--timeout", type=float, default=30.0, help="deadline per call (s)")
    train.add_argument("--retry-for", type=float, default=60.0,
                       help="how long to retry an unreachable server (s)")
    train.add_argument("--weights-in", help=".npz of weights w000... to start from (hand-off)")
    train.add_argument("--weights-out", help="write the final weights here (.npz)")
    args = parser.parse_args(argv)
    try:
        return _train(args)
    except (ServerError, ValueError, RuntimeError, OSError, ImportError) as error:
        # One line that says what went wrong and how to fix it; a traceback
        # would bury it (the messages are written for the user).
        text = " ".join(str(error).split())
        print(f"error: {text}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        resume = f"; run the same command to resume from {args.state_dir}" \
            if args.state_dir else ""
        print(f"interrupted{resume}", file=sys.stderr, flush=True)
        return 130


def _train(args) -> int:
    from keras_split_edge.runtime import load

    model = load(args.model)
    x, y = _read_data(args.data, args.x_key, args.y_key, model.input_shapes[0])
    client = EdgeClient(model, args.server, state_dir=args.state_dir, token=args.token,
                        root_certificates=args.ca, certificate=args.cert, private_key=args.key,
                        insecure=args.insecure, compression=args.compression, tls_hint="--ca",
                        timeout=args.timeout, retry_for=args.retry_for)
    try:
        if args.weights_in and client.restored:
            print(f"note: {args.state_dir} holds the device's saved state; --weights-in is "
                  "ignored")
        elif args.weights_in:
            model.set_weights(_read_weights(args.weights_in))
        client.fit(x, y, batch_size=args.batch_size, epochs=args.epochs,
                   shuffle=not args.no_shuffle, seed=args.seed, restart=args.restart)
        if args.weights_out:
            _write_weights(args.weights_out, model.get_weights())
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
