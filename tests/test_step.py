"""The split step against the reference: one GradientTape over the unsplit model.

With SGD at learning rate 1 and no momentum, one update is w' = w - g, so the
gradient each party applied is g = w - w'. It must equal the gradient of the
unsplit model's loss (its regularization losses included) for every variable.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_split
from keras_split import protocol
from keras_split.roles import ClientRole, ServerRole
from keras_split.transport import InProcessTransport
from tests import models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _snapshot(model):
    return [v.numpy().copy() for v in model.variables]


def _restore(model, values):
    for v, value in zip(model.variables, values, strict=True):
        v.assign(value)


def _reference_gradients(model, x, y):
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = LOSS(y, logits) + tf.add_n(model.losses) if model.losses else LOSS(y, logits)
    grads = tape.gradient(loss, model.trainable_variables)
    return {v.path: g.numpy() for v, g in zip(model.trainable_variables, grads, strict=True)}


@pytest.mark.parametrize("name", list(models.ALL))
def test_one_step_equals_unsplit_gradient(name, rng):
    model, cut = models.ALL[name]()
    x = models.inputs_for(model, 16, rng)
    y = rng.integers(0, 3, size=16)
    before = _snapshot(model)  # weights, BatchNorm statistics and dropout seed states
    expected = _reference_gradients(model, x, y)
    after_reference = {v.path: v.numpy() for v in model.non_trainable_variables}
    _restore(model, before)

    split = keras_split.split(model, cut)
    client = ClientRole(split.client, keras.optimizers.SGD(learning_rate=1.0))
    client.build()
    server = ServerRole(split.server, keras.optimizers.SGD(learning_rate=1.0), loss=LOSS)
    weights = {v.path: v.numpy().copy() for v in model.trainable_variables}
    reply, _ = protocol.train_step(client, InProcessTransport(server), 1, x, y)

    assert len(reply.gradients) == len(split.cut_specs)
    for v in model.trainable_variables:
        applied = weights[v.path] - v.numpy()
        np.testing.assert_allclose(applied, expected[v.path], atol=1e-5, err_msg=v.path)
    # State that moves in the forward pass (BatchNorm statistics, dropout seeds)
    # moved exactly as in one unsplit forward pass: once.
    for v in model.non_trainable_variables:
        np.testing.assert_allclose(v.numpy(), after_reference[v.path], atol=1e-6, err_msg=v.path)


def test_cut_gradient_hand_derived():
    # Client: h = x * w (w = 2); server: p = h * u (u = 3); loss = mean((p - y)^2).
    # For x = 1, y = 0: h = 2, p = 6, dloss/dp = 2 * 6 = 12, dloss/dh = 12 * u = 36,
    # dloss/dw = 36 * x = 36, dloss/du = 12 * h = 24.
    client = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    server = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    client.layers[0].kernel.assign([[2.0]])
    server.layers[0].kernel.assign([[3.0]])
    split = keras_split.SplitModel(client=client, server=server)
    split.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
    context = split.client_role.forward(np.array([[1.0]], "float32"))
    reply = split.transport.exchange(
        keras_split.Activations(1, "train", (np.asarray(context.activations[0]),),
                                labels=np.array([[0.0]], "float32"))
    )
    np.testing.assert_allclose(reply.gradients[0], [[36.0]])
    np.testing.assert_allclose(server.layers[0].kernel.numpy(), [[3.0 - 0.01 * 24]], rtol=1e-6)
    split.client_role.backward(context, reply.gradients)
    np.testing.assert_allclose(client.layers[0].kernel.numpy(), [[2.0 - 0.01 * 36]], rtol=1e-6)
    with pytest.raises(RuntimeError, match="already used for a backward pass"):
        split.client_role.backward(context, reply.gradients)


def test_steps_in_flight_do_not_interfere(rng):
    # Two forward passes before either backward: each context carries its own
    # tape, so the result equals running the two steps' gradients from the
    # weights each forward saw (here: both from the initial weights).
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    client = ClientRole(split.client, keras.optimizers.SGD(learning_rate=0.0))
    client.build()
    x = rng.normal(size=(4, 8, 8, 1)).astype("float32")
    first, second = client.forward(x), client.forward(x)
    np.testing.assert_allclose(first.activations[0], second.activations[0])
    grad = (np.ones_like(first.activations[0]),)
    client.backward(second, grad)
    client.backward(first, grad)


@pytest.mark.parametrize("name", ["small_cnn", "bn_dropout"])
def test_compiled_and_separate_halves_agree(name, rng):
    # The fused compiled step and forward()/backward() as two calls do the same
    # arithmetic: after three steps each, the weights agree.
    model, cut = models.ALL[name]()
    x = models.inputs_for(model, 16, rng)
    y = rng.integers(0, 3, size=16)
    start = _snapshot(model)
    results = []
    for run in (protocol.train_step, protocol.separate_train_step):
        _restore(model, start)
        split = keras_split.split(model, cut)
        client = ClientRole(split.client, keras.optimizers.Adam(1e-2))
        client.build()
        transport = InProcessTransport(ServerRole(split.server, "adam", loss=LOSS))
        for step in range(3):
            run(client, transport, step, x, y)
        results.append([w.copy() for w in model.get_weights()])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_send_gets_read_only_activations_that_stay_valid(rng):
    # `send` receives views of the compiled step's own tensors (no copy), which
    # its backward pass reads: writing them is refused, and arrays kept past the
    # step still hold the values that were sent.
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    client = ClientRole(split.client, keras.optimizers.SGD(learning_rate=0.0))
    client.build()
    kept = []

    def send(activations):
        with pytest.raises(ValueError, match="read-only"):
            activations[0][...] = 0.0
        kept.append(activations)
        return keras_split.Reply(step=0, gradients=tuple(np.ones_like(a) for a in activations))

    batches = [models.inputs_for(model, 4, rng) for _ in range(3)]
    for x in batches:
        client.step(x, send)
    for x, activations in zip(batches, kept, strict=True):
        np.testing.assert_array_equal(activations[0], split.client(x, training=False))


def test_server_error_surfaces_unwrapped_and_client_unchanged(rng):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    client = ClientRole(split.client, "sgd")
    client.build()
    before = [w.copy() for w in split.client.get_weights()]

    def bad_server(activations):
        raise ConnectionError("server went away")

    with pytest.raises(ConnectionError, match="server went away"):
        client.step(models.inputs_for(model, 4, rng), bad_server)

    def wrong_shape(activations):
        return keras_split.Reply(step=0, gradients=(np.zeros((1, 2), "float32"),))

    with pytest.raises(ValueError, match=r"gradient for cut tensor 0 has shape \(1, 2\), but "
                                         r"the activation sent had shape \(4, 3, 3, 4\)"):
        client.step(models.inputs_for(model, 4, rng), wrong_shape)
    for a, b in zip(before, split.client.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(client.optimizer.iterations) == 0  # no update of the optimizer either


REFUSED_STEP = """
import keras, numpy as np, keras_split
from keras_split.roles import ServerRole
from keras_split.transport import InProcessTransport
inputs = keras.Input((6,))
hidden = keras.layers.Dense(4, activation="relu", name="cut")(inputs)
model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
split = keras_split.split(model, "cut")
server = ServerRole(split.server, "sgd",
                    keras.losses.SparseCategoricalCrossentropy(from_logits=True))
