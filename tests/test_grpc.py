"""Split learning over gRPC on loopback: equivalence, TLS, authentication, and
refusal of bad messages without any change of server state."""

import logging

import grpc
import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_split
from keras_split.network import convert as wire
from keras_split.network import devcerts as certs
from keras_split.network.client import SplitClient
from keras_split.network.server import SplitServer
from keras_split_wire import tensors
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


def _serve(split, ca_pair, **options):
    options.setdefault("tokens", {TOKEN: "hospital-a", "token-b": "hospital-b"})
    if not options.get("insecure"):
        options.setdefault("certificate", ca_pair.certificate)
        options.setdefault("private_key", ca_pair.private_key)
    return SplitServer(split.server, LOSS, keras.optimizers.SGD(0.1), **options).start()


def _client(split, server, ca, **options):
    options.setdefault("token", TOKEN)
    options.setdefault("root_certificates", ca.pem)
    return SplitClient(split.client, server=f"127.0.0.1:{server.port}", **options)


def test_training_over_grpc_equals_in_process(ca, server_pair, rng):
    model, cut = models.small_cnn()
    twin, _ = models.small_cnn()
    twin.set_weights(model.get_weights())
    x, y = models.inputs_for(model, 80, rng), rng.integers(0, 3, 80)

    local = keras_split.split(twin, cut)
    local.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    want = local.fit(x, y, batch_size=8, shuffle=False, verbose=0)

    split = keras_split.split(model, cut)
    server = _serve(split, server_pair)
    try:
        client = _client(split, server, ca)
        client.compile(optimizer=keras.optimizers.SGD(0.1))
        got = client.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        predictions = client.predict(x[:5], verbose=0)
    finally:
        server.stop()
    for a, b in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert got.history["loss"][0] == pytest.approx(want.history["loss"][0], rel=1e-6)
    np.testing.assert_allclose(predictions, local.merge()(x[:5]), atol=1e-5)
    # On the wire: the payload plus protobuf framing (session id, step, dtype and
    # shape fields), under 128 bytes for each of the 10 requests.
    framing = got.history["bytes_up"][0] - want.history["bytes_up"][0]
    assert 0 < framing <= 10 * 128


@pytest.mark.parametrize("compression", ["float16", "int8", "topk:0.3"])
def test_compressed_training_over_grpc_equals_in_process(ca, server_pair, rng, compression):
    model, cut = models.small_cnn()
    twin, _ = models.small_cnn()
    twin.set_weights(model.get_weights())
    x, y = models.inputs_for(model, 48, rng), rng.integers(0, 3, 48)
    local = keras_split.split(twin, cut)
    local.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, compression=compression)
    want = local.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    split = keras_split.split(model, cut)
    server = _serve(split, server_pair)
    try:
        client = _client(split, server, ca)
        client.compile(optimizer=keras.optimizers.SGD(0.1), compression=compression)
        got = client.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    finally:
        server.stop()
    for a, b in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Encoded payload plus framing (codec name, scale fields): under 160 bytes
    # for each of the 6 requests and 6 replies.
    for direction in ("bytes_up", "bytes_down"):
        framing = got.history[direction][0] - want.history[direction][0]
        assert 0 < framing <= 6 * 160, (direction, framing)


def test_server_refuses_a_codec_it_does_not_allow(ca, server_pair):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    server = _serve(split, server_pair, allowed_compression=("float16",))
    try:
        with pytest.raises(keras_split.ServerError, match=r"compression 'int8' is not accepted; "
                           r"this server accepts \['float16', 'none'\]"):
            _client(split, server, ca).compile("sgd", compression="int8")
        _client(split, server, ca).compile("sgd", compression="float16")
    finally:
        server.stop()
    with pytest.raises(ValueError, match="Unknown codecs in `allowed_compression`: \\['lz4'\\]"):
        _serve(split, server_pair, allowed_compression=("lz4",))


