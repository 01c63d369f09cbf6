"""The demo over the network: save the halves, serve one, train the other.

Two terminals on one machine (see docs/network.md):

    keras-split certs --out certs
    keras-split halves --out halves
    keras-split serve --model halves/server.keras --cert certs/server.pem \\
        --key certs/server.key --token-file tokens.txt --save trained
    keras-split client --model halves/client.keras --server localhost:50051 \\
        --ca certs/ca.pem --token s3cret [--data FILE.npz] --save trained
    keras-split merge trained/client.keras trained/server.keras trained/model.keras
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import keras

from keras_split.apps.demo import DEFAULT_CUT, ByteCountProgbar, build_demo_cnn, format_logs
from keras_split.configurations.parallel import ParallelRole
from keras_split.configurations.rounds import PerClientRole, RoundCoordinator
from keras_split.configurations.sharding import shard_iid
from keras_split.datasets import load_pneumoniamnist_balanced, read_medmnist_npz
from keras_split.network.client import SplitClient
from keras_split.network.server import SplitServer
from keras_split.roles import ServerRole
from keras_split.split_model import SplitModel, split

SHIPPED_DATA = "the shipped balanced PneumoniaMNIST subset"


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
                rounds=None, group_steps=None, **options):
    """A `SplitServer` for a saved server half.

    `rounds`: to coordinate rounds of client processes, a dict with `mode`
    ("round_robin", "splitfed" or "sflv1"), `rounds`, `clients`, `turn_timeout`
    and `client_model` (the client half's file: its initial weights).
    `group_steps`: serve with a `ParallelRole` grouping up to this many
    concurrent clients' steps (and `max_workers` of at least that plus 2).
    """
    if group_steps is not None and (rounds or {}).get("mode") == "sflv1":
        raise ValueError("--group-steps groups steps on one shared server half; SFLv1 "
                         "(--round-mode sflv1) keeps a copy per client. Use one or the other.")
    if not options.get("tokens") and options.get("client_ca") is None:
        raise ValueError("Clients must authenticate: pass --token-file (lines of 'TOKEN "
                         "CLIENT_ID'), or --client-ca for mutual TLS, or both.")
    if not options.get("insecure") and (options.get("certificate") is None
                                        or options.get("private_key") is None):
        raise ValueError("TLS is on by default: pass --cert and --key (PEM files; "
                         "`keras-split certs --out certs` writes development ones), or "
                         "--insecure to serve in plaintext (loopback testing only).")
    model = load_model(model_path, "--model")
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
        weights = load_model(rounds["client_model"], "--client-model").get_weights()
        options["coordinator"] = RoundCoordinator(
            weights, "round_robin" if mode == "round_robin" else "splitfed",
            rounds=rounds["rounds"], clients=rounds["clients"],
            turn_timeout=rounds["turn_timeout"], server=options.get("role"))
    if group_steps is not None:
        options["role"] = ParallelRole(
            ServerRole(model, optimizer_object, loss_object, metrics), max_group=group_steps)
        options["max_workers"] = max(options.get("max_workers", 4), group_steps + 2)
    return SplitServer(model, loss_object, optimizer_object, metrics, **options)


def load_model(path, flag: str) -> keras.Model:
    """A `.keras` file the user named with `flag`, with an error that names the flag."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file. Pass the path of a .keras file "
                                "(`keras-split halves --out halves` writes the demo's halves).")
    return keras.models.load_model(path)  # the user's own file, never a peer's


def load_data(path=None, print_fn=print):
    """The client's data: a MedMNIST-layout `.npz`, or the shipped X-rays.

    A MedMNIST-layout file holds `train_images`, `train_labels`, `val_images`,
    `val_labels`, `test_images` and `test_labels` (images N x H x W or
    N x H x W x C, uint8; labels N or N x 1 class indices), as the official
    MedMNIST files do (see `keras_split.datasets.read_medmnist_npz`).

    Returns:
        `((x_train, y_train), (x_val, y_val), (x_test, y_test))` and a name for
        the data, for what the client prints.
    """
    if path is None:
        splits = load_pneumoniamnist_balanced()
        name = SHIPPED_DATA
        print_fn(f"data: {name} ({len(splits[0][0]):,} train / {len(splits[1][0]):,} val / "
                 f"{len(splits[2][0]):,} test chest X-rays); pass --data FILE.npz for your own")
        return splits, name
    if not Path(path).is_file():
        raise FileNotFoundError(f"--data {path}: no such file. Pass a .npz in MedMNIST layout "
                                "(train_images, train_labels, val_images, val_labels, "
                                "test_images, test_labels).")
    try:
        splits = read_medmnist_npz(path)
    except ValueError as error:
        raise ValueError(f"--data: {error}") from None
    name = Path(path).name
    print_fn(f"data: {path} ({len(splits[0][0]):,} train / {len(splits[1][0]):,} val / "
             f"{len(splits[2][0]):,} test, images {splits[0][0].shape[1:]})")
    return splits, name


def _check_fits(model: keras.Model, model_path, x, data_name) -> None:
    if len(model.inputs) != 1:
        raise ValueError(f"--model {model_path} takes {len(model.inputs)} inputs; --data gives "
                         "one array of images. Pass a client half with one image input.")
    expected = tuple(model.inputs[0].shape[1:])
    received = tuple(x.shape[1:])
    if len(expected) != len(received) or any(e not in (None, r)
                                             for e, r in zip(expected, received, strict=True)):
        raise ValueError(
            f"{data_name} holds images of shape {received}, but the client half "
            f"{model_path} takes {expected}. Pass --data with images of that shape, or a "
            f"client half built for {received} (`keras-split halves` cuts the demo CNN, "
            "built for 28x28x1).")


