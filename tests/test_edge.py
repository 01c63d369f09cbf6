"""The device runtime (`edge/`): exported client halves trained in LiteRT and
onnxruntime give the TensorFlow client's weights; the edge package trains
against a real server with TensorFlow unimportable; and an edge client taking
turns with a TensorFlow client gives the all-TensorFlow result."""

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_split
from keras_split.apps.demo import build_demo_cnn, demo_loss
from keras_split.datasets import load_pneumoniamnist_balanced
from keras_split.export import export_client
from keras_split.network.devcerts import write_dev_certificates
from keras_split.roles import ClientRole
from keras_split_edge import load
from tests.test_export import _bn_client

HERE = Path(__file__).resolve().parent
OPTIMIZERS = {"sgd": lambda: keras.optimizers.SGD(0.1),
              "adam": lambda: keras.optimizers.Adam(1e-3)}


def _demo_client():
    keras.utils.set_random_seed(0)
    return keras_split.split(build_demo_cnn(), "pool2").client


def _batch(model, rng, n=8):
    (x, _), _, _ = load_pneumoniamnist_balanced()
    if model.inputs[0].dtype == "uint8":
        return x[rng.integers(0, len(x), n)]
    return rng.normal(size=(n, *model.inputs[0].shape[1:])).astype("float32")


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("build", [_demo_client, _bn_client], ids=["demo", "batchnorm"])
def test_device_steps_match_the_tensorflow_client(tmp_path, rng, fmt, optimizer, build):
    model = build()
    export_client(model, tmp_path / f"client.{fmt}", optimizer=OPTIMIZERS[optimizer]())
    device = load(tmp_path / f"client.{fmt}")
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    reference = ClientRole(clone, OPTIMIZERS[optimizer]())
    reference.build()
    for _ in range(5):  # the same server gradients for both
        x = _batch(model, rng)
        context = reference.forward(x)
        np.testing.assert_allclose(device.forward([x])[0], context.activations[0], atol=1e-5)
        gradient = (rng.normal(size=context.activations[0].shape) * 1e-2).astype("float32")
        reference.backward(context, (gradient,))
        device.train([x], [gradient])
    for got, want in zip(device.get_weights(), clone.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)  # BatchNorm statistics included
    x = _batch(model, rng)
    np.testing.assert_allclose(device.infer([x])[0], clone(x, training=False), atol=1e-5)


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_device_state_survives_a_restart(tmp_path, rng, fmt):
    model = _demo_client()
    export_client(model, tmp_path / f"client.{fmt}", optimizer=keras.optimizers.Adam(1e-3))
    x = [_batch(model, rng) for _ in range(4)]
    g = [(rng.normal(size=(8, 5, 5, 32)) * 1e-2).astype("float32") for _ in range(4)]
    straight = load(tmp_path / f"client.{fmt}")
    for xi, gi in zip(x, g, strict=True):
        straight.train([xi], [gi])
    first = load(tmp_path / f"client.{fmt}")
    for xi, gi in zip(x[:2], g[:2], strict=True):
        first.train([xi], [gi])
    first.save(tmp_path / "device")
    second = load(tmp_path / f"client.{fmt}")  # a new app session
    assert second.restore(tmp_path / "device")
    for xi, gi in zip(x[2:], g[2:], strict=True):
        second.train([xi], [gi])
    for a, b in zip(second.get_weights(), straight.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"weights\[0\] has shape \(2,\), the model expects"):
        second.set_weights([np.zeros(2)] + second.get_weights()[1:])


# -- the edge package in a process where TensorFlow cannot be imported ------------


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge")
    keras.utils.set_random_seed(0)
    split = keras_split.split(build_demo_cnn(), "pool2")
    split.client.save(folder / "client.keras")
    split.server.save(folder / "server.keras")
    certs = write_dev_certificates(folder / "certs")
    (x, y), _, _ = load_pneumoniamnist_balanced()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))[:3 * 128]
    shards = [(x[order[i::3]], y[order[i::3]]) for i in range(3)]
    for i, (xs, ys) in enumerate(shards):
        np.savez(folder / f"shard{i}.npz", x=xs, y=ys)
    return dict(folder=folder, certs=certs, shards=shards)


