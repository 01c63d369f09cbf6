"""NoPeek on the client: alpha=0 is plain training bit for bit; the client's
update is TensorFlow's own gradient of cut-gradient . activations + alpha dCor
in every configuration; over gRPC the server receives the same messages; the
exported device step adds the same term."""

import dataclasses
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_split
from keras_split import protocol
from keras_split.apps.demo import build_demo_cnn
from keras_split.configurations.chain import split_chain
from keras_split.configurations.federation import RoundRobin, SplitFed
from keras_split.configurations.rounds import RoundCoordinator
from keras_split.configurations.vertical import split_vertical
from keras_split.export import ExportError, export_client
from keras_split.export.onnx_export import paths, session
from keras_split.export.tflite import interpreter
from keras_split.network.client import SplitClient
from keras_split.network.server import SplitServer
from keras_split.privacy import NoPeek, distance_correlation, distance_correlation_gradients
from keras_split.roles import ClientRole, ServerRole
from keras_split.transport import InProcessTransport
from keras_split_wire import device_names as names
from tests import models
from tests.test_configurations import Recorder

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LR = 0.5


def _bytes(model):
    return [w.tobytes() for w in model.get_weights()]


def _client_update(client, weights, x, cut_gradients, alpha, lr=LR):
    """The expected SGD step of a client half: one tape over the client graph of
    sum(cut gradient * activations) + alpha * dCor(x, activations) + its losses."""
    clone = keras.models.clone_model(client)
    clone.set_weights(weights)
    with tf.GradientTape() as tape:
        z = clone(x, training=True)
        z = list(z) if isinstance(z, (list, tuple)) else [z]
        target = tf.add_n([tf.reduce_sum(tf.convert_to_tensor(g) * a)
                           for g, a in zip(cut_gradients, z, strict=True)])
        target += alpha * distance_correlation(x, z) + sum(clone.losses)
    for variable, gradient in zip(clone.trainable_variables,
                                  tape.gradient(target, clone.trainable_variables), strict=True):
        variable.assign_sub(lr * gradient)
    return clone.get_weights()


def _close(got, want, atol=1e-6):
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=atol)


# -- the object --------------------------------------------------------------------


def test_nopeek_is_a_keras_serializable_object():
    nopeek = NoPeek(alpha=2.5)
    again = NoPeek.from_config(nopeek.get_config())
    assert again.alpha == 2.5 and nopeek.get_config() == {"alpha": 2.5}
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(nopeek))
    assert isinstance(restored, NoPeek) and restored.alpha == 2.5
    assert keras.saving.get_registered_name(NoPeek) == "keras_split>NoPeek"
    assert repr(nopeek) == "NoPeek(alpha=2.5)"
    assert keras_split.privacy.NoPeek is NoPeek  # reachable from the package


@pytest.mark.parametrize("alpha", [-1.0, float("nan"), float("inf"), "1", None, True])
def test_nopeek_refuses_a_bad_alpha(alpha):
    with pytest.raises(ValueError, match="`alpha` must be a finite number >= 0"):
        NoPeek(alpha)


def test_client_role_refuses_a_bad_objective(rng):
    model, cut = models.sequential()
    split = keras_split.split(model, cut)
    with pytest.raises(TypeError, match="`objective` must be None or a callable"):
        ClientRole(split.client, "sgd", objective=3)
    role = ClientRole(split.client, "sgd", objective=lambda x, z: tf.ones([4]))
    with pytest.raises(ValueError, match="must return a scalar"):
        role.forward(models.inputs_for(model, 4, rng))


# -- alpha = 0 is plain training ---------------------------------------------------