def test_mutual_tls(ca, server_pair, rng):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    server = _serve(split, server_pair, client_ca=ca.pem)
    x, y = models.inputs_for(model, 8, rng), rng.integers(0, 3, 8)
    try:
        with pytest.raises(ConnectionError):
            _client(split, server, ca, retry_for=0).compile("sgd")
        client_pair = ca.issue("hospital-a")
        client = _client(split, server, ca, certificate=client_pair.certificate,
                         private_key=client_pair.private_key)
        client.compile("sgd")
        client.fit(x, y, verbose=0)
        rogue = certs.Authority("rogue").issue("hospital-a")
        with pytest.raises(ConnectionError):
            _client(split, server, ca, certificate=rogue.certificate,
                    private_key=rogue.private_key, retry_for=0).compile("sgd")
    finally:
        server.stop()


def test_mutual_tls_identifies_clients_by_certificate(ca, server_pair, rng):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    server = _serve(split, server_pair, client_ca=ca.pem, tokens={"token-b": "hospital-b"})
    x, y = models.inputs_for(model, 8, rng), rng.integers(0, 3, 8)
    pair_a, pair_b = ca.issue("hospital-a"), ca.issue("hospital-b")
    try:
        # No token: the certificate alone says who this is.
        client = _client(split, server, ca, token=None, certificate=pair_a.certificate,
                         private_key=pair_a.private_key)
        client.compile("sgd")
        client.fit(x, y, verbose=0)
        (session,) = server._sessions.values()
        assert session.client_id == "hospital-a"
        # hospital-b's certificate cannot drive hospital-a's session.
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.pem, private_key=pair_b.private_key,
            certificate_chain=pair_b.certificate)
        with grpc.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
            stub = pb_grpc.SplitLearningStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Step(_request(client.transport.session_id, 2), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # A token that is presented must be known, certificate or not.
        with pytest.raises(PermissionError, match="missing or unknown bearer token"):
            _client(split, server, ca, token="forged", certificate=pair_a.certificate,
                    private_key=pair_a.private_key).compile("sgd")
        # A token and a certificate naming different clients are refused.
        with pytest.raises(PermissionError, match="the token belongs to 'hospital-b' but the "
                                                  "client certificate to 'hospital-a'"):
            _client(split, server, ca, token="token-b", certificate=pair_a.certificate,
                    private_key=pair_a.private_key).compile("sgd")
    finally:
        server.stop()
    with pytest.raises(ValueError, match="Clients must authenticate"):
        _serve(split, server_pair, tokens=None)


@pytest.mark.parametrize("trust", ["wrong_ca", "self_signed_server"])
def test_untrusted_server_certificate_fails_fast(trust, ca, server_pair):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    pair = certs.self_signed() if trust == "self_signed_server" else server_pair
    server = _serve(split, pair)
    try:
        root = certs.Authority("other").pem
        with pytest.raises(ConnectionError, match="TLS handshake"):
            _client(split, server, ca, root_certificates=root).compile("sgd")
    finally:
        server.stop()


@pytest.mark.parametrize("token", ["wrong", ""])
def test_bad_token_is_refused(token, ca, server_pair):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    server = _serve(split, server_pair)
    try:
        with pytest.raises(PermissionError, match="refused our credentials"):
            _client(split, server, ca, token=token).compile("sgd")
    finally:
        server.stop()


def test_a_client_under_tf_distribute_is_refused_before_it_opens_a_session():
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model, cut = models.small_cnn()
    built_in_scope = keras_split.split(model, cut)
    # Port 9 (discard): nothing answers there, so a client that tried to open a
    # session would fail with a ConnectionError, not a ValueError.
    options = dict(server="127.0.0.1:9", token=TOKEN, insecure=True, retry_for=0)
    client = SplitClient(built_in_scope.client, **options)
    with pytest.raises(ValueError, match=r"`SplitClient.compile\(\)` cannot train distributed "
                                         r"variables: 'conv1' holds MirroredVariables"):
        client.compile("sgd")
    assert client.transport is None
    model, cut = models.small_cnn()
    plain = SplitClient(keras_split.split(model, cut).client, **options)
    with strategy.scope(), pytest.raises(ValueError, match=r"`SplitClient.compile\(\)` was "
                                         r"called inside the scope of a tf.distribute "
                                         r"MirroredStrategy"):
        plain.compile("sgd")
    assert plain.transport is None


def test_tls_is_required_unless_insecure(caplog):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    with pytest.raises(ValueError, match=r"TLS is on by default: pass `certificate`"):
        SplitServer(split.server, LOSS, tokens={TOKEN: "a"})
    with caplog.at_level(logging.WARNING, logger="keras_split.network.server"):
        server = SplitServer(split.server, LOSS, tokens={TOKEN: "a"}, insecure=True)
    server.stop()
    assert "WITHOUT TLS" in caplog.text


def test_cut_mismatch_is_refused_at_open(ca, server_pair):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    server = _serve(split, server_pair)
    other = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3)])
    try:
        client = SplitClient(other, server=f"127.0.0.1:{server.port}", token=TOKEN,
                             root_certificates=ca.pem)
        with pytest.raises(keras_split.network.transport.ServerError,
                           match=r"cut mismatch: the client sends \[\(.float32., \(None, 6"):
            client.compile("sgd")
    finally:
        server.stop()


