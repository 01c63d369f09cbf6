"""A hostile or broken peer against a real `SplitServer` on loopback.

The server half holds Dense, BatchNormalization and Dropout, trains with Adam
and tracks a metric: the state a bad message could corrupt. Each test plays one
attack and checks the refusal (its status code, never UNKNOWN) and that the
shared state (every variable of the model, the optimizer and the metrics) is
bitwise unchanged, and that honest clients are unaffected.
"""

import logging
import threading
import time

import grpc
import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_split
from keras_split import checkpoint
from keras_split.network import convert as wire
from keras_split.network.server import SplitServer
from keras_split_wire import SERVICE
from keras_split_wire.proto import split_pb2 as pb

TOKENS = {f"token-{i}": f"client-{i}" for i in range(80)}
HONEST = "token-0"


def _server_half():
    x = keras.Input((6,), name="cut")
    h = keras.layers.Dense(8, name="dense")(x)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Dropout(0.3, seed=3, name="dropout")(h)
    out = keras.layers.Dense(3, name="logits")(h)
    return keras.Model(x, out)


def _serve(start=True, **options):
    model = _server_half()
    options.setdefault("tokens", TOKENS)
    server = SplitServer(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                         keras.optimizers.Adam(0.01), metrics=["accuracy"], insecure=True,
                         **options)
    return server.start() if start else server


def _state(server):
    """Every variable the server's role owns, as bytes (weights, BatchNorm
    statistics, seed state, optimizer iterations and slots, metrics)."""
    return {k: v.tobytes() for k, v in server.role.state().items()}


class Peer:
    """A raw client: builds its own messages, as an attacker would."""

    def __init__(self, server, token=HONEST):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.step = 0

    def call(self, method, request, timeout=10):
        function = self.channel.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer={"Open": pb.OpenReply, "Step": pb.StepReply,
                                   "Turn": pb.TurnReply, "Report": pb.ReportReply}[method]
            .FromString)
        return function(request, metadata=self.metadata, timeout=timeout)

    def open(self):
        cut = [pb.CutTensorSpec(name="cut", dtype="float32", shape=[-1, 6])]
        self.session = self.call("Open", pb.OpenRequest(protocol_version=1, cut=cut)).session_id
        return self.session

    def request(self, x, y, sample_weight=None, reset_metrics=False, mode="train"):
        message = keras_split.Activations(self.step + 1, mode, (np.asarray(x, np.float32),),
                                          labels=y, sample_weight=sample_weight,
                                          reset_metrics=reset_metrics)
        return pb.StepRequest.FromString(
            wire.request_to_pb(self.session, message).SerializeToString())

    def train(self, x, y, **options):
        reply = self.call("Step", self.request(x, y, **options))
        self.step += 1
        return reply

    def refused(self, request, code):
        with pytest.raises(grpc.RpcError) as info:
            self.call("Step", request)
        assert info.value.code() == code, (info.value.code(), info.value.details())
        return info.value.details()

    def close(self):
        self.channel.close()


def _batch(rng, n=8):
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n)


@pytest.fixture
def served():
    server = _serve()
    peer = Peer(server)
    peer.open()
    yield server, peer
    peer.close()
    server.stop()


def test_poisoning_messages_are_refused_and_change_nothing(served, rng):
    server, peer = served
    peer.train(*_batch(rng))  # everything built: BatchNorm statistics, Adam slots, metrics
    before = _state(server)
    x, y = _batch(rng)
    attacks = {
        "empty batch": (peer.request(x[:0], y[:0]), "empty batch"),
        "label outside the classes": (peer.request(x, np.full(8, 7)), "label"),
        "activations of 3e38": (peer.request(np.full_like(x, 3e38), y), "activation"),
        "sample weight 1e38": (peer.request(x, y, np.full(8, 1e38, "float32")), "weight"),
        "negative sample weight": (peer.request(x, y, -np.ones(8, "float32")), "negative"),
        "refused message resetting metrics": (
            peer.request(x, np.full(8, 9), reset_metrics=True), "label"),
    }
    for name, (request, word) in attacks.items():
        details = peer.refused(request, grpc.StatusCode.INVALID_ARGUMENT)
        assert word in details.lower(), (name, details)
        assert _state(server) == before, f"{name} changed the server's state"
    # The honest client goes on, from where it was (the refused steps used no number).
    peer.train(x, y)
    assert _state(server) != before


