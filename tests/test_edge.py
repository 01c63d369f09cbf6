"""The device runtime (`edge/`): exported client halves trained in LiteRT and
onnxruntime give the TensorFlow client's weights; the edge package trains
against a real server with TensorFlow unimportable; an edge client taking
turns with a TensorFlow client gives the all-TensorFlow result; and the device's
link checks what it sends and receives as the TensorFlow client does."""

import re
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import keras
import numpy as np
import pytest

import keras_split
from keras_split.apps.demo import build_demo_cnn, demo_loss
from keras_split.datasets import load_pneumoniamnist_balanced
from keras_split.export import export_client
from keras_split.network.devcerts import write_dev_certificates
from keras_split.roles import ClientRole
from keras_split_edge import EdgeClient, LinkError, ServerLink, load
from keras_split_edge.__main__ import main as edge_main
from keras_split_edge.runtime import saved_progress
from keras_split_wire import codecs, device_names, rpc
from keras_split_wire.proto import split_pb2 as pb
from keras_split_wire.proto import split_pb2_grpc as pb_grpc
from keras_split_wire.tensors import encode
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
        np.savez(folder / "handoff.npz",
                 **{device_names.weight(i): w for i, w in enumerate(weights_in)})
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


# -- the device's link: the same checks as the TensorFlow client -------------------

CUT = [("float32", (-1, 5, 5, 32))]  # the demo CNN's cut at pool2


class _ScriptedServer(pb_grpc.SplitLearningServicer):
    """A split server that records what reaches it and answers each step with the
    gradients it is given (a faulty or hostile server)."""

    def __init__(self, gradients=None):
        self.gradients = gradients
        self.steps = []

    def Open(self, request, context):  # noqa: N802 - gRPC's method name
        return pb.OpenReply(session_id="s", protocol_version=request.protocol_version,
                            max_batch_size=64)

    def Step(self, request, context):  # noqa: N802 - gRPC's method name
        self.steps.append(request)
        gradients = self.gradients(request) if self.gradients else [
            encode(np.zeros(tuple(t.shape), "float32")) for t in request.activations]
        return pb.StepReply(step=request.step, gradients=gradients, logs={"loss": 1.0},
                            log_order=["loss"])


@pytest.fixture
def scripted():
    """A `_ScriptedServer` on loopback (plaintext) and a link factory for it."""
    servicer = _ScriptedServer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_SplitLearningServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    links = []

    def link(**options):
        links.append(ServerLink(f"127.0.0.1:{port}", insecure=True, **options))
        links[-1].open(CUT)
        return links[-1]

    yield servicer, link
    for opened in links:
        opened.close()
    server.stop(grace=None)


@pytest.mark.parametrize(("activation", "message"), [
    (np.zeros((8, 5, 5, 32), "float64"), r"activations\[0\]: dtype float64, expected float32"),
    (np.zeros((8, 5, 5, 16), "float32"), r"activations\[0\]: shape \(8, 5, 5, 16\), expected "
                                         r"\(None, 5, 5, 32\)"),
    (np.zeros((8, 800), "float32"), r"activations\[0\]: rank 2"),
], ids=["float64", "shape", "rank"])
def test_link_refuses_activations_that_do_not_fit_the_cut_before_sending(scripted, activation,
                                                                         message):
    servicer, link = scripted
    link = link()
    with pytest.raises(ValueError, match=rf"Cannot send {message}.*must produce what the "
                                         "session was opened with"):
        link.exchange("train", [activation], np.zeros(8, "int64"))
    with pytest.raises(ValueError, match=r"2 tensors, but the cut has 1 \(\['cut_0'\]\)"):
        link.exchange("train", [np.zeros((8, 5, 5, 32), "float32")] * 2, np.zeros(8, "int64"))
    # Nothing reached the server and nothing was counted; the next good step is step 1.
    assert servicer.steps == [] and link.bytes_up == 0 and link.step == 0
    gradients, logs = link.exchange("train", [np.ones((8, 5, 5, 32), "float32")],
                                    np.zeros(8, "int64"))
    assert [s.step for s in servicer.steps] == [1] and logs == {"loss": 1.0}
    assert gradients[0].shape == (8, 5, 5, 32)


def _wrong_gradient(kind):
    def gradients(request):
        shape = tuple(request.activations[0].shape)
        if kind == "shape":  # fewer elements than sent, so only the shape check catches it
            return [encode(np.zeros((shape[0], 5, 5, 16), "float32"))]
        if kind == "too_large":
            return [encode(np.zeros((shape[0], 5, 5, 64), "float32"))]
        if kind == "dtype":
            return [encode(np.zeros(shape, "int32"))]
        if kind == "codec":  # int8 was never negotiated: the link opened uncompressed
            return [encode(np.zeros(shape, "float32"), codec=codecs.get("int8"))]
        return [encode(np.zeros(shape, "float32"))] * 2  # one per cut tensor expected
    return gradients