@pytest.mark.parametrize("separate", [False, True], ids=["compiled", "separate"])
def test_alpha_zero_reproduces_plain_training_bit_for_bit(rng, separate):
    x, y = models.inputs_for(models.small_cnn()[0], 32, rng), rng.integers(0, 3, 32)

    def train(nopeek):
        keras.utils.set_random_seed(3)
        model, cut = models.small_cnn()  # L2 on both sides: the client has a loss term
        split = keras_split.split(model, cut)
        split.compile(keras.optimizers.Adam(1e-2), LOSS, nopeek=nopeek)
        if separate:  # forward() / backward(): the path of relays and vertical parties
            for step in range(4):
                rows = slice(8 * step, 8 * step + 8)
                protocol.separate_train_step(split.client_role, split.transport, step + 1,
                                             x[rows], y[rows])
            return _bytes(model), None
        history = split.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        return _bytes(model), history

    plain, plain_history = train(None)
    zero, zero_history = train(NoPeek(alpha=0.0))
    other, _ = train(NoPeek(alpha=1.0))
    assert zero == plain
    assert other != plain
    if not separate:
        assert zero_history.history["loss"] == plain_history.history["loss"]
        assert len(zero_history.history["nopeek_dcor"]) == 2  # still measured


# -- the gradient ------------------------------------------------------------------


def test_one_step_equals_one_tape_over_the_unsplit_model(rng):
    # The split step (client and server apart, NoPeek on the client) against one
    # GradientTape over the whole model: loss + every layer's L2 + alpha dCor(x, cut).
    alpha = 3.0
    model, cut = models.small_cnn()
    twin, _ = models.small_cnn()
    twin.set_weights(model.get_weights())
    x, y = models.inputs_for(model, 16, rng), rng.integers(0, 3, 16)
    probe = keras.Model(twin.input, [twin.get_layer(cut).output, twin.output])
    with tf.GradientTape() as tape:
        z, logits = probe(x, training=True)
        model_loss = LOSS(y, logits) + tf.add_n(twin.losses)
        dcor = distance_correlation(x, z)
        total = model_loss + alpha * dcor
    for variable, gradient in zip(twin.trainable_variables,
                                  tape.gradient(total, twin.trainable_variables), strict=True):
        variable.assign_sub(LR * gradient)

    split = keras_split.split(model, cut)
    split.compile(keras.optimizers.SGD(LR), LOSS, nopeek=NoPeek(alpha))
    history = split.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    _close(model.get_weights(), twin.get_weights())
    # The reported loss is the model's (as Keras reports it), without the NoPeek
    # term; the term's dCor is reported beside it.
    assert history.history["loss"][0] == pytest.approx(float(model_loss), rel=1e-6)
    assert history.history["nopeek_dcor"][0] == pytest.approx(float(dcor), rel=1e-6)


def test_nopeek_dcor_is_the_running_mean_over_the_epoch(rng):
    model, cut = models.sequential()
    x, y = models.inputs_for(model, 24, rng), rng.integers(0, 3, 24)
    split = keras_split.split(model, cut)
    split.compile(keras.optimizers.SGD(0.0), LOSS, nopeek=NoPeek(1.0))  # weights stay put
    history = split.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    batches = [float(distance_correlation(x[i:i + 8], split.client(x[i:i + 8])))
               for i in (0, 8, 16)]
    assert history.history["nopeek_dcor"][0] == pytest.approx(np.mean(batches), rel=1e-5)


def _chain(labels):
    def build(nopeek, log, rng):
        model, _ = models.small_cnn()
        chain = split_chain(model, ["pool1", "dense"])
        chain.compile(keras.optimizers.SGD(LR), LOSS, labels=labels, nopeek=nopeek,
                      transports=[lambda t: Recorder(t, log)])
        x, y = models.inputs_for(model, 16, rng), rng.integers(0, 3, 16)
        return chain, [(chain.segments[0], x, 0)], (x, y)
    return build


def _vertical(nopeek, log, rng):
    model, cuts = models.multi_input()
    vertical = split_vertical(model, cuts)
    vertical.compile(keras.optimizers.SGD(LR), LOSS, nopeek=nopeek)
    vertical.transport = Recorder(vertical.transport, log)
    x, y = models.inputs_for(model, 16, rng), rng.integers(0, 3, 16)
    # Each party against its own inputs, with its own slice of the cut gradient.
    return vertical, [(vertical.parties[0], x[0], 0), (vertical.parties[1], x[1], 1)], (x, y)


