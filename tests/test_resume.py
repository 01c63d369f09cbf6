"""Checkpoint and resume: a server or client killed with SIGKILL (or stopped with
SIGTERM) restarts from its checkpoint, and training ends with the weights of an
uninterrupted run: no step lost, none applied twice.

The reference is the same training in one process (`SplitModel`), from the same
saved halves, data, seed and batch order.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest

import keras_split
from keras_split import checkpoint
from keras_split.apps import netdemo
from keras_split.datasets import load_pneumoniamnist_balanced
from keras_split.network.devcerts import write_dev_certificates
from keras_split.network.sessions import Session as _Session

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
TOKEN = "resume-token"
BATCH = 64


# -- the resume rule, by hand ---------------------------------------------------


@pytest.mark.parametrize(("last_train", "last", "client", "cached", "after"), [
    (5, 5, 5, True, 5),     # clean: both at step 5
    (5, 8, 5, True, 5),     # 3 evaluation steps after the checkpoint: forgotten
    (5, 8, 7, True, 7),     # the client saved during evaluation? still consistent
    (6, 6, 5, True, 6),     # the client missed step 6's reply: it resends, gets the cache
])
def test_session_lines_up_with_a_restarted_client(last_train, last, client, cached, after):
    session = _Session("a", last_step=last, last_train_step=last_train,
                       cached=object() if cached else None)
    assert session.resume_at(client) is None
    assert session.last_step == after


@pytest.mark.parametrize(("last_train", "last", "client"), [
    (7, 7, 5),   # two training steps ahead: the client's checkpoint is too old
    (6, 8, 5),   # a training step ahead, then more steps: its reply is gone
    (5, 5, 9),   # the client is ahead of the server
])
def test_session_refuses_checkpoints_that_do_not_belong_together(last_train, last, client):
    session = _Session("a", last_step=last, last_train_step=last_train, cached=object())
    assert "do not belong together" in session.resume_at(client)
    assert session.last_step == last


# -- processes -------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    client_path, server_path = netdemo.save_halves(folder / "halves")
    certs = write_dev_certificates(folder / "certs")
    tokens = folder / "tokens.txt"
    tokens.write_text(f"{TOKEN} hospital-a\n")
    (x, y), (x_val, y_val), _ = load_pneumoniamnist_balanced()
    return dict(folder=folder, client=client_path, server=server_path, certs=certs,
                tokens=tokens, x=x, y=y, x_val=x_val, y_val=y_val)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}


def _wait_for(process, text, timeout=60.0):
    """Read the process's output until a line contains `text`."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return
    process.kill()
    raise AssertionError(f"no {text!r} from {process.args}; output:\n{''.join(seen)}")


def _start_server(setup, port, checkpoints):
    command = [sys.executable, "-m", "keras_split.apps.cli", "serve", "--model",
               str(setup["server"]), "--from-logits", "--learning-rate", "1e-3",
               "--address", f"127.0.0.1:{port}", "--cert", str(setup["certs"]["server_cert"]),
               "--key", str(setup["certs"]["server_key"]), "--token-file", str(setup["tokens"]),
               "--checkpoint-dir", str(checkpoints)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=_environment())
    _wait_for(process, "serving")
    return process


def _reference(setup, epochs):
    """The same training, uninterrupted, in one process."""
    keras.utils.set_random_seed(0)
    reference = keras_split.SplitModel(client=keras.models.load_model(setup["client"]),
                                       server=keras.models.load_model(setup["server"]))
    reference.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, metrics=["accuracy"])
    reference.fit(setup["x"], setup["y"], batch_size=BATCH, epochs=epochs, seed=0,
                  validation_data=(setup["x_val"], setup["y_val"]), verbose=0)
    return reference


def _assert_same(variables, arrays, group):
    values = [arrays[f"{group}/{i}"] for i in range(len(variables))]
    for variable, value in zip(variables, values, strict=True):
        np.testing.assert_allclose(value, variable.numpy(), atol=1e-5, err_msg=variable.path)


class _KillAt(keras.callbacks.Callback):
    """SIGKILLs the server a moment after the client starts chosen steps, so the
    kill lands before, during or after the server's work on that step, and
    starts a new server process on the same port and checkpoint directory."""

    def __init__(self, restart, at: dict[int, float]):
        super().__init__()
        self.restart, self.at, self.batches = restart, dict(at), 0

    def on_train_batch_begin(self, batch, logs=None):
        self.batches += 1
        if self.batches in self.at:
            threading.Timer(self.at.pop(self.batches), self.restart).start()