def test_unknown_errors_are_internal_with_no_traceback_or_path(served, rng, monkeypatch):
    server, peer = served

    def broken(message):
        raise KeyError("/secret/server/path.py")

    monkeypatch.setattr(server.role, "handle", broken)
    details = peer.refused(peer.request(*_batch(rng)), grpc.StatusCode.INTERNAL)
    assert "incident" in details and "/secret" not in details and "Traceback" not in details


def _stalled(server, token, started):
    """A Step call that sends its headers and never its message."""
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    never = threading.Event()

    def requests():
        started.release()
        never.wait(30)
        return
        yield  # pragma: no cover

    call = channel.stream_unary(f"/{SERVICE}/Step", request_serializer=bytes,
                                response_deserializer=bytes)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    future = call.future(requests(), metadata=metadata, timeout=30)
    return channel, never, future


def test_stalled_calls_hold_nothing_an_honest_open_needs():
    server = _serve(max_workers=4, first_message_timeout=20)
    started = threading.Semaphore(0)
    stalls = [_stalled(server, None, started) for _ in range(64)]
    stalls += [_stalled(server, f"token-{i}", started) for i in range(1, 65)]
    try:
        for _ in stalls:
            assert started.acquire(timeout=10)
        time.sleep(0.5)
        # The unauthenticated ones were refused from their headers alone.
        refused = [f for _, _, f in stalls[:64] if f.done()]
        assert len(refused) == 64
        assert {f.exception().code() for f in refused} == {grpc.StatusCode.UNAUTHENTICATED}
        assert not any(f.done() for _, _, f in stalls[64:])  # 64 authenticated, still open
        peer = Peer(server)
        start = time.monotonic()
        peer.open()
        assert time.monotonic() - start < 1.0
        peer.close()
    finally:
        for channel, never, _ in stalls:
            never.set()
            channel.close()
        server.stop(grace=0)


def test_one_client_cannot_take_every_call():
    server = _serve(max_calls_per_client=2, first_message_timeout=20)
    started = threading.Semaphore(0)
    stalls = [_stalled(server, "token-5", started) for _ in range(4)]
    try:
        for _ in stalls:
            assert started.acquire(timeout=10)
        time.sleep(0.5)
        over = [f for _, _, f in stalls if f.done()]
        assert len(over) == 2
        assert {f.exception().code() for f in over} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert "max_calls_per_client" in over[0].exception().details()
        peer = Peer(server, "token-6")
        peer.open()  # another client is not affected
        peer.close()
    finally:
        for channel, never, _ in stalls:
            never.set()
            channel.close()
        server.stop(grace=0)


def test_a_call_must_deliver_its_message_in_time():
    server = _serve(first_message_timeout=0.5)
    started = threading.Semaphore(0)
    channel, never, future = _stalled(server, "token-3", started)
    try:
        with pytest.raises(grpc.RpcError) as info:
            future.result(timeout=10)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no request message within 0.5 s" in info.value.details()
    finally:
        never.set()
        channel.close()
        server.stop(grace=0)


def test_sessions_are_capped_per_client_and_expire_when_idle():
    server = _serve(max_sessions_per_client=3, session_idle_timeout=0.5)
    peer = Peer(server)
    try:
        for _ in range(3):
            peer.open()
        with pytest.raises(grpc.RpcError) as info:
            peer.open()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions_per_client=3" in info.value.details()
        Peer(server, "token-9").open()  # other clients still get theirs
        time.sleep(1.5)  # idle sessions expire
        assert len(server.sessions) == 0
        peer.open()
    finally:
        peer.close()
        server.stop()


