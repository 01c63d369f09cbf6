"""Pipelined training steps (`fit(pipeline=D)`, `protocol.Pipeline`)."""

import keras
import numpy as np
import pytest
from keras import layers

import keras_split
from keras_split import protocol
from keras_split.messages import Activations
from keras_split.network import devcerts as certs
from keras_split.network.client import SplitClient
from keras_split.network.server import SplitServer
from tests import models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
TOKEN = "token-a"


def dense_model():
    inp = keras.Input((6,), name="x")
    h = layers.Dense(5, activation="tanh", kernel_regularizer=keras.regularizers.L2(1e-2),
                     name="client_dense")(inp)
    out = layers.Dense(3, name="logits")(h)
    return keras.Model(inp, out), "client_dense"


def twins(n, build=dense_model):
    """`n` split models with the same weights, compiled alike (SGD, no fusing
    differences: the pipelined path sends messages)."""
    first, cut = build()
    splits = []
    for _ in range(n):
        model, _ = build()
        model.set_weights(first.get_weights())
        split = keras_split.split(model, cut)
        split.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
        splits.append(split)
    return splits


def data(rng, n=48, d=6):
    return rng.normal(size=(n, d)).astype("float32"), rng.integers(0, 3, n)


def assert_same(a, b):
    for u, v in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)


def test_depth_1_is_the_sequential_path(rng):
    x, y = data(rng)
    plain, one = twins(2)
    want = plain.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    got = one.fit(x, y, batch_size=8, shuffle=False, verbose=0, pipeline=1)
    assert_same(plain, one)
    assert got.history == want.history


def test_depth_2_equals_the_staggered_reference(rng):
    """The stated semantics, by hand: forward k, send k, then backward k-1."""
    x, y = data(rng)
    piped, ref, sequential = twins(3)
    history = piped.fit(x, y, batch_size=8, shuffle=False, verbose=0, pipeline=2)
    sequential.fit(x, y, batch_size=8, shuffle=False, verbose=0)

    client, transport = ref.client_role, ref.transport
    waiting = []
    for k, start in enumerate(range(0, len(x), 8)):
        context = client.forward(x[start:start + 8])
        reply = transport.exchange(Activations(
            k + 1, "train", tuple(np.asarray(a) for a in context.activations),
            labels=y[start:start + 8], reset_metrics=k == 0))
        waiting.append((context, reply))
        if len(waiting) == 2:
            context, reply = waiting.pop(0)
            client.backward(context, reply.gradients)
    for context, reply in waiting:
        client.backward(context, reply.gradients)

    assert_same(piped, ref)
    # Staleness is real: the client's weights differ from sequential training's.
    assert not np.array_equal(piped.client.get_weights()[0], sequential.client.get_weights()[0])
    np.testing.assert_array_equal(piped.server.get_weights()[0], ref.server.get_weights()[0])
    assert history.history["bytes_up"] == [len(x) * 5 * 4 + y.nbytes]  # cut values, labels


def test_bytes_and_callbacks_at_depth_4(rng):
    x, y = data(rng)
    one, four = twins(2)
    ends = []
    log = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: ends.append(b))
    a = one.fit(x, y, batch_size=8, shuffle=False, verbose=0, epochs=2)
    b = four.fit(x, y, batch_size=8, shuffle=False, verbose=0, epochs=2, pipeline=4,
                 callbacks=[log], validation_data=(x[:8], y[:8]))
    assert a.history["bytes_up"] == b.history["bytes_up"]
    assert a.history["bytes_down"] == b.history["bytes_down"]
    assert ends == list(range(6)) * 2
    assert four._step == 2 * 6 + 2  # training steps, then one validation step per epoch


def bad_labels(y, batch):
    y = y.copy()
    y[batch * 8] = 7  # outside the 3 classes: the server refuses the step
    return y