@pytest.mark.parametrize(("kind", "message"), [
    ("shape", r"gradients\[0\]: shape \(8, 5, 5, 16\), expected \(8, 5, 5, 32\)"),
    ("too_large", r"gradients\[0\]: 12800 elements exceed the limit of 6400"),
    ("dtype", r"gradients\[0\]: dtype int32, expected a float dtype"),
    ("codec", r"gradients\[0\]: codec 'int8' was not negotiated"),
    ("count", r"2 gradients for 1 cut tensors"),
])
def test_link_refuses_a_gradient_that_does_not_fit_what_it_sent(scripted, kind, message):
    servicer, link = scripted
    servicer.gradients = _wrong_gradient(kind)
    link = link()
    with pytest.raises(LinkError, match=message):
        link.exchange("train", [np.ones((8, 5, 5, 32), "float32")], np.zeros(8, "int64"))


def test_link_message_limit_is_derived_from_the_cut(scripted, monkeypatch):
    channels = []
    real = grpc.insecure_channel

    def recording(target, options=None, **kwargs):
        channels.append(dict(options))
        return real(target, options=options, **kwargs)

    monkeypatch.setattr(grpc, "insecure_channel", recording)
    _, link = scripted
    link = link()
    # The demo cut: 5 * 5 * 32 float32 values, 3200 bytes a sample.
    want = rpc.message_limit([5 * 5 * 32 * 4], rpc.CLIENT_MAX_BATCH)
    assert link.message_limit == want
    assert len(channels) == 1
    assert channels[0]["grpc.max_send_message_length"] == want
    assert channels[0]["grpc.max_receive_message_length"] == want


def test_link_reports_a_tls_failure_with_the_fix_and_does_not_retry(network, tmp_path):
    other = write_dev_certificates(tmp_path / "other")  # a CA that did not sign the server
    server = _server(network)
    try:
        for hint in ("root_certificates", "--ca"):
            link = ServerLink(f"127.0.0.1:{server.port}", token="device",
                              root_certificates=other["ca"], tls_hint=hint, retry_for=60.0)
            start = time.monotonic()
            with pytest.raises(rpc.LinkDownError, match=rf"TLS handshake with 127.0.0.1:"
                                                        rf"{server.port} failed .*Check that "
                                                        rf"{hint} is the CA that signed"):
                link.open(CUT)
            link.close()
            # Failing fast: a certificate problem is not retried for `retry_for`.
            assert time.monotonic() - start < 15
    finally:
        server.stop()


# -- the device keeps training through refusals and resumes after a crash ----------


def _edge_client(network, server, export, state_dir=None, **options):
    return EdgeClient(export, f"127.0.0.1:{server.port}", state_dir=state_dir, token="edge",
                      root_certificates=network["certs"]["ca"], **options)


def _assert_weights_equal(got, want):
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_refused_batch_is_reported_and_skipped_and_the_session_goes_on(network, capsys):
    export = _export(network, "tflite")
    x, y = network["shards"][0]
    bad = y.copy()
    bad[70] = 7  # batch 3 of 4: the demo CNN has two classes
    server, reference_server = _server(network), _server(network)
    try:
        device = _edge_client(network, server, export)
        history = device.fit(x, bad, batch_size=32, epochs=1, shuffle=False)
        # Reference: the same run on the data without that batch.
        keep = np.r_[0:64, 96:128]
        reference = _edge_client(network, reference_server, export)
        want = reference.fit(x[keep], y[keep], batch_size=32, epochs=1, shuffle=False)
        assert device.link.step == reference.link.step == 3
        device.close()
        reference.close()
    finally:
        server.stop()
        reference_server.stop()
    assert history["refused"] == [1] and want["refused"] == [0]
    printed = capsys.readouterr().out
    assert re.search(r"epoch 1/1, batch 3/4: skipped\. The server rejected the message: .*7",
                     printed), printed
    _assert_weights_equal(device.model.get_weights(), reference.model.get_weights())
    _assert_weights_equal(server.role.model.get_weights(),
                          reference_server.role.model.get_weights())


class _Crash(Exception):
    """The device dies (its process would be killed here)."""