split.compile(optimizer="sgd", transport=InProcessTransport(server, fused=False))
x, y = np.ones((8, 6), "float32"), np.array([0, 1] * 4)
split.fit(x, y, batch_size=4, verbose=0)
y[3] = 7
try:
    split.fit(x, y, batch_size=4, verbose=0)
except ValueError as error:
    print("REFUSED:", error)
"""


def test_a_refused_step_logs_no_tensorflow_traceback_before_its_error():
    """On the message path the exchange runs inside the client's compiled call
    (a py_function); a refusal there must reach the user as the server's clean
    error alone, not after TensorFlow's WARNING log of a Python traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"}  # TensorFlow's own default
    result = subprocess.run([sys.executable, "-c", REFUSED_STEP], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REFUSED: `labels` must hold class indices in [0, 2)" in result.stdout
    assert "Traceback" not in result.stderr and "INVALID_ARGUMENT" not in result.stderr, \
        result.stderr[-2000:]


INTER_OP = """
import os, sys
if sys.argv[1] == "one cpu":
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import tensorflow as tf
if sys.argv[1] == "one thread":
    tf.config.threading.set_inter_op_parallelism_threads(1)
if sys.argv[1] == "one cpu, TensorFlow started first":
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    tf.constant(1.0) + 1.0
import keras, numpy as np, keras_split
from keras_split import compiled
print("THREADS", compiled.inter_op_threads())
inputs = keras.Input((6,))
hidden = keras.layers.Dense(4, activation="relu", name="cut")(inputs)
model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
split = keras_split.split(model, "cut")
split.compile(optimizer="sgd", compression="float16",
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
before = [w.copy() for w in model.get_weights()]
x, y = np.ones((8, 6), "float32"), np.array([0, 1] * 4)
try:
    split.fit(x, y, batch_size=4, verbose=0)
    print("TRAINED", int(split.client_role.optimizer.iterations))
except RuntimeError as error:
    unchanged = all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    print("REFUSED", unchanged, error)
"""


@pytest.mark.parametrize("case", ["one cpu", "one thread", "one cpu, TensorFlow started first"])
def test_the_message_path_never_waits_forever_for_an_inter_op_thread(case):
    """On the message path the client's compiled step waits at the cut on one of
    TensorFlow's inter-op threads while the server's step, in this process, needs
    another. TensorFlow gives a one-CPU process one such thread: importing
    keras_split makes it two (the step trains); an explicit setting of one is kept,
    and so is the pool of a TensorFlow started before keras_split was imported: the
    step then fails at once with an error that says why, changing nothing (before:
    all three waited forever)."""
    import os
    import subprocess
    import sys

    if case.startswith("one cpu") and not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs os.sched_setaffinity (Linux)")
    result = subprocess.run([sys.executable, "-c", INTER_OP, case], capture_output=True,
                            text=True, timeout=240,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    if case == "one cpu":
        assert "THREADS 2" in result.stdout
        assert "TRAINED 2" in result.stdout
    else:
        assert "THREADS 1" in result.stdout
        assert "REFUSED True" in result.stdout
        assert "set_inter_op_parallelism_threads(2)" in result.stdout