@pytest.mark.parametrize("depth", [2, 3])
def test_a_refused_step_ends_the_fit_after_the_steps_before_it(rng, depth):
    x, y = data(rng)
    piped, ref = twins(2)
    with pytest.raises(ValueError, match="class"):
        piped.fit(x, bad_labels(y, 3), batch_size=8, shuffle=False, verbose=0, pipeline=depth)
    # The same as training on the three batches before it, with the same depth.
    ref.fit(x[:24], y[:24], batch_size=8, shuffle=False, verbose=0, pipeline=depth)
    assert_same(piped, ref)
    assert piped._step == 3  # numbering carries on from the last applied step


def test_bad_depth_is_refused(rng):
    x, y = data(rng)
    (split,) = twins(1)
    for depth in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="pipeline"):
            split.fit(x, y, batch_size=8, verbose=0, pipeline=depth)
    with pytest.raises(ValueError, match="depth"):
        protocol.Pipeline(split.client_role, split.transport, 0, split.next_step)


def test_batchnorm_and_dropout_pipeline(rng):
    x = models.inputs_for(models.bn_dropout()[0], 32, rng)
    y = rng.integers(0, 3, 32)
    (split,) = twins(1, models.bn_dropout)
    history = split.fit(x, y, batch_size=8, epochs=2, verbose=0, pipeline=3)
    assert np.isfinite(history.history["loss"]).all()


# -- over gRPC ------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca():
    return certs.Authority()


def _serve(split, ca, **options):
    pair = ca.issue("localhost")
    return SplitServer(split.server, LOSS, keras.optimizers.SGD(0.1), tokens={TOKEN: "a"},
                       certificate=pair.certificate, private_key=pair.private_key,
                       **options).start()


def _over_grpc(split, ca, fits, **options):
    server = _serve(split, ca, **options)
    try:
        client = SplitClient(split.client, server=f"127.0.0.1:{server.port}", token=TOKEN,
                             root_certificates=ca.pem)
        client.compile(optimizer=keras.optimizers.SGD(0.1))
        return [fit(client) for fit in fits]
    finally:
        server.stop()


def test_grpc_depths_1_and_3_equal_in_process(rng, ca):
    x, y = data(rng, n=64)
    local1, local3, remote1, remote3 = twins(4)
    local1.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    want = local3.fit(x, y, batch_size=8, shuffle=False, verbose=0, pipeline=3)
    (one,) = _over_grpc(remote1, ca, [
        lambda c: c.fit(x, y, batch_size=8, shuffle=False, verbose=0, pipeline=1)])
    three, again = _over_grpc(remote3, ca, [
        lambda c: c.fit(x, y, batch_size=8, shuffle=False, verbose=0, pipeline=3),
        lambda c: c.evaluate(x, y, batch_size=8, verbose=0)])
    for a, b in zip(remote1.get_weights(), local1.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for a, b in zip(remote3.get_weights(), local3.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert three.history["loss"][0] == pytest.approx(want.history["loss"][0], rel=1e-5)
    assert three.history["bytes_up"] == one.history["bytes_up"]
    assert three.history["bytes_down"] == one.history["bytes_down"]
    assert np.isfinite(again)


def test_grpc_refused_step_in_the_pipeline(rng, ca):
    x, y = data(rng)
    remote, ref = twins(2)

    def refused(client):
        with pytest.raises(ValueError, match="class"):
            client.fit(x, bad_labels(y, 3), batch_size=8, shuffle=False, verbose=0,
                       pipeline=3)
        return client._step

    def carry_on(client):  # the session is still in step with the client
        return client.evaluate(x[:8], y[:8], batch_size=8, verbose=0)

    step, _ = _over_grpc(remote, ca, [refused, carry_on])
    assert step == 3
    ref.fit(x[:24], y[:24], batch_size=8, shuffle=False, verbose=0, pipeline=3)
    for a, b in zip(remote.get_weights(), ref.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_grpc_sends_ahead_and_a_lost_link_names_the_steps_in_flight(rng, ca, monkeypatch):
    from keras_split_wire import rpc

    x, y = data(rng, n=80)
    (split,) = twins(1)
    most = []
    send = rpc.Stream.send

    def counted(self, request):
        send(self, request)
        most.append(self.in_flight)

    monkeypatch.setattr(rpc.Stream, "send", counted)
    server = _serve(split, ca)
    try:
        client = SplitClient(split.client, server=f"127.0.0.1:{server.port}", token=TOKEN,
                             root_certificates=ca.pem, retry_for=0)
        client.compile(optimizer=keras.optimizers.SGD(0.1))
        client.fit(x, y, batch_size=8, shuffle=False, verbose=0, pipeline=4)
        assert max(most) == 4  # four steps on the wire at once
        stop = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda b, logs: server.stop() if b == 2 else None)
        with pytest.raises(rpc.LinkDownError, match=r"Steps \[.*\] were in flight"):
            client.fit(x, y, batch_size=8, shuffle=False, verbose=0, pipeline=4,
                       callbacks=[stop])
    finally:
        server.stop()


def test_pipelining_is_refused_with_a_client_checkpoint(rng):
    x, y = data(rng)
    (split,) = twins(1)
    split.checkpoint_path = "client.ckpt"  # as a SplitClient(checkpoint_dir=...) has
    with pytest.raises(ValueError, match="checkpoint"):
        split.fit(x, y, batch_size=8, verbose=0, pipeline=2)
    assert split._step == 0


def test_an_error_of_the_fit_leaves_no_step_in_flight(rng, ca):
    x, y = data(rng, n=80)
    (split,) = twins(1)

    def boom(batch, logs):
        if batch == 2:
            raise RuntimeError("a callback failed")

    def failing(client):
        with pytest.raises(RuntimeError, match="a callback failed"):
            client.fit(x, y, batch_size=8, shuffle=False, verbose=0, pipeline=4,
                       callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=boom)])
        return not client.transport._flight and (
            client.transport._steps is None or client.transport._steps.in_flight == 0)

    (clean,) = _over_grpc(split, ca, [failing])
    assert clean


