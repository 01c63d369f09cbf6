"""Training steps on one `Steps` stream per session (what `GrpcTransport` uses by
default): the same results and guarantees as one `Step` call per step."""

import queue
import threading
import time
from concurrent import futures

import grpc
import keras
import numpy as np
import pytest

import keras_split
from keras_split.network import convert as wire
from keras_split.network import devcerts as certs
from keras_split.network.client import SplitClient
from keras_split.network.emulator import LinkEmulator
from keras_split.network.server import SplitServer
from keras_split_wire import SERVICE, rpc
from keras_split_wire.proto import split_pb2 as pb
from keras_split_wire.proto import split_pb2_grpc as pb_grpc
from tests import models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
TOKEN = "token-a"


@pytest.fixture(scope="module")
def ca():
    return certs.Authority()


@pytest.fixture(scope="module")
def server_pair(ca):
    return ca.issue("localhost")


def _serve(split, pair, **options):
    options.setdefault("tokens", {TOKEN: "hospital-a", "token-b": "hospital-b"})
    return SplitServer(split.server, LOSS, keras.optimizers.SGD(0.1),
                       certificate=pair.certificate, private_key=pair.private_key,
                       **options).start()


def _reference(model, x, y, epochs=1):
    twin, cut = models.small_cnn()
    twin.set_weights(model.get_weights())
    local = keras_split.split(twin, cut)
    local.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    history = local.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    return twin, history


def _assert_same_weights(model, twin):
    for a, b in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("stream", [True, False])
def test_training_over_the_stream_equals_in_process(ca, server_pair, rng, stream):
    model, cut = models.small_cnn()
    x, y = models.inputs_for(model, 80, rng), rng.integers(0, 3, 80)
    twin, want = _reference(model, x, y)
    split = keras_split.split(model, cut)
    server = _serve(split, server_pair)
    try:
        client = SplitClient(split.client, server=f"127.0.0.1:{server.port}", token=TOKEN,
                             root_certificates=ca.pem, stream=stream)
        client.compile(optimizer=keras.optimizers.SGD(0.1))
        got = client.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        steps = client.transport._steps
        # All ten steps went over one stream (or, with stream=False, none).
        assert (steps.opened if stream else steps) == (1 if stream else None)
        client.transport.close()
    finally:
        server.stop()
    _assert_same_weights(model, twin)
    assert got.history["loss"][0] == pytest.approx(want.history["loss"][0], rel=1e-6)
    # The same messages either way: payload plus under 128 bytes of framing a step.
    framing = got.history["bytes_up"][0] - want.history["bytes_up"][0]
    assert 0 < framing <= 10 * 128


@pytest.mark.parametrize("compression", ["float16", "topk:0.3"])
def test_compressed_training_over_the_stream_equals_in_process(ca, server_pair, rng,
                                                                compression):
    model, cut = models.small_cnn()
    twin, _ = models.small_cnn()
    twin.set_weights(model.get_weights())
    x, y = models.inputs_for(model, 48, rng), rng.integers(0, 3, 48)
    local = keras_split.split(twin, cut)
    local.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, compression=compression)
    local.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    split = keras_split.split(model, cut)
    server = _serve(split, server_pair)
    try:
        client = SplitClient(split.client, server=f"127.0.0.1:{server.port}", token=TOKEN,
                             root_certificates=ca.pem, compression=compression)
        client.compile(optimizer=keras.optimizers.SGD(0.1))
        client.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        assert client.transport._steps.opened == 1
    finally:
        server.stop()
    _assert_same_weights(model, twin)


# -- the raw stream: retransmission, refusals, credentials ------------------------


@pytest.fixture
def raw(server_pair, ca):
    """A running server, an open session, and a way to open raw `Steps` streams."""
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    server = _serve(split, server_pair)
    channel = grpc.secure_channel(f"127.0.0.1:{server.port}",
                                  grpc.ssl_channel_credentials(root_certificates=ca.pem))
    stub = pb_grpc.SplitLearningStub(channel)
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    open_request = pb.OpenRequest(protocol_version=wire.PROTOCOL_VERSION,
                                  cut=[wire.spec_to_pb(s) for s in split.cut_specs])
    session = stub.Open(open_request, metadata=metadata, timeout=10).session_id

    def stream(token=TOKEN, **policy):
        return rpc.Stream(stub.Steps, (("authorization", f"Bearer {token}"),),
                          rpc.Retry(**{"timeout": 10.0, "retry_for": 0.0, **policy}),
                          f"127.0.0.1:{server.port}")

    yield split, server, channel, session, stream
    channel.close()
    server.stop()