CONFIGURATIONS = {"multi_hop": _chain("server"), "u_shaped": _chain("client"),
                  "vertical": _vertical}


@pytest.mark.parametrize("kind", list(CONFIGURATIONS))
def test_each_party_steps_on_cut_gradient_plus_alpha_dcor(rng, kind):
    alpha = 4.0
    owner, parties, (x, y) = CONFIGURATIONS[kind](NoPeek(alpha), log := [], rng)
    before = [client.get_weights() for client, _, _ in parties]
    history = owner.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    (message, reply), = log
    assert message.labels is None if kind == "u_shaped" else message.labels is not None
    for (client, inputs, index), weights in zip(parties, before, strict=True):
        want = _client_update(client, weights, inputs, [reply.gradients[index]], alpha)
        _close(client.get_weights(), want)
    if kind != "vertical":  # one client: its dCor is in the logs
        assert 0 < history.history["nopeek_dcor"][0] <= 1
    else:  # each party's own, by party
        for index in range(2):
            assert 0 < history.history[f"nopeek_dcor_party_{index}"][0] <= 1


@pytest.mark.parametrize("kind", list(CONFIGURATIONS))
def test_alpha_zero_reproduces_plain_training_in_each_configuration(kind):
    def train(nopeek):
        keras.utils.set_random_seed(5)
        owner, _, (x, y) = CONFIGURATIONS[kind](nopeek, [], np.random.default_rng(0))
        owner.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        return [w.tobytes() for w in owner.merge().get_weights()]

    assert train(NoPeek(0.0)) == train(None)


@pytest.mark.parametrize("kind", ["round_robin", "splitfed"])
def test_rounds_apply_nopeek_on_every_client(rng, kind):
    alpha = 2.0
    model, cut = models.sequential()
    split = keras_split.split(model, cut)
    shards = [(models.inputs_for(model, 8, rng), rng.integers(0, 3, 8)) for _ in range(2)]
    logs = [[], []]
    if kind == "round_robin":
        rounds = RoundRobin(split.client, split.server, clients=2)
    else:
        rounds = SplitFed(split.client, split.server, clients=2, version=2)
    rounds.compile(keras.optimizers.SGD(LR), LOSS, nopeek=NoPeek(alpha),
                   transport_wrapper=lambda i, t: Recorder(t, logs[i]))
    start = split.client.get_weights()
    rounds.fit(shards, rounds=1, batch_size=8)
    gradients = [log[0][1].gradients for log in logs]
    if kind == "round_robin":  # client 1 starts from client 0's half (the hand-off)
        first = _client_update(split.client, start, shards[0][0], gradients[0], alpha)
        want = _client_update(split.client, first, shards[1][0], gradients[1], alpha)
    else:  # both from the round's start, then the average (equal sample counts)
        ends = [_client_update(split.client, start, shards[i][0], gradients[i], alpha)
                for i in range(2)]
        want = [(a + b) / 2 for a, b in zip(*ends, strict=True)]
    _close(split.client.get_weights(), want)


def test_export_rule_matches_tensorflow_gradient_of_dcor(rng):
    # The device's forward-op derivative of dCor against TensorFlow's gradient
    # of distance_correlation, with uint8 pixels, two cut tensors and ties.
    x = rng.integers(0, 256, size=(9, 6, 6, 1)).astype("uint8")
    z = [rng.normal(size=(9, 3, 3, 2)).astype("float32") + 5.0,
         rng.normal(size=(9, 4)).astype("float32")]
    z[0][4], z[1][4] = z[0][2], z[1][2]
    z = [tf.constant(t) for t in z]
    with tf.GradientTape() as tape:
        tape.watch(z)
        result = distance_correlation(x, z)
    want = tape.gradient(result, z)
    got = distance_correlation_gradients(x, z)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-8, rtol=1e-5)
    # A constant cut (dead units at initialisation): dCor 0, no gradient.
    flat = [tf.ones([9, 3, 3, 2]), tf.zeros([9, 4])]
    for gradient in distance_correlation_gradients(x, flat):
        np.testing.assert_array_equal(gradient, 0.0)
    assert NoPeek(0.0).cut_gradients(x, z) is None