def train_client(model_path, server, token, epochs, batch_size, learning_rate, print_fn=print,
                 compression=None, checkpoint_dir=None, seed=0, shard=None, rounds=False,
                 data=None, save=None, pipeline=1, **options):
    """Train the client half on `data` (default: the shipped X-rays); resumable
    with `checkpoint_dir`.

    SIGTERM stops after the current step with the checkpoint written; running
    the same call again carries on from there. `data` is a MedMNIST-layout
    `.npz` (see `load_data`). `shard=(i, k)` trains on the i-th of k IID shares
    of the data (a hospital among k); `rounds=True` takes part in the server's
    rounds (`epochs` per turn) instead of a plain fit. `save`, a folder: write
    the trained client half there as `client.keras`. `pipeline`: training
    steps in flight (see `SplitModel.fit`).
    """
    if pipeline > 1 and (checkpoint_dir is not None or rounds):
        raise ValueError("--pipeline above 1 keeps steps in flight, so the server runs ahead "
                         "of any client checkpoint, and a round's turn is one fit: leave out "
                         "--checkpoint-dir and --rounds to pipeline, or use --pipeline 1.")
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = load_data(data, print_fn)[0]
    source = SHIPPED_DATA if data is None else f"--data {data}"
    if shard is not None:
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"--shard must be I/K with 0 <= I < K, received {index}/{count}.")
        x_train, y_train = shard_iid(x_train, y_train, count, seed=0)[index]
    model = load_model(model_path, "--model")
    _check_fits(model, model_path, x_train, source)
    # A TLS failure names the flag to change, not the Python argument.
    options.setdefault("tls_hint", "--ca" if options.get("root_certificates") else
                       "--ca (not given, so the system's CAs were used)")
    keras.utils.set_random_seed(seed)
    client = SplitClient(model, server=server, token=token, checkpoint_dir=checkpoint_dir,
                         **options)
    client.compile(optimizer=keras.optimizers.Adam(learning_rate), compression=compression)
    if rounds:
        trained = client.train_rounds(x_train, y_train, batch_size=batch_size,
                                      epochs_per_turn=epochs, seed=seed,
                                      on_turn=lambda r: print_fn(f"round {r}: my turn"))
        print_fn(f"trained in rounds {trained}")
        logs = client.evaluate(x_test, y_test, verbose=0, return_dict=True)
        print_fn(f"test: {format_logs(logs)} (this client's last turn)")
        _save_client(client, save, print_fn, "this client's last turn; the rounds server's "
                                             "--save writes the final client half")
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
                   validation_data=(x_val, y_val), seed=seed, callbacks=[ByteCountProgbar()],
                   pipeline=pipeline)
    finally:
        if handle_sigterm:
            signal.signal(signal.SIGTERM, previous)
    if client.skipped_finished_fit:
        print_fn(f"nothing to do: {client.checkpoint_path} holds this training, finished "
                 f"({epochs} epoch(s)); delete the folder (or use a new --checkpoint-dir) to "
                 "train again")
        _save_client(client, save, print_fn, "as the finished training left it")
        return None
    if client.interrupted:
        print_fn(f"interrupted; run the same command to resume from {client.checkpoint_path}")
        return None
    logs = client.evaluate(x_test, y_test, verbose=0, return_dict=True)
    print_fn(f"test: {format_logs(logs)} ({source})")
    _save_client(client, save, print_fn, "trained")
    return logs


def _save_client(client: SplitClient, folder, print_fn, what: str) -> None:
    if folder is None:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / "client.keras"
    client.save(path)
    print_fn(f"wrote {path} (the client half, {what}); `keras-split merge {path} "
             "SERVER.keras OUT.keras` rebuilds the whole model with the server's half")


def save_trained(server: SplitServer, folder, print_fn=print,
                 client_model=None) -> dict[str, Path]:
    """Write what `server` holds into `folder` as `.keras` files.

    Always its server half (`server.keras`, trained, with its optimizer). A
    rounds server also holds the client half (round-robin: the last client's;
    SplitFed: the averaged one): with `client_model`, the client half's file
    (its architecture), it also writes `client.keras` and the whole model,
    `model.keras`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {"server": folder / "server.keras"}
    server_half = server.role.model
    server_half.save(written["server"])
    if client_model is not None and server.coordinator is not None:
        client_half = load_model(client_model, "--client-model")
        client_half.set_weights(server.coordinator.weights)
        written["client"] = folder / "client.keras"
        client_half.save(written["client"])
        written["model"] = folder / "model.keras"
        merge_halves(client_half, server_half).save(written["model"])
    for name, path in written.items():
        print_fn(f"wrote {path} ({_WRITTEN[name]})")
    return written


_WRITTEN = {"server": "the trained server half",
            "client": "the client half of the last round",
            "model": "the whole model: client and server halves merged"}


def merge_halves(client: keras.Model, server: keras.Model) -> keras.Model:
    """One `keras.Model` from two halves: the server applied to the client's outputs.

    Checks that the client's outputs are the server's inputs (`SplitModel`'s
    rules). The merged model takes the server half's compile configuration
    (loss, metrics, a fresh optimizer of the same kind) when the server half has
    one, so `evaluate` works at once.
    """
    merged = SplitModel(client=client, server=server).merge()
    # `keras-split halves` names the halves after the model ("xray_cnn_client").
    base = client.name.removesuffix("_client")
    if base != client.name:
        merged.name = base
    config = server.get_compile_config() if server.compiled else None
    if config:
        merged.compile_from_config(config)
    return merged