# -- raw protocol: retransmission, ordering, ownership, malformed messages ----------


@pytest.fixture
def raw(server_pair, ca):
    """A running server, its weights, and an authenticated raw stub per client."""
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    # The fuzz tests open a session per example; the per-client cap has its own test.
    server = _serve(split, server_pair, max_sessions_per_client=10_000)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.pem)
    channel = grpc.secure_channel(f"127.0.0.1:{server.port}", credentials)
    stub = pb_grpc.SplitLearningStub(channel)

    def call(method, request, token=TOKEN):
        return getattr(stub, method)(request, metadata=(("authorization", f"Bearer {token}"),),
                                     timeout=10)

    open_request = pb.OpenRequest(protocol_version=wire.PROTOCOL_VERSION,
                                  cut=[wire.spec_to_pb(s) for s in split.cut_specs])
    session = call("Open", open_request).session_id
    yield split, server, call, session
    channel.close()
    server.stop()


def _request(session, step, batch=4, rng=None):
    rng = rng or np.random.default_rng(step)
    message = keras_split.Activations(
        step, "train", (rng.normal(size=(batch, 3, 3, 4)).astype("float32"),),
        labels=rng.integers(0, 3, batch))
    return wire.request_to_pb(session, message)


def _weights(split):
    return [w.copy() for w in split.server.get_weights()]


