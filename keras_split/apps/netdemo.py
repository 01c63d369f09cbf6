"""The demo over the network: save the halves, serve one, train the other.

Two terminals on one machine (see the README):

    keras-split certs --out certs
    keras-split halves --out halves
    keras-split serve --model halves/server.keras --cert certs/server.pem \\
        --key certs/server.key --token-file tokens.txt
    keras-split client --model halves/client.keras --server localhost:50051 \\
        --ca certs/ca.pem --token s3cret
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import keras

from keras_split.apps.demo import DEFAULT_CUT, build_demo_cnn
from keras_split.configurations.rounds import PerClientRole, RoundCoordinator
from keras_split.configurations.sharding import shard_iid
from keras_split.datasets import load_pneumoniamnist_balanced
from keras_split.network.client import SplitClient
from keras_split.network.server import SplitServer
from keras_split.split_model import split


def save_halves(folder, cut=DEFAULT_CUT, seed=0) -> tuple[Path, Path]:
    """Cut the demo CNN and save `client.keras` and `server.keras` into `folder`."""
    keras.utils.set_random_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    halves = split(build_demo_cnn(), cut)
    client_path, server_path = folder / "client.keras", folder / "server.keras"
    halves.client.save(client_path)
    halves.server.save(server_path)
    return client_path, server_path


def read_tokens(path) -> dict[str, str]:
    """Read `token client_id` lines (blank lines and # comments skipped)."""
    tokens = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(
                f"{path}:{number}: expected 'TOKEN CLIENT_ID', received {len(parts)} fields."
            )
        tokens[parts[0]] = parts[1]
    if not tokens:
        raise ValueError(f"{path} names no client; add lines of the form 'TOKEN CLIENT_ID'.")
    return tokens


def make_server(model_path, loss, from_logits, optimizer, learning_rate, metrics,
                rounds=None, **options):
    """A `SplitServer` for a saved server half.

    `rounds`: to coordinate rounds of client processes, a dict with `mode`
    ("round_robin", "splitfed" or "sflv1"), `rounds`, `clients`, `turn_timeout`
    and `client_model` (the client half's file: its initial weights).
    """
    model = keras.models.load_model(model_path)  # the operator's own file, not a peer's
    loss_object = loss
    if from_logits:
        # "sparse_categorical_crossentropy" -> the SparseCategoricalCrossentropy class.
        class_name = "".join(part.capitalize() for part in loss.split("_"))
        try:
            loss_object = keras.losses.get(
                {"class_name": class_name, "config": {"from_logits": True}}
            )
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"--from-logits needs a loss class that takes from_logits (e.g. "
                f"sparse_categorical_crossentropy, binary_crossentropy); received {loss!r}."
            ) from error
    optimizer_object = keras.optimizers.get(optimizer)
    optimizer_object.learning_rate = learning_rate
    if rounds is not None:
        mode = rounds["mode"]
        if mode == "sflv1":
            options["role"] = PerClientRole(model, optimizer_object, loss_object, metrics)
        weights = keras.models.load_model(rounds["client_model"]).get_weights()
        options["coordinator"] = RoundCoordinator(
            weights, "round_robin" if mode == "round_robin" else "splitfed",
            rounds=rounds["rounds"], clients=rounds["clients"],
            turn_timeout=rounds["turn_timeout"], server=options.get("role"))
    return SplitServer(model, loss_object, optimizer_object, metrics, **options)


def train_client(model_path, server, token, epochs, batch_size, learning_rate, print_fn=print,
                 compression=None, checkpoint_dir=None, seed=0, shard=None, rounds=False,
                 **options):
    """Train the client half on the shipped data; resumable with `checkpoint_dir`.

    SIGTERM stops after the current step with the checkpoint written; running
    the same call again carries on from there. `shard=(i, k)` trains on the
    i-th of k IID shares of the data (a hospital among k); `rounds=True` takes
    part in the server's rounds (`epochs` per turn) instead of a plain fit.
    """
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = load_pneumoniamnist_balanced()
    if shard is not None:
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"--shard must be I/K with 0 <= I < K, received {index}/{count}.")
        x_train, y_train = shard_iid(x_train, y_train, count, seed=0)[index]
    keras.utils.set_random_seed(seed)
    client = SplitClient(keras.models.load_model(model_path), server=server, token=token,
                         checkpoint_dir=checkpoint_dir, **options)
    client.compile(optimizer=keras.optimizers.Adam(learning_rate), compression=compression)
    if rounds:
        trained = client.train_rounds(x_train, y_train, batch_size=batch_size,
                                      epochs_per_turn=epochs, seed=seed,
                                      on_turn=lambda r: print_fn(f"round {r}: my turn"))
        print_fn(f"trained in rounds {trained}")
        logs = client.evaluate(x_test, y_test, verbose=0, return_dict=True)
        print_fn(f"test: {', '.join(f'{k} {v:.4f}' for k, v in logs.items())} "
                 "(this client's last turn)")
        return logs
    if client.resume_position is not None:
        where = client.resume_position
        print_fn(f"resuming from {client.checkpoint_path}: epoch {where['epoch'] + 1}, "
                 f"batch {where['batch'] + 1}")
    client.repeat_finished_fit = False
    handle_sigterm = threading.current_thread() is threading.main_thread()
    if handle_sigterm:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: client.interrupt())
    try:
        client.fit(x_train, y_train, batch_size=batch_size, epochs=epochs,
                   validation_data=(x_val, y_val), seed=seed)
    finally:
        if handle_sigterm:
            signal.signal(signal.SIGTERM, previous)
    if client.skipped_finished_fit:
        print_fn(f"nothing to do: {client.checkpoint_path} holds this training, finished "
                 f"({epochs} epoch(s)); delete the folder (or use a new --checkpoint-dir) to "
                 "train again")
        return None
    if client.interrupted:
        print_fn(f"interrupted; run the same command to resume from {client.checkpoint_path}")
        return None
    logs = client.evaluate(x_test, y_test, verbose=0, return_dict=True)
    print_fn(f"test: {', '.join(f'{k} {v:.4f}' for k, v in logs.items())} "
             "(balanced PneumoniaMNIST subset)")
    return logs