def _request(session, step, batch=4):
    rng = np.random.default_rng(step)
    message = keras_split.Activations(
        step, "train", (rng.normal(size=(batch, 3, 3, 4)).astype("float32"),),
        labels=rng.integers(0, 3, batch))
    return wire.request_to_pb(session, message)


def _weights(split):
    return [w.copy() for w in split.server.get_weights()]


def _assert_unchanged(before, split):
    for a, b in zip(before, split.server.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_resent_step_on_the_stream_gets_the_cached_reply_and_changes_nothing(raw):
    split, _, _, session, stream = raw
    steps = stream()
    first = steps.exchange(_request(session, 1))
    after_one = _weights(split)
    again = steps.exchange(_request(session, 1))
    assert again == first
    _assert_unchanged(after_one, split)
    # The stream goes on: the next step is applied.
    assert steps.exchange(_request(session, 2)).step == 2
    assert steps.opened == 1
    steps.close()


def test_a_resent_step_on_a_new_stream_gets_the_cached_reply(raw):
    split, _, _, session, stream = raw
    first = stream().exchange(_request(session, 1))
    after_one = _weights(split)
    assert stream().exchange(_request(session, 1)) == first
    _assert_unchanged(after_one, split)


@pytest.mark.parametrize("kind", ["shape", "dtype", "nan", "codec"])
def test_a_bad_tensor_on_the_stream_is_refused_and_changes_nothing(raw, kind):
    split, server, _, session, stream = raw
    request = _request(session, 1)
    tensor = request.activations[0]
    if kind == "shape":
        tensor.shape[:] = [4, 4, 3, 3]
    elif kind == "dtype":
        tensor.dtype, tensor.data = "float64", tensor.data + tensor.data
    elif kind == "nan":
        array = np.frombuffer(tensor.data, "float32").copy()
        array[5] = np.nan
        tensor.data = array.tobytes()
    else:
        tensor.codec = "pickle"
    before = _weights(split)
    steps = stream()
    with pytest.raises(rpc.RejectedError, match=r"rejected the message: activations\[0\]"):
        steps.exchange(request)
    _assert_unchanged(before, split)
    (state,) = server.sessions.values()
    assert (state.last_step, state.cached) == (0, None)
    # The refusal ended that stream; the next step goes out on a new one.
    assert steps.exchange(_request(session, 1)).step == 1
    assert steps.opened == 2


def test_a_stale_step_on_the_stream_is_refused(raw):
    split, _, _, session, stream = raw
    steps = stream()
    steps.exchange(_request(session, 1))
    before = _weights(split)
    with pytest.raises(keras_split.ServerError, match="stale or out of order; expected 2"):
        steps.exchange(_request(session, 3))
    _assert_unchanged(before, split)


@pytest.mark.parametrize("token", ["wrong", ""])
def test_a_wrong_token_on_the_stream_is_refused(raw, token):
    split, _, _, session, stream = raw
    before = _weights(split)
    with pytest.raises(rpc.CredentialsError, match="refused our credentials"):
        stream(token=token).exchange(_request(session, 1))
    _assert_unchanged(before, split)


def test_another_clients_session_is_denied_on_the_stream(raw):
    split, _, _, session, stream = raw
    before = _weights(split)
    with pytest.raises(rpc.CredentialsError, match="belongs to another client"):
        stream(token="token-b").exchange(_request(session, 1))
    _assert_unchanged(before, split)


def test_every_message_of_a_stream_is_checked_against_its_session(raw):
    split, _, _, session, stream = raw
    steps = stream()
    steps.exchange(_request(session, 1))
    before = _weights(split)
    with pytest.raises(keras_split.ServerError, match="unknown or expired session"):
        steps.exchange(_request("not-a-session", 2))
    _assert_unchanged(before, split)


def test_a_message_that_is_not_a_step_request_ends_the_stream(raw):
    _, _, channel, session, _ = raw
    requests = queue.SimpleQueue()
    call = channel.stream_stream(f"/{SERVICE}/Steps")(
        iter(requests.get, None), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
    requests.put(_request(session, 1).SerializeToString())
    assert pb.StepReply.FromString(next(call)).step == 1
    requests.put(b"\xff\xff\xff")  # not a protobuf message
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in info.value.details()
    requests.put(None)


# -- reconnection, idle streams, deadlines, older servers -------------------------


class _DropLink(keras.callbacks.Callback):
    """Aborts every connection of the link before chosen batches, and brings the
    link back (at once, or after `down` seconds)."""

    def __init__(self, link, at, down=0.0):
        super().__init__()
        self.link, self.at, self.down, self.batch = link, set(at), down, 0

    def on_train_batch_begin(self, batch, logs=None):
        self.batch += 1
        if self.batch in self.at:
            port = self.link.port
            self.link.stop()
            self.link._bind = ("127.0.0.1", port)
            if self.down:
                threading.Timer(self.down, self.link.start).start()
            else:
                self.link.start()


def test_a_dropped_stream_reconnects_and_training_is_unchanged(ca, server_pair, rng):
    model, cut = models.small_cnn()
    x, y = models.inputs_for(model, 80, rng), rng.integers(0, 3, 80)
    twin, want = _reference(model, x, y, epochs=2)
    split = keras_split.split(model, cut)
    server = _serve(split, server_pair)
    link = LinkEmulator(("127.0.0.1", server.port)).start()
    try:
        client = SplitClient(split.client, server=f"127.0.0.1:{link.port}", token=TOKEN,
                             root_certificates=ca.pem, backoff=0.05)
        client.compile(optimizer=keras.optimizers.SGD(0.1))
        dropper = _DropLink(link, at={4, 13}, down=0.0)
        got = client.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                         callbacks=[dropper])
        assert client.transport._steps.opened >= 3  # the first, and one per drop
        client.transport.close()
    finally:
        link.stop()
        server.stop()
    _assert_same_weights(model, twin)
    np.testing.assert_allclose(got.history["loss"], want.history["loss"], rtol=1e-5)


def test_a_link_down_for_a_while_is_retried_within_the_budget(ca, server_pair, rng):
    model, cut = models.small_cnn()
    x, y = models.inputs_for(model, 32, rng), rng.integers(0, 3, 32)
    twin, _ = _reference(model, x, y)
    split = keras_split.split(model, cut)
    server = _serve(split, server_pair)
    link = LinkEmulator(("127.0.0.1", server.port)).start()
    try:
        client = SplitClient(split.client, server=f"127.0.0.1:{link.port}", token=TOKEN,
                             root_certificates=ca.pem, backoff=0.05, max_backoff=0.2)
        client.compile(optimizer=keras.optimizers.SGD(0.1))
        client.fit(x, y, batch_size=8, shuffle=False, verbose=0,
                   callbacks=[_DropLink(link, at={2}, down=0.5)])
        client.transport.close()
    finally:
        link.stop()
        server.stop()
    _assert_same_weights(model, twin)


def test_a_stream_idle_too_long_is_ended_and_the_client_opens_another(ca, server_pair, rng,
                                                                      caplog):
    model, cut = models.small_cnn()
    x, y = models.inputs_for(model, 16, rng), rng.integers(0, 3, 16)
    twin, _ = _reference(model, x, y, epochs=2)
    split = keras_split.split(model, cut)
    server = _serve(split, server_pair, stream_idle_timeout=0.2)
    try:
        client = SplitClient(split.client, server=f"127.0.0.1:{server.port}", token=TOKEN,
                             root_certificates=ca.pem)
        client.compile(optimizer=keras.optimizers.SGD(0.1))
        client.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        with caplog.at_level("INFO", logger="keras_split.server"):
            time.sleep(0.6)  # the server ends the idle stream
            assert "event=stream.idle client=hospital-a" in caplog.text
            client.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        assert client.transport._steps.opened == 2
        # The ended stream holds no call slot of its client; the new one does.
        assert not server._in_flight and dict(server._idle_streams) == {"hospital-a": 1}
        client.transport.close()
    finally:
        server.stop()
    _assert_same_weights(model, twin)
    with pytest.raises(ValueError, match="stream_idle_timeout"):
        _serve(split, server_pair, stream_idle_timeout=0)


def test_an_open_stream_holds_one_call_slot_of_its_client(ca, server_pair, rng):
    model, cut = models.small_cnn()
    x, y = models.inputs_for(model, 16, rng), rng.integers(0, 3, 16)
    split = keras_split.split(model, cut)
    server = _serve(split, server_pair, max_calls_per_client=2)
    try:
        client = SplitClient(split.client, server=f"127.0.0.1:{server.port}", token=TOKEN,
                             root_certificates=ca.pem)
        client.compile(optimizer=keras.optimizers.SGD(0.1))
        client.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        assert dict(server._idle_streams) == {"hospital-a": 1}
        assert not server._in_flight  # nothing in flight: rounds can tell the clients are done
        # The same client can still open (and train on) a second session.
        other = SplitClient(split.client, server=f"127.0.0.1:{server.port}", token=TOKEN,
                            root_certificates=ca.pem)
        other.compile(optimizer=keras.optimizers.SGD(0.1))
        other.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        # Two open streams fill its two slots: a third call is refused, with the limit.
        third = SplitClient(split.client, server=f"127.0.0.1:{server.port}", token=TOKEN,
                            root_certificates=ca.pem)
        with pytest.raises(keras_split.ServerError, match="max_calls_per_client=2"):
            third.compile(optimizer=keras.optimizers.SGD(0.1))
        client.transport.close()
        other.transport.close()
        deadline = time.monotonic() + 5
        while server._idle_streams and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not server._idle_streams  # closing a transport ends its stream
    finally:
        server.stop()


class _Silent:
    """A `Steps` server that reads requests and never answers."""

    def __init__(self):
        self.server = grpc.server(futures.ThreadPoolExecutor(2))

        def steps(requests, context):
            for _ in requests:
                time.sleep(5)
            return iter(())

        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {"Steps": grpc.stream_stream_rpc_method_handler(steps)}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def test_a_reply_overdue_on_the_stream_fails_after_the_deadline():
    silent = _Silent()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{silent.port}") as channel:
            steps = rpc.Stream(pb_grpc.SplitLearningStub(channel).Steps, (),
                               rpc.Retry(timeout=0.3, retry_for=0), f"127.0.0.1:{silent.port}")
            start = time.monotonic()
            with pytest.raises(rpc.LinkDownError, match="DEADLINE_EXCEEDED.*0.3 s"):
                steps.exchange(pb.StepRequest(step=1))
            assert 0.3 <= time.monotonic() - start < 2.0
            steps.close()
    finally:
        silent.server.stop(None)


def test_a_server_without_the_stream_gets_one_call_per_step(ca, server_pair, rng):
    model, cut = models.small_cnn()
    x, y = models.inputs_for(model, 32, rng), rng.integers(0, 3, 32)
    twin, _ = _reference(model, x, y)
    split = keras_split.split(model, cut)
    server = _serve(split, server_pair)
    try:
        client = SplitClient(split.client, server=f"127.0.0.1:{server.port}", token=TOKEN,
                             root_certificates=ca.pem)
        client.compile(optimizer=keras.optimizers.SGD(0.1))
        # An older server answers the stream's method with UNIMPLEMENTED.
        client.transport._steps._method = client.transport._channel.stream_stream(
            f"/{SERVICE}/NoSuchMethod", request_serializer=pb.StepRequest.SerializeToString,
            response_deserializer=pb.StepReply.FromString)
        client.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        assert client.transport._steps is None  # fell back to Step calls
        client.transport.close()
    finally:
        server.stop()
    _assert_same_weights(model, twin)


def test_a_refused_certificate_fails_fast_on_the_stream(ca, server_pair, rng):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    server = _serve(split, server_pair)
    try:
        with grpc.secure_channel(f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(
                root_certificates=certs.Authority("other").pem)) as channel:
            steps = rpc.Stream(pb_grpc.SplitLearningStub(channel).Steps, (), rpc.Retry(),
                               f"127.0.0.1:{server.port}", tls_hint="--ca")
            start = time.monotonic()
            with pytest.raises(rpc.LinkDownError, match="TLS handshake.*--ca"):
                steps.exchange(pb.StepRequest(step=1))
            assert time.monotonic() - start < 10
    finally:
        server.stop()