def _assert_unchanged(before, split):
    for a, b in zip(before, split.server.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_retransmitted_step_is_applied_once(raw):
    split, _, call, session = raw
    first = call("Step", _request(session, 1))
    after_one = _weights(split)
    again = call("Step", _request(session, 1))
    assert again == first
    _assert_unchanged(after_one, split)


@pytest.mark.parametrize("step", [0, 3])
def test_stale_or_out_of_order_step_is_refused(raw, step):
    split, _, call, session = raw
    call("Step", _request(session, 1))
    before = _weights(split)
    with pytest.raises(grpc.RpcError) as info:
        call("Step", _request(session, step))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "stale or out of order; expected 2" in info.value.details()
    _assert_unchanged(before, split)


def test_another_clients_session_is_denied(raw):
    split, _, call, session = raw
    before = _weights(split)
    with pytest.raises(grpc.RpcError) as info:
        call("Step", _request(session, 1), token="token-b")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    _assert_unchanged(before, split)


def _corrupt(kind, request):
    tensor = request.activations[0]
    if kind == "dtype":
        tensor.dtype = "float64"
        tensor.data = tensor.data + tensor.data
    elif kind == "object_dtype":
        tensor.dtype = "object"
    elif kind == "shape":
        tensor.shape[:] = [4, 4, 3, 3]
    elif kind == "rank":
        tensor.shape[:] = [4, 36]
    elif kind == "length":
        tensor.data = tensor.data[:-4]
    elif kind == "nan":
        array = np.frombuffer(tensor.data, "float32").copy()
        array[5] = np.nan
        tensor.data = array.tobytes()
    elif kind == "inf":
        array = np.frombuffer(tensor.data, "float32").copy()
        array[0] = np.inf
        tensor.data = array.tobytes()
    elif kind == "labels_batch":
        request.labels[0].shape[:] = [3]
        request.labels[0].data = request.labels[0].data[:24]
    elif kind == "mode":
        request.mode = "format_disk"
    elif kind == "codec":
        tensor.codec = "pickle"
    return request


@pytest.mark.parametrize("kind", ["dtype", "object_dtype", "shape", "rank", "length", "nan",
                                  "inf", "labels_batch", "mode", "codec"])
def test_malformed_message_is_rejected_without_state_change(raw, kind):
    split, _, call, session = raw
    before = _weights(split)
    with pytest.raises(grpc.RpcError) as info:
        call("Step", _corrupt(kind, _request(session, 1)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "activations[0]" in info.value.details() or kind in ("labels_batch", "mode")
    _assert_unchanged(before, split)
    call("Step", _request(session, 1))  # the session still works


def test_label_outside_the_classes_is_rejected_without_state_change(raw):
    split, _, call, session = raw
    before = _weights(split)
    request = _request(session, 1)
    request.labels[0].CopyFrom(wire.encode(np.array([0, 1, 7, 2])))
    with pytest.raises(grpc.RpcError) as info:
        call("Step", request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "7" in info.value.details()
    _assert_unchanged(before, split)


def test_oversized_message_is_refused(server_pair, ca):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    server = _serve(split, server_pair, max_batch_size=8)
    try:
        client = _client(split, server, ca)
        client.compile("sgd")
        before = _weights(split)
        x = np.zeros((4096, 8, 8, 1), "float32")
        with pytest.raises((ValueError, ConnectionError)):
            client.fit(x, np.zeros(4096, "int64"), batch_size=4096, verbose=0)
        _assert_unchanged(before, split)
    finally:
        server.stop()


_tensors = st.builds(
    pb.Tensor,
    dtype=st.sampled_from(sorted(tensors.DTYPES) + ["object", "U8", "V4", "", "float32 "]),
    shape=st.lists(st.integers(-2, 6), max_size=5),
    data=st.binary(max_size=600),
    codec=st.sampled_from(["none", "", "int8", "zip"]),
)


@settings(max_examples=500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(activations=st.lists(_tensors, min_size=0, max_size=2),
       labels=st.lists(_tensors, max_size=2),
       mode=st.sampled_from(["train", "evaluate", "predict", "x"]))
def test_fuzzed_messages_never_change_state_unless_valid(raw, activations, labels, mode):
    split, _, call, session = raw
    before = _weights(split)
    request = pb.StepRequest(session_id=session, step=1, mode=mode, activations=activations,
                             labels=labels)
    try:
        call("Step", request)
    except grpc.RpcError as error:
        assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.FAILED_PRECONDITION), error.details()
        _assert_unchanged(before, split)


_compressed = st.builds(
    pb.Tensor,
    dtype=st.sampled_from(["float32", "float16", "int32"]),
    shape=st.sampled_from([[4, 3, 3, 4], [4, 3, 3], [2, 3, 3, 4], [4, 3, 3, 4, 1]]),
    data=st.binary(max_size=300),
    codec=st.sampled_from(["float16", "int8", "topk", "none"]),
    scale_exponent=st.integers(-3000, 3000),
    scale=st.floats(allow_nan=True, allow_infinity=True, width=32),
    zero_point=st.integers(-1000, 1000),
    indices=st.binary(max_size=200),
)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tensor=_compressed, codec=st.sampled_from(["float16", "int8", "topk"]))
def test_fuzzed_compressed_tensors_never_change_state(raw, tensor, codec):
    split, _, call, _ = raw
    open_request = pb.OpenRequest(protocol_version=wire.PROTOCOL_VERSION, codec=codec,
                                  cut=[wire.spec_to_pb(s) for s in split.cut_specs])
    session = call("Open", open_request).session_id
    before = _weights(split)
    request = _request(session, 1)
    request.activations[0].CopyFrom(tensor)
    try:
        call("Step", request)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        # A valid tensor of another batch size (top-k keeping no value is a
        # tensor of zeros) is refused for the labels' count, which it contradicts.
        other_batch = list(tensor.shape)[:1] != [4]
        assert "activations[0]" in error.details() or (
            other_batch and "labels[0]" in error.details()
            and "expected 2 samples first" in error.details()), error.details()
        _assert_unchanged(before, split)


def test_logs_keep_their_order_across_the_wire():
    names = ["loss", "zeta", "accuracy", "auc", "b"]
    reply = keras_split.Reply(step=1, logs={n: float(i) for i, n in enumerate(names)})
    decoded = wire.reply_from_pb(pb.StepReply.FromString(
        wire.reply_to_pb(reply).SerializeToString()), 10)
    assert list(decoded.logs) == names