def _crash_at(client, step, after_reply):
    """Make `client` die at its `step`-th exchange: before sending it, or after the
    server applied it and before the device trained on and saved it."""
    real, calls = client.link.exchange, []

    def exchange(*args, **kwargs):
        calls.append(1)
        if len(calls) == step and not after_reply:
            raise _Crash
        result = real(*args, **kwargs)
        if len(calls) == step:
            raise _Crash
        return result

    client.link.exchange = exchange


FIT = dict(batch_size=32, epochs=2, seed=0)


@pytest.fixture(scope="module")
def uninterrupted(network):
    """Device and server weights and history after FIT on shard 0, without a crash."""
    export = _export(network, "tflite")
    x, y = network["shards"][0]
    server = _server(network)
    try:
        client = _edge_client(network, server, export)
        history = client.fit(x, y, verbose=0, **FIT)
        client.close()
    finally:
        server.stop()
    return dict(device=client.model.get_weights(), server=server.role.model.get_weights(),
                history=history)


@pytest.mark.parametrize(("step", "after_reply"), [(6, False), (6, True), (4, True)],
                         ids=["before-send", "after-reply", "after-reply-at-epoch-end"])
def test_a_crashed_device_resumes_its_session_and_ends_as_if_uninterrupted(
        network, uninterrupted, tmp_path, capsys, step, after_reply):
    export = _export(network, "tflite")
    x, y = network["shards"][0]
    state = tmp_path / "device"
    server = _server(network)
    try:
        first = _edge_client(network, server, export, state_dir=state)
        _crash_at(first, step, after_reply)
        with pytest.raises(_Crash):
            first.fit(x, y, **FIT)
        first.close()
        device = _edge_client(network, server, export, state_dir=state)
        assert device.link.session_id == first.link.session_id
        with pytest.raises(ValueError, match=r"trained on other data \(saved: 128 samples, "
                                             r"sha256 \w+; now: 127 samples"):
            device.fit(x[:-1], y[:-1], **FIT)
        with pytest.raises(ValueError, match=r"with other arguments .*'batch_size': 16"):
            device.fit(x, y, **{**FIT, "batch_size": 16})
        capsys.readouterr()
        history = device.fit(x, y, **FIT)
        device.close()
    finally:
        server.stop()
    epoch, batch = divmod(step - 1, 4)
    assert f"Resuming the fit at epoch {epoch + 1}/2, batch {batch + 1}/4 (session " \
           f"{first.link.session_id[:8]}, step {step - 1}" in capsys.readouterr().out
    assert device.link.step == 8
    _assert_weights_equal(device.model.get_weights(), uninterrupted["device"])
    _assert_weights_equal(server.role.model.get_weights(), uninterrupted["server"])
    # The resent step was counted once, and the history spans the whole fit.
    assert history["bytes_up"] == uninterrupted["history"]["bytes_up"]
    np.testing.assert_allclose(history["loss"], uninterrupted["history"]["loss"], rtol=1e-5)


def test_a_restart_after_a_crash_first_applies_the_step_the_server_took(network, tmp_path):
    export = _export(network, "tflite")
    x, y = network["shards"][0]
    server, reference_server = _server(network), _server(network)
    try:
        first = _edge_client(network, server, export, state_dir=tmp_path / "device")
        _crash_at(first, 3, after_reply=True)  # the server applied step 3, the device did not
        with pytest.raises(_Crash):
            first.fit(x, y, batch_size=32, seed=0, verbose=0)
        first.close()
        device = _edge_client(network, server, export, state_dir=tmp_path / "device")
        device.fit(x, y, batch_size=32, seed=0, verbose=0, restart=True)
        assert device.link.step == 3 + 4
        device.close()
        # Reference: the three batches the server took, then a whole new fit.
        taken = np.random.default_rng(0).permutation(len(x))[:96]
        reference = _edge_client(network, reference_server, export)
        reference.fit(x[taken], y[taken], batch_size=32, shuffle=False, verbose=0)
        reference.fit(x, y, batch_size=32, seed=0, verbose=0)
        reference.close()
    finally:
        server.stop()
        reference_server.stop()
    _assert_weights_equal(device.model.get_weights(), reference.model.get_weights())
    _assert_weights_equal(server.role.model.get_weights(),
                          reference_server.role.model.get_weights())