def test_a_forged_splitfed_report_cannot_stop_the_rounds(rng):
    from keras_split.configurations.rounds import RoundCoordinator

    weights = [np.zeros((2, 2), "float32")]
    coordinator = RoundCoordinator(weights, mode="splitfed", rounds=2, clients=2,
                                   turn_timeout=30, poll=0.2)
    server = _serve(coordinator=coordinator)
    peers = [Peer(server, "token-1"), Peer(server, "token-2")]
    try:
        for peer in peers:
            peer.open()
        replies = [peer.call("Turn", pb.TurnRequest(session_id=peer.session, round=1))
                   for peer in peers]  # both join; the round starts with the second
        for peer, reply in zip(peers, replies, strict=True):
            for _ in range(50):
                if reply.go:
                    break
                reply = peer.call("Turn", pb.TurnRequest(session_id=peer.session, round=1))
            assert reply.go
        good = [wire.encode(np.ones((2, 2), "float32"))]
        peers[0].call("Report", pb.ReportRequest(session_id=peers[0].session, round=1,
                                                 weights=good, samples=10))
        for samples, weight in [(-10, good), (0, good), (10**12, good),
                                (10, [wire.encode(np.ones((2, 2), "int32"))]),
                                (10, [wire.encode(np.full((2, 2), 3e38, "float32"))])]:
            with pytest.raises(grpc.RpcError) as info:
                peers[1].call("Report", pb.ReportRequest(session_id=peers[1].session, round=1,
                                                         weights=weight, samples=samples))
            assert info.value.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                                         grpc.StatusCode.INVALID_ARGUMENT), samples
        # The honest report still completes the round.
        reply = peers[1].call("Report", pb.ReportRequest(
            session_id=peers[1].session, round=1,
            weights=[wire.encode(np.full((2, 2), 3.0, "float32"))], samples=30))
        assert reply.round == 2
        np.testing.assert_allclose(coordinator.weights[0], np.full((2, 2), 2.5))
    finally:
        for peer in peers:
            peer.close()
        server.stop()


def test_checkpoints_cost_no_more_with_idle_sessions(tmp_path, rng):
    server = _serve(checkpoint_dir=tmp_path / "a")
    peer = Peer(server)
    peer.open()
    peer.train(*_batch(rng))
    small = (tmp_path / "a" / "server.ckpt").stat().st_size
    for i in range(1, 61):
        Peer(server, f"token-{i}").open()
    peer.train(*_batch(rng))
    assert (tmp_path / "a" / "server.ckpt").stat().st_size == small
    peer.close()
    server.stop()


def test_a_second_server_cannot_share_a_checkpoint_folder(tmp_path):
    server = _serve(checkpoint_dir=tmp_path)
    try:
        with pytest.raises(checkpoint.CheckpointError, match="lock|in use|another"):
            _serve(checkpoint_dir=tmp_path)
    finally:
        server.stop()
    _serve(checkpoint_dir=tmp_path).stop()  # free again once the first has stopped


def test_a_corrupted_checkpoint_is_refused_at_start(tmp_path, rng):
    server = _serve(checkpoint_dir=tmp_path)
    peer = Peer(server)
    peer.open()
    peer.train(*_batch(rng))
    peer.close()
    server.stop()
    path = tmp_path / "server.ckpt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="server.ckpt"):
        _serve(checkpoint_dir=tmp_path)