def test_server_killed_mid_epoch_resumes_without_losing_or_repeating_a_step(setup):
    port, checkpoints = _free_port(), setup["folder"] / "server-checkpoints"
    processes = [_start_server(setup, port, checkpoints)]

    def restart():
        processes[-1].send_signal(signal.SIGKILL)
        processes[-1].wait()
        processes[-1].stdout.close()
        processes.append(_start_server(setup, port, checkpoints))

    keras.utils.set_random_seed(0)
    client = keras_split.SplitClient(keras.models.load_model(setup["client"]),
                                     server=f"127.0.0.1:{port}", token=TOKEN,
                                     root_certificates=setup["certs"]["ca"])
    client.compile(optimizer=keras.optimizers.Adam(1e-3))
    epochs = 2
    per_epoch = int(np.ceil(len(setup["x"]) / BATCH))
    validation = int(np.ceil(len(setup["x_val"]) / BATCH))
    steps = epochs * per_epoch
    killer = _KillAt(restart, at={12: 0.0, 50: 0.004})
    try:
        client.fit(setup["x"], setup["y"], batch_size=BATCH, epochs=epochs, seed=0,
                   validation_data=(setup["x_val"], setup["y_val"]), callbacks=[killer],
                   verbose=0)
    finally:
        processes[-1].send_signal(signal.SIGTERM)  # a clean stop writes a checkpoint
        output, _ = processes[-1].communicate(timeout=60)
    assert len(processes) == 3, "both kills happened"
    assert processes[-1].returncode == 0, output
    assert "checkpoint written" in output

    header, arrays = checkpoint.read(checkpoints / "server.ckpt")
    # One small record per session beside the model checkpoint, which also
    # carries the line of the session stepped last.
    ((session, _),) = checkpoint.SessionStore(checkpoints / "sessions").load_all().values()
    assert header["last_session"]["last_step"] == session["last_step"]
    # Step numbers count validation steps too: the last training step is the
    # last of epoch 2, after one validation pass.
    assert session["last_train_step"] == steps + validation
    assert int(arrays["optimizer/0"]) == steps  # each training step applied exactly once
    reference = _reference(setup, epochs)
    _assert_same(reference.server.variables, arrays, "model")
    for got, want in zip(client.client.weights, reference.client.weights, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, err_msg=got.path)


def _client_command(setup, port, checkpoints):
    return [sys.executable, "-m", "keras_split.apps.cli", "client", "--model", str(setup["client"]),
            "--server", f"127.0.0.1:{port}", "--token", TOKEN, "--ca",
            str(setup["certs"]["ca"]), "--epochs", "2", "--batch-size", str(BATCH),
            "--checkpoint-dir", str(checkpoints), "--seed", "0"]


def _client_step(path) -> int:
    try:
        return checkpoint.read(path)[0]["step"]
    except (OSError, checkpoint.CheckpointError):
        return 0


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_client_stopped_mid_epoch_resumes_from_its_checkpoint(setup, stop):
    port = _free_port()
    checkpoints = setup["folder"] / f"client-checkpoints-{stop.name}"
    server = netdemo.make_server(
        setup["server"], "sparse_categorical_crossentropy", True, "adam", 1e-3, ["accuracy"],
        tokens={TOKEN: "hospital-a"}, address=f"127.0.0.1:{port}",
        certificate=setup["certs"]["server_cert"], private_key=setup["certs"]["server_key"],
    ).start()
    try:
        command = _client_command(setup, port, checkpoints)
        first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, env=_environment())
        deadline = time.monotonic() + 60
        # Step 55 is in the second epoch (38 training and 5 validation steps
        # each), whose shuffled order the resumed client must replay.
        while _client_step(checkpoints / "client.ckpt") < 55 and time.monotonic() < deadline:
            time.sleep(0.005)
        first.send_signal(stop)
        output, _ = first.communicate(timeout=60)
        if stop == signal.SIGTERM:
            assert first.returncode == 0, output
            assert "interrupted; run the same command to resume" in output
        stopped_at = _client_step(checkpoints / "client.ckpt")
        assert 55 <= stopped_at < 2 * 43
        second = subprocess.run(command, capture_output=True, text=True, env=_environment(),
                                timeout=120)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "test: " in second.stdout
        assert "resuming from" in second.stdout and "epoch 2" in second.stdout
        # The same command once more: it says so, and trains nothing.
        done_at = _client_step(checkpoints / "client.ckpt")
        third = subprocess.run(command, capture_output=True, text=True, env=_environment(),
                               timeout=120)
        assert third.returncode == 0, third.stdout + third.stderr
        assert "nothing to do" in third.stdout
        assert _client_step(checkpoints / "client.ckpt") == done_at
    finally:
        server.stop()
    header, arrays = checkpoint.read(checkpoints / "client.ckpt")
    assert header["position"] is None  # the fit finished
    reference = _reference(setup, epochs=2)
    _assert_same(reference.client.variables, arrays, "model")
    _assert_same(reference.client_role.optimizer.variables, arrays, "optimizer")
    for got, want in zip(server.role.model.weights, reference.server.weights, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, err_msg=got.path)