def test_rerunning_a_finished_fit_trains_nothing_more_unless_restarted(network, tmp_path,
                                                                      capsys):
    export = _export(network, "tflite")
    x, y = network["shards"][0]
    state = tmp_path / "device"
    server = _server(network)
    try:
        first = _edge_client(network, server, export, state_dir=state)
        history = first.fit(x, y, batch_size=64, epochs=1, seed=0)
        first.close()
        weights = server.role.model.get_weights()
        again = _edge_client(network, server, export, state_dir=state)
        capsys.readouterr()
        assert again.fit(x, y, batch_size=64, epochs=1, seed=0) == history
        assert "already finished (1 epoch(s), step 2); nothing to train" in \
            capsys.readouterr().out
        assert again.link.step == 2
        _assert_weights_equal(again.model.get_weights(), first.model.get_weights())
        _assert_weights_equal(server.role.model.get_weights(), weights)
        again.fit(x, y, batch_size=64, epochs=1, seed=0, restart=True, verbose=0)
        assert again.link.step == 4  # a new fit, in the same session
        again.close()
    finally:
        server.stop()


def _cli(network, server, capsys, *extra, token="edge", ca=None):
    command = ["train", "--model", str(_export(network, "tflite")),
               "--server", f"127.0.0.1:{server if isinstance(server, int) else server.port}",
               "--token", token, "--ca", str(ca or network["certs"]["ca"]),
               "--data", str(network["folder"] / "shard0.npz"), "--x-key", "x", "--y-key", "y",
               "--batch-size", "32", "--retry-for", "1", *extra]
    code = edge_main(command)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_resumes_with_one_line_and_reports_errors_in_one_line(network, tmp_path, capsys):
    other = write_dev_certificates(tmp_path / "other")  # a CA that did not sign the server
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens there
    x, y = network["shards"][0]
    state = tmp_path / "device"
    server = _server(network)
    try:
        crashed = _edge_client(network, server, _export(network, "tflite"), state_dir=state)
        _crash_at(crashed, 3, after_reply=True)
        with pytest.raises(_Crash):
            crashed.fit(x, y, batch_size=32, seed=0, verbose=0)
        crashed.close()
        # Resuming with other arguments is refused before anything is sent.
        other_arguments = _cli(network, server, capsys, "--state-dir", str(state),
                               "--epochs", "2")
        code, out, err = _cli(network, server, capsys, "--state-dir", str(state))
        assert code == 0, err
        resumed = [line for line in out.splitlines() if "Resuming" in line]
        assert resumed == [f"Resuming the fit at epoch 1/1, batch 3/4 (session "
                           f"{crashed.link.session_id[:8]}, step 2, state in {state})."]
        failures = {
            "token": _cli(network, server, capsys, token="wrong"),
            "unreachable": _cli(network, closed, capsys),
            "tls": _cli(network, server, capsys, ca=other["ca"]),
            "other arguments": other_arguments,
        }
        # A device state whose session the server never held (a server that
        # lost its state, say).
        lost = tmp_path / "lost"
        load(_export(network, "tflite")).save(
            lost, progress={**saved_progress(state), "session_id": "0" * 32, "step": 5})
        failures["session"] = _cli(network, server, capsys, "--state-dir", str(lost))
        failures["data"] = _cli(network, server, capsys, "--data", str(lost / "none.npz"))
        # The same from a device's process: the exit status and one line, no traceback.
        command = [sys.executable, str(HERE / "edge_blocked.py"), "train",
                   "--model", str(_export(network, "tflite")),
                   "--server", f"127.0.0.1:{server.port}", "--token", "wrong",
                   "--ca", str(network["certs"]["ca"]),
                   "--data", str(network["folder"] / "shard0.npz"), "--x-key", "x", "--y-key", "y"]
        process = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    expected = {
        "token": r"The server refused our credentials .*Check the token",
        "unreachable": rf"Call to the split server at 127.0.0.1:{closed} failed: UNAVAILABLE",
        "tls": r"TLS handshake with .* failed .*Check that --ca is the CA",
        "other arguments": r"Cannot resume the fit saved in .* with other arguments",
        "data": r"Cannot read the data file .*none\.npz: no such file\. Pass --data",
        "session": r"Cannot resume session 0{32} at step 5, saved in .*: The server does not "
                   r"know this session",
    }
    for name, (code, _, err) in failures.items():
        assert code == 1, (name, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert re.match(rf"error: {expected[name]}", err), (name, err)
    # Only our line: the runtime's own C++ logging ("INFO: Created TensorFlow
    # Lite XNNPACK delegate") is not ours to silence.
    assert process.returncode == 1 and "Traceback" not in process.stderr, process.stderr
    assert [line for line in process.stderr.splitlines() if "error" in line.lower()] == [
        "error: The server refused our credentials (missing or unknown bearer token). Check "
        "the token (and client certificate, with mutual TLS)."], process.stderr