def test_a_failed_checkpoint_write_undoes_the_step_and_the_client_retries(tmp_path, rng,
                                                                         monkeypatch):
    x, y = _batch(rng, 16)
    reference = _serve(checkpoint_dir=tmp_path / "reference")
    server = _serve(start=False, checkpoint_dir=tmp_path / "failing")
    server.role.model.set_weights(reference.role.model.get_weights())
    server.start()
    write = checkpoint.write
    failures = iter([True])

    def flaky(path, *args, **kwargs):
        if "failing" in str(path) and next(failures, False):
            raise OSError(28, "No space left on device")
        return write(path, *args, **kwargs)

    try:
        peers = [Peer(reference), Peer(server)]
        for peer in peers:
            peer.open()
            peer.train(x[:8], y[:8])  # both built: BatchNorm statistics, Adam, metrics
        peers[0].train(x[8:], y[8:])
        before = _state(server)
        monkeypatch.setattr(checkpoint, "write", flaky)
        details = peers[1].refused(peers[1].request(x[8:], y[8:]),
                                   grpc.StatusCode.UNAVAILABLE)
        assert "retry" in details
        assert _state(server) == before
        peers[1].train(x[8:], y[8:])  # the retry
        assert _state(server) == _state(reference)
    finally:
        reference.stop()
        server.stop()


def test_events_are_logged_one_line_each_without_tokens(rng, caplog):
    caplog.set_level(logging.INFO, logger="keras_split.server")
    server = _serve()
    peer = Peer(server)
    try:
        peer.open()
        peer.train(*_batch(rng), reset_metrics=True)
        Peer(server, "stolen-token").refused(peer.request(*_batch(rng)),
                                             grpc.StatusCode.UNAUTHENTICATED)
    finally:
        peer.close()
        server.stop()
    text = caplog.text
    for event in ("server.started", "session.opened", "epoch.started", "call.refused",
                  "server.stopped"):
        assert f"event={event}" in text, event
    assert HONEST not in text and "stolen-token" not in text


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["Open", "Step", "Turn", "Report"]),
       body=st.binary(max_size=300))
def test_random_bytes_never_get_unknown_or_change_state(served, method, body):
    server, peer = served
    before = _state(server)
    call = peer.channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=bytes,
                                    response_deserializer=bytes)
    try:
        call(body, metadata=peer.metadata, timeout=10)
    except grpc.RpcError as error:
        assert error.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), \
            (error.code(), error.details())
    assert _state(server) == before


def test_a_restarted_server_resumes_its_rounds(tmp_path):
    from keras_split.configurations.rounds import RoundCoordinator

    def coordinator():
        return RoundCoordinator([np.zeros((2, 2), "float32")], mode="splitfed", rounds=3,
                                clients=2, turn_timeout=30, poll=0.2)

    server = _serve(coordinator=coordinator(), checkpoint_dir=tmp_path)
    peers = [Peer(server, "token-1"), Peer(server, "token-2")]
    for peer in peers:
        peer.open()
    replies = [peer.call("Turn", pb.TurnRequest(session_id=peer.session, round=1))
               for peer in peers]
    for peer, reply in zip(peers, replies, strict=True):
        while not reply.go:
            reply = peer.call("Turn", pb.TurnRequest(session_id=peer.session, round=1))
    for peer, value, samples in [(peers[0], 1.0, 10), (peers[1], 3.0, 30)]:
        peer.call("Report", pb.ReportRequest(session_id=peer.session, round=1, samples=samples,
                                             weights=[wire.encode(np.full((2, 2), value,
                                                                          "float32"))]))
    for peer in peers:
        peer.close()
    server.stop()
    # A new process would build the same coordinator from its command line.
    again = coordinator()
    restarted = _serve(coordinator=again, checkpoint_dir=tmp_path)
    try:
        assert again.round == 2
        np.testing.assert_allclose(again.weights[0], np.full((2, 2), 2.5))
        assert [r.trained for r in again.history][0] == ["client-1", "client-2"]
        # The clients' sessions came back too: they carry on in round 2.
        peer = Peer(restarted, "token-1")
        peer.session = peers[0].session
        reply = peer.call("Turn", pb.TurnRequest(session_id=peer.session, round=2))
        assert reply.round == 2
        peer.close()
    finally:
        restarted.stop()