# -- errors ----------------------------------------------------------------------


def _small_server(model, checkpoints, **options):
    return keras_split.SplitServer(model, LOSS, keras.optimizers.SGD(0.1), tokens={TOKEN: "a"},
                                   insecure=True, checkpoint_dir=checkpoints, **options)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    def server_half(width, cut=(4,)):
        inputs = keras.Input(cut)
        return keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(width)(inputs)))

    _small_server(server_half(3), tmp_path).stop()
    with pytest.raises(checkpoint.CheckpointError, match=r"holds 4 model variables, this party "
                                                         r"has 4|has shape \(4, 5\), the "
                                                         r"checkpoint has \(4, 3\)"):
        _small_server(server_half(5), tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=r"not written by a server with this "
                                                         r"cut \(\[\['float32', \[None, 6\]\]\]\)"):
        _small_server(server_half(3, cut=(6,)), tmp_path)
    (tmp_path / "server.ckpt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(checkpoint.CheckpointError, match="is not a readable keras_split"):
        _small_server(server_half(3), tmp_path)


class _InterruptAt(keras.callbacks.Callback):
    def __init__(self, client, batch):
        super().__init__()
        self.client, self.batch = client, batch

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            self.client.interrupt()


def test_an_interrupted_fit_resumes_only_with_the_same_arguments(tmp_path, rng):
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(4, name="cut")(inputs)))
    split = keras_split.split(model, "cut")
    x, y = rng.normal(size=(40, 5)).astype("float32"), rng.integers(0, 3, 40)
    server = _small_server(split.server, tmp_path / "server").start()
    try:
        def client():
            c = keras_split.SplitClient(split.client, server=f"127.0.0.1:{server.port}",
                                        token=TOKEN, insecure=True,
                                        checkpoint_dir=tmp_path / "client")
            c.compile(keras.optimizers.SGD(0.1))
            return c

        first = client()
        first.fit(x, y, batch_size=8, epochs=2, seed=1, verbose=0,
                  callbacks=[_InterruptAt(first, 2)])
        assert first.interrupted
        with pytest.raises(ValueError, match=r"stopped in a fit with .*'batch_size': 8.* but "
                                             r"this fit has .*'batch_size': 4"):
            client().fit(x, y, batch_size=4, epochs=2, seed=1, verbose=0)
        second = client()
        history = second.fit(x, y, batch_size=8, epochs=2, seed=1, verbose=0)
        assert not second.interrupted
        assert len(history.history["loss"]) == 2
        assert int(server.role.optimizer.iterations) == 2 * 5  # 3 before, 7 after
    finally:
        server.stop()


def test_without_a_checkpoint_a_fit_with_other_arguments_starts_afresh(tmp_path, rng):
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(4, name="cut")(inputs)))
    split = keras_split.split(model, "cut")
    x, y = rng.normal(size=(40, 5)).astype("float32"), rng.integers(0, 3, 40)
    server = _small_server(split.server, tmp_path / "server").start()
    try:
        client = keras_split.SplitClient(split.client, server=f"127.0.0.1:{server.port}",
                                         token=TOKEN, insecure=True)
        client.compile(keras.optimizers.SGD(0.1))
        client.fit(x, y, batch_size=8, epochs=2, seed=1, verbose=0,
                   callbacks=[_InterruptAt(client, 2)])
        assert client.interrupted
        # Nothing on disk to resume from: another fit is a fit of its own, whole.
        history = client.fit(x, y, batch_size=4, epochs=1, seed=1, verbose=0)
        assert len(history.history["loss"]) == 1
        assert int(server.role.optimizer.iterations) == 3 + 10
    finally:
        server.stop()