# -- over the network ----------------------------------------------------------------


class Watch:
    """A server role that records what reaches it, then hands it on."""

    def __init__(self, role, log):
        self.role, self.log = role, log

    def handle(self, message):
        reply = self.role.handle(message)
        self.log.append((message, reply))
        return reply

    def state(self):
        return self.role.state()

    def restore(self, arrays, path):
        self.role.restore(arrays, path)


def _shape_of(message):
    def arrays(structure):
        if structure is None:
            return None
        return [(np.asarray(a).shape, np.asarray(a).dtype.str)
                for a in keras.tree.flatten(structure)]

    fields = dataclasses.asdict(message) | {"tensors": arrays(message.tensors),
                                            "labels": arrays(message.labels),
                                            "sample_weight": arrays(message.sample_weight)}
    return fields


def test_over_grpc_the_server_receives_the_same_messages(rng):
    alpha = 2.0
    model, cut = models.small_cnn()
    start = model.get_weights()
    x, y = models.inputs_for(model, 24, rng), rng.integers(0, 3, 24)
    split = keras_split.split(model, cut)
    log: list = []
    role = Watch(ServerRole(split.server, keras.optimizers.SGD(0.0), LOSS), log)
    server = SplitServer(split.server, role=role, insecure=True,
                         tokens={"token-plain": "a", "token-nopeek": "b"}).start()
    received = {}
    try:
        for token, nopeek in [("token-plain", None), ("token-nopeek", NoPeek(alpha))]:
            model.set_weights(start)
            log.clear()
            client = SplitClient(split.client, server=f"127.0.0.1:{server.port}",
                                 token=token, insecure=True)
            client.compile(keras.optimizers.SGD(LR), nopeek=nopeek)
            history = client.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0)
            received[token] = [_shape_of(message) for message, _ in log]
        # The NoPeek client's step: the gradient the server sent, plus alpha dCor.
        (_, reply), = log
        _close(split.client.get_weights(),
               _client_update(split.client, start[:2], x, reply.gradients, alpha))
    finally:
        server.stop()
    # Same fields, tensors, shapes and dtypes: nothing extra crosses the wire.
    assert received["token-nopeek"] == received["token-plain"]
    assert len(received["token-plain"][0]["tensors"]) == 1
    assert np.isfinite(history.history["loss"][0]) and "nopeek_dcor" in history.history


def test_train_rounds_over_grpc_equals_in_process_round_robin(rng):
    def build():
        keras.utils.set_random_seed(0)
        model, cut = models.sequential()
        return keras_split.split(model, cut)

    x, y = models.inputs_for(build().client, 16, rng), rng.integers(0, 3, 16)
    local = build()
    reference = RoundRobin(local.client, local.server, clients=1)
    reference.compile(keras.optimizers.SGD(0.1), LOSS, nopeek=NoPeek(2.0))
    reference.fit([(x, y)], rounds=2, batch_size=8, shuffle=True, seed=0)

    split = build()
    coordinator = RoundCoordinator(split.client.get_weights(), "round_robin", rounds=2,
                                   clients=1, poll=0.5)
    server = SplitServer(split.server, LOSS, keras.optimizers.SGD(0.1), insecure=True,
                         tokens={"t": "hospital"}, coordinator=coordinator).start()
    result = {}
    try:
        client = SplitClient(split.client, server=f"127.0.0.1:{server.port}", token="t",
                             insecure=True)
        client.compile(keras.optimizers.SGD(0.1), nopeek=NoPeek(2.0))
        thread = threading.Thread(target=lambda: result.update(
            rounds=client.train_rounds(x, y, batch_size=8, seed=0)))
        thread.start()
        thread.join(timeout=120)
    finally:
        server.stop()
    assert result["rounds"] == [1, 2]
    _close(coordinator.weights, local.client.get_weights(), atol=1e-5)
    _close(split.server.get_weights(), local.server.get_weights(), atol=1e-5)