def _server(network):
    model = keras.models.load_model(network["folder"] / "server.keras")
    return keras_split.SplitServer(model, demo_loss(), keras.optimizers.Adam(1e-3), ["accuracy"],
                                   tokens={"edge": "device", "tf": "hospital"},
                                   certificate=network["certs"]["server_cert"],
                                   private_key=network["certs"]["server_key"]).start()


def _tf_client(network, server, weights=None):
    model = keras.models.load_model(network["folder"] / "client.keras")
    if weights is not None:
        model.set_weights(weights)
    client = keras_split.SplitClient(model, server=f"127.0.0.1:{server.port}", token="tf",
                                     root_certificates=network["certs"]["ca"])
    client.compile(keras.optimizers.Adam(1e-3))
    return client


def _edge_train(network, server, export, shard, weights_in=None):
    folder = network["folder"]
    out = folder / f"weights-{shard}-{export.suffix[1:]}.npz"
    command = [sys.executable, str(HERE / "edge_blocked.py"), "train", "--model", str(export),
               "--server", f"127.0.0.1:{server.port}", "--token", "edge",
               "--ca", str(network["certs"]["ca"]), "--data", str(folder / f"shard{shard}.npz"),
               "--x-key", "x", "--y-key", "y", "--batch-size", "32", "--seed", "0",
               "--weights-out", str(out)]
    if weights_in is not None:
        np.savez(folder / "handoff.npz", **{f"w{i:03d}": w for i, w in enumerate(weights_in)})
        command += ["--weights-in", str(folder / "handoff.npz")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "blocked modules loaded: []" in result.stdout
    with np.load(out) as data:
        return [data[k] for k in sorted(data.files)]


def _export(network, fmt):
    path = network["folder"] / f"client.{fmt}"
    if not path.exists():
        model = keras.models.load_model(network["folder"] / "client.keras")
        export_client(model, path, optimizer=keras.optimizers.Adam(1e-3))
    return path


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_edge_package_trains_against_a_server_without_tensorflow(network, fmt):
    export = _export(network, fmt)
    x, y = network["shards"][0]
    server, reference_server = _server(network), _server(network)
    try:
        got = _edge_train(network, server, export, shard=0)
        reference = _tf_client(network, reference_server)
        reference.fit(x, y, batch_size=32, seed=0, verbose=0)
    finally:
        server.stop()
        reference_server.stop()
    for a, b in zip(got, reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b in zip(server.role.model.get_weights(), reference_server.role.model.get_weights(),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_edge_and_tensorflow_clients_take_turns_like_two_tensorflow_clients(network):
    export = _export(network, "tflite")
    (x0, y0), (x1, y1), (x2, y2) = network["shards"]
    mixed, pure = _server(network), _server(network)
    try:
        # Mixed: TF client, then the device (weights handed over), then TF again.
        first = _tf_client(network, mixed)
        first.fit(x0, y0, batch_size=32, seed=0, verbose=0)
        device_weights = _edge_train(network, mixed, export, shard=1,
                                     weights_in=first.get_weights())
        first.set_weights(device_weights)
        first.fit(x2, y2, batch_size=32, seed=0, verbose=0)
        # All TensorFlow: the second client is a TensorFlow client.
        one = _tf_client(network, pure)
        one.fit(x0, y0, batch_size=32, seed=0, verbose=0)
        two = _tf_client(network, pure, weights=one.get_weights())
        two.fit(x1, y1, batch_size=32, seed=0, verbose=0)
        one.set_weights(two.get_weights())
        one.fit(x2, y2, batch_size=32, seed=0, verbose=0)
    finally:
        mixed.stop()
        pure.stop()
    for a, b in zip(first.get_weights(), one.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b in zip(mixed.role.model.get_weights(), pure.role.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