@pytest.mark.parametrize("drop_after", [1, 4])
def test_a_dropped_stream_is_resent_and_answered_from_the_replay_window(rng, ca, drop_after):
    """The stream is cancelled under four steps in flight: they go again on a
    fresh stream, the server answers those it had applied from its replay
    window and applies the rest; training equals the uninterrupted run."""
    x, y = data(rng, n=96)
    remote, local = twins(2)
    local.fit(x, y, batch_size=8, shuffle=False, verbose=0, pipeline=4)
    opened = []

    def drop(client):
        def cut(batch, logs):
            if batch == drop_after:
                client.transport._steps._call.cancel()
        client.fit(x, y, batch_size=8, shuffle=False, verbose=0, pipeline=4,
                   callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=cut)])
        opened.append(client.transport._steps.opened)

    _over_grpc(remote, ca, [drop], replay_window=4)
    assert opened[0] >= 2  # a second stream carried the resent steps
    for a, b in zip(remote.get_weights(), local.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_replay_window_must_be_positive(ca):
    (split,) = twins(1)
    with pytest.raises(ValueError, match="replay_window"):
        _serve(split, ca, replay_window=0)


def test_a_client_objective_reports_its_logs_when_pipelined(rng):
    from keras_split.privacy import NoPeek

    x, y = data(rng)
    model, cut = dense_model()
    split = keras_split.split(model, cut)
    split.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, nopeek=NoPeek(alpha=0.5))
    history = split.fit(x, y, batch_size=8, verbose=0, pipeline=3)
    assert 0 <= history.history["nopeek_dcor"][0] <= 1


def test_the_pipeline_at_depth_1_is_separate_train_step(rng):
    x, y = data(rng)
    piped, separate = twins(2)
    steps = iter(range(1, 100))
    pipe = protocol.Pipeline(piped.client_role, piped.transport, 1, lambda: next(steps))
    for k, start in enumerate(range(0, len(x), 8)):
        pipe.send(x[start:start + 8], y[start:start + 8], reset_metrics=k == 0)
        done = pipe.take()
        want, regularization = protocol.separate_train_step(
            separate.client_role, separate.transport, k + 1, x[start:start + 8],
            y[start:start + 8], reset_metrics=k == 0)
        assert done.reply.logs == want.logs and done.regularization == regularization
    assert_same(piped, separate)