# -- on the device --------------------------------------------------------------------


def _device_steps_tflite(path, x, grads):
    runtime = interpreter(path.read_bytes())
    train = runtime.get_signature_runner(names.TRAIN)
    for g in grads:
        train(**{names.model_input(0): x, names.cut_gradient(0): g})
    weights = runtime.get_signature_runner(names.GET_WEIGHTS)()
    return [weights[names.weight(i)] for i in range(len(weights))]


def _device_steps_onnx(path, x, grads):
    files = paths(path)
    train = session(files[names.TRAIN])
    with np.load(files[names.ONNX_STATE]) as data:
        state = {k: data[k] for k in data.files}
    order = state.pop(names.WEIGHT_ORDER)
    wanted = [i.name for i in train.get_inputs()]
    for g in grads:
        feed = {names.model_input(0): x, names.cut_gradient(0): g, **state}
        outputs = train.run(None, {k: v for k, v in feed.items() if k in wanted})
        new = dict(zip([o.name for o in train.get_outputs()], outputs, strict=True))
        state = {k: new[names.new(k)] for k in state}
    return [state[names.onnx_parameter(group, i)] for group, i in order]


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_five_device_steps_equal_tensorflow(tmp_path, rng, fmt):
    # The exported train adds alpha * d dCor / d cut (forward ops) to the
    # server's cut gradient; five steps in the device's runtime against the
    # TensorFlow client's own (ClientRole with NoPeek: TensorFlow's gradient).
    alpha = 2.0
    split = keras_split.split(build_demo_cnn(), "pool2")
    split.compile(keras.optimizers.SGD(0.1), LOSS, nopeek=NoPeek(alpha))
    path = tmp_path / f"client.{fmt}"
    report = split.export_client(path)
    assert report.train_step_error < 1e-5
    x = rng.integers(0, 256, size=(8, 28, 28, 1)).astype("float32")  # pixels
    grads = [rng.normal(size=(8, 5, 5, 32)).astype("float32") * 1e-2 for _ in range(5)]
    got = {"tflite": _device_steps_tflite, "onnx": _device_steps_onnx}[fmt](path, x, grads)

    def tensorflow_steps(objective):
        clone = keras.models.clone_model(split.client)
        clone.set_weights(split.client.get_weights())
        role = ClientRole(clone, keras.optimizers.SGD(0.1), objective=objective)
        for g in grads:
            role.backward(role.forward(x), [g])
        return clone.get_weights()

    _close(got, tensorflow_steps(NoPeek(alpha)), atol=1e-5)
    # The term matters: a device without it would be far off.
    plain = tensorflow_steps(None)
    assert max(np.abs(a - b).max() for a, b in zip(got, plain, strict=True)) > 1e-3


def test_export_refuses_an_objective_it_has_no_device_rule_for(tmp_path):
    split = keras_split.split(build_demo_cnn(), "pool2")
    split.compile("sgd", LOSS, nopeek=lambda x, z: tf.reduce_mean(z))
    with pytest.raises(ExportError, match="has no device rule"):
        split.export_client(tmp_path / "client.tflite")
    # alpha=0 exports the plain client.
    report = export_client(split.client, tmp_path / "plain.tflite", objective=NoPeek(0.0))
    assert report.train_step_error < 1e-5


def test_the_server_half_is_unaware(rng):
    # In process too: the ServerRole's messages carry the cut tensors only.
    model, cut = models.sequential()
    split = keras_split.split(model, cut)
    log: list = []
    role = ServerRole(split.server, "sgd", LOSS)
    split.compile("sgd", LOSS, nopeek=NoPeek(1.0),
                  transport=Recorder(InProcessTransport(role), log))
    split.fit(models.inputs_for(model, 8, rng), rng.integers(0, 3, 8), batch_size=8, verbose=0)
    (message, reply), = log
    assert len(message.tensors) == 1 and "nopeek_dcor" not in reply.logs
