"""A server step is a transaction: it applies completely or changes nothing.

A server half holding Dense, BatchNormalization and Dropout, trained with Adam
and accuracy, receives each attack (or broken message) once, between honest
steps. It must refuse it with a ValueError naming the field, and leave every
variable bitwise unchanged: weights, moving statistics, the dropout seed state,
the optimizer's iteration count and slots, and the metrics. The next honest
step must then equal the same step of a twin that never saw the attack.
"""

import dataclasses

import grpc
import keras
import numpy as np
import pytest
from keras import layers

from keras_split.configurations.chain import RelayRole
from keras_split.configurations.vertical import GatherRole
from keras_split.messages import Activations, Reply
from keras_split.network import convert as wire
from keras_split.network.server import SplitServer
from keras_split.roles import ServerRole, check_message
from keras_split.transport import InProcessTransport, Transport
from keras_split_wire.proto import split_pb2 as pb
from keras_split_wire.proto import split_pb2_grpc as pb_grpc

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BATCH = 8
TOKEN = "token-a"


def _server_model():
    keras.utils.set_random_seed(0)  # every copy starts from the same weights
    inp = keras.Input((6,), name="cut")
    x = layers.Dense(8, name="dense")(inp)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.Dropout(0.5, seed=3, name="drop")(x)
    return keras.Model(inp, layers.Dense(3, name="logits")(x), name="server_half")


def _role(model=None, **options):
    return ServerRole(model or _server_model(), keras.optimizers.Adam(0.01), LOSS,
                      metrics=["accuracy"], **options)


def _batch(seed, features=6):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(BATCH, features)).astype("float32"), rng.integers(0, 3, BATCH)


def _honest(step, seed=None, mode="train", features=6):
    x, y = _batch(step if seed is None else seed, features)
    return Activations(step, mode, (x,), labels=y)


def _variables(model, optimizer) -> list:
    return list(model.variables) + list(optimizer.variables)


def _metric_variables(role) -> list:
    return list(role.loss_tracker.variables) + [v for m in role.model.metrics
                                                for v in m.variables]


def _state(variables) -> dict:
    """Every variable's dtype, shape and bytes, by position and path (less the
    optimizer's or layer's name, which a twin's copy numbers apart)."""
    return {f"{i}:{v.path.split('/', 1)[-1]}": (str(v.dtype), tuple(v.shape),
                              keras.ops.convert_to_numpy(v).tobytes())
            for i, v in enumerate(variables)}


def _server_state(role) -> dict:
    return _state(_variables(role.model, role.optimizer) + _metric_variables(role))


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    changed = [k for k in got if got[k] != want[k]]
    assert not changed, f"variables changed: {changed}"


def _assert_same_reply(got: Reply, want: Reply) -> None:
    assert got.logs == want.logs
    assert len(got.gradients) == len(want.gradients)
    for a, b in zip(got.gradients, want.gradients, strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


# -- where Keras keeps the state a step moves -----------------------------------


def test_a_step_moves_state_that_lives_in_the_non_trainable_variables():
    role = _role()
    model = role.model
    bn, drop = model.get_layer("bn"), model.get_layer("drop")
    non_trainable = [id(v) for v in model.non_trainable_variables]
    # BatchNormalization's statistics and Dropout's seed state are non-trainable
    # variables of the model (so in model.variables), not hidden elsewhere.
    for variable in (bn.moving_mean, bn.moving_variance, drop.seed_generator.state):
        assert id(variable) in non_trainable
    assert set(non_trainable) <= {id(v) for v in model.variables}
    role.handle(_honest(1))
    moved = {"moving mean": bn.moving_mean, "moving variance": bn.moving_variance,
             "seed": drop.seed_generator.state, "iterations": role.optimizer.iterations,
             "kernel": model.get_layer("dense").kernel,
             "accuracy": role.model.metrics[1].variables[0],
             "loss": role.loss_tracker.variables[0]}
    before = {k: keras.ops.convert_to_numpy(v).copy() for k, v in moved.items()}
    role.handle(_honest(2))
    # So "unchanged" below means something: an honest step moves each of them.
    for name, variable in moved.items():
        assert not np.array_equal(keras.ops.convert_to_numpy(variable), before[name]), name
    assert int(role.optimizer.iterations) == 2


# -- the attacks -----------------------------------------------------------------


def _message(x, y, *, sample_weight=None, mode="train", reset=False, step=2):
    return Activations(step, mode, (x,), labels=y, sample_weight=sample_weight,
                       reset_metrics=reset)


def _row(array, value):
    array = np.array(array)
    array[0] = value
    return array


def _set(array, index, value, dtype=None):
    array = np.array(array, dtype=dtype or np.asarray(array).dtype)
    array.flat[index] = value
    return array


WEIGHTS = np.ones(BATCH, "float32")
LENIENT_ACTIVATIONS = {"max_activation": float("inf")}  # to reach the checks after computing
LENIENT_WEIGHTS = {"max_sample_weight": float("inf")}

# name: (ServerRole options, message from an honest (x, y), the error expected)
ATTACKS = {
    "label_outside_classes": (
        {}, lambda x, y: _message(x, _set(y, 2, 3)), r"`labels` must hold class indices in "
                                                      r"\[0, 3\) .*received values from 0 to 3"),
    "negative_label": ({}, lambda x, y: _message(x, _set(y, 0, -1)), r"\[0, 3\).* from -1"),
    "float_label_outside_classes": (
        {}, lambda x, y: _message(x, _set(y, 0, 7.0, "float32")), r"\[0, 3\).* to 7"),
    "empty_batch": ({}, lambda x, y: _message(x[:0], y[:0]), r"`activations\[0\]` is an "
                                                             r"empty batch"),
    "label_length": ({}, lambda x, y: _message(x, y[:-1]), r"`labels` has shape \(7,\); "
                                                           r"expected 8 samples"),
    "nan_label": ({}, lambda x, y: _message(x, _set(y, 1, np.nan, "float32")),
                  r"`labels` contains NaN"),
    "text_labels": ({}, lambda x, y: _message(x, y.astype(str)), r"`labels` must hold numbers"),
    "activations_3e38": ({}, lambda x, y: _message(_set(x, 0, 3e38), y),
                         r"magnitude 3e\+38, above the server's limit of 1e\+09"),
    "activations_inf": ({}, lambda x, y: _message(_set(x, 5, np.inf), y),
                        r"`activations\[0\]` contains NaN or Inf"),
    "activations_nan": ({}, lambda x, y: _message(_set(x, 5, np.nan), y),
                        r"`activations\[0\]` contains NaN or Inf"),
    "sample_weight_1e38": ({}, lambda x, y: _message(x, y, sample_weight=_set(WEIGHTS, 0, 1e38)),
                           r"`sample_weight` must hold finite numbers in \[0, 1e\+06\]"),
    "sample_weight_negative": (
        {}, lambda x, y: _message(x, y, sample_weight=_set(WEIGHTS, 0, -1)), r"from -1 to 1"),
    "sample_weight_nan": ({}, lambda x, y: _message(x, y, sample_weight=_set(WEIGHTS, 0, np.nan)),
                          r"`sample_weight` must hold finite numbers"),
    "sample_weight_text": ({}, lambda x, y: _message(x, y, sample_weight=WEIGHTS.astype(str)),
                           r"`sample_weight` must hold numbers"),
    "sample_weight_length": ({}, lambda x, y: _message(x, y, sample_weight=WEIGHTS[:3]),
                             r"`sample_weight` has shape \(3,\); expected 8"),
    # Past the checks on the message: the step computes, then refuses to apply.
    "non_finite_loss": (LENIENT_ACTIVATIONS, lambda x, y: _message(_row(x, 3e38), y),
                        r"its loss is not finite \(nan\)"),
    "overflowing_gradient": (LENIENT_WEIGHTS,
                             lambda x, y: _message(x, y, sample_weight=_set(WEIGHTS, 0, 1e37)),
                             r"its gradients are not finite, or so large"),
    "moving_variance_overflow": (LENIENT_ACTIVATIONS, lambda x, y: _message(_set(x, 0, 1e20), y),
                                 r"made non-trainable state .* non-finite"),
    # reset_metrics takes effect with an accepted message only.
    "reset_metrics_on_refused_message": (
        {}, lambda x, y: _message(x, _set(y, 2, 3), reset=True), r"class indices"),
    "reset_metrics_on_refused_step": (
        LENIENT_ACTIVATIONS, lambda x, y: _message(_row(x, 3e38), y, reset=True),
        r"loss is not finite"),
    "evaluate_label_outside_classes": (
        {}, lambda x, y: _message(x, _set(y, 2, 3), mode="evaluate"), r"class indices"),
    "evaluate_non_finite_loss": (
        LENIENT_ACTIVATIONS, lambda x, y: _message(_row(x, 3e38), y, mode="evaluate",
                                                   reset=True), r"loss is not finite"),
    "predict_activations_inf": ({}, lambda x, y: Activations(2, "predict", (_set(x, 0, np.inf),),
                                                             reset_metrics=True),
                                r"contains NaN or Inf"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_refused_step_changes_nothing(attack):
    options, make, error = ATTACKS[attack]
    role, twin = _role(**options), _role(**options)
    for r in (role, twin):
        r.handle(_honest(1))
    before = _server_state(role)
    _assert_same(before, _server_state(twin))
    x, y = _batch(2)
    with pytest.raises(ValueError, match=error):
        role.handle(make(x, y))
    _assert_same(_server_state(role), before)
    # The next honest step trains, as if the attack had never come.
    got, want = role.handle(_honest(2)), twin.handle(_honest(2))
    _assert_same_reply(got, want)
    _assert_same(_server_state(role), _server_state(twin))
    assert _server_state(role) != before


def test_a_refused_first_message_leaves_the_server_as_new():
    role, twin = _role(), _role()
    x, y = _batch(1)
    with pytest.raises(ValueError, match="class indices"):
        role.handle(_message(x, _set(y, 0, 9), step=1))
    with pytest.raises(ValueError, match="empty batch"):
        role.handle(_message(x[:0], y[:0], step=1))
    _assert_same_reply(role.handle(_honest(1)), twin.handle(_honest(1)))
    _assert_same(_server_state(role), _server_state(twin))


def test_ignore_class_labels_are_accepted():
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)
    role = ServerRole(_server_model(), "adam", loss)
    x, y = _batch(1)
    role.handle(_message(x, _set(y, 0, -1), step=1))
    with pytest.raises(ValueError, match=r"\[0, 3\), or -1 \(`ignore_class`\)"):
        role.handle(_message(x, _set(y, 0, 3), step=2))


def test_integer_labels_of_a_custom_loss_index_the_classes():
    def loss(y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    role = ServerRole(_server_model(), "adam", loss)
    x, y = _batch(1)
    role.handle(_message(x, y, step=1))
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\) for output 'logits'"):
        role.handle(_message(x, _set(y, 0, 3)[:, None], step=2))


def test_regression_labels_are_not_class_indices():
    inp = keras.Input((6,))
    role = ServerRole(keras.Model(inp, layers.Dense(3)(inp)), "sgd", "mse")
    x, _ = _batch(1)
    role.handle(_message(x, np.full((BATCH, 3), 40.0, "float32"), step=1))


@pytest.mark.parametrize("tensors, error", [
    ((), r"at least one cut tensor"),
    ((np.zeros((4, 2), "float32"), np.zeros((3, 2), "float32")),
     r"`activations\[1\]` has 3 samples, but `activations\[0\]` has 4"),
    ((np.float32(1.0),), r"batch axis first; received a scalar"),
    ((np.array([["a"]]),), r"`activations\[0\]` must hold numbers; received dtype str"),
    ((np.array([[None]]),), r"must hold numbers; received dtype object"),
])
def test_check_message_refuses_malformed_tensors(tensors, error):
    with pytest.raises(ValueError, match=error):
        check_message(Activations(1, "train", tensors))


def test_max_activation_is_configurable():
    role = _role(max_activation=10.0)
    x, y = _batch(1)
    with pytest.raises(ValueError, match=r"limit of 10 \(`max_activation`\)"):
        role.handle(_message(_set(x, 0, 11.0), y, step=1))
    role.handle(_message(_set(x, 0, 10.0), y, step=1))
    with pytest.raises(ValueError, match="must be positive"):
        _role(max_sample_weight=0)


# -- over the network --------------------------------------------------------------


@pytest.fixture
def network():
    """A SplitServer on loopback (plaintext, token) and a raw stub with a session."""
    role = _role(max_sample_weight=1e6)
    server = SplitServer(role.model, role=role, tokens={TOKEN: "hospital-a"},
                         insecure=True).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.SplitLearningStub(channel)
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    session = stub.Open(pb.OpenRequest(protocol_version=wire.PROTOCOL_VERSION,
                                       cut=[wire.spec_to_pb(s) for s in server.cut_specs]),
                        metadata=metadata, timeout=10).session_id

    def step(message):
        return stub.Step(wire.request_to_pb(session, message), metadata=metadata, timeout=30)

    yield role, step
    channel.close()
    server.stop()


@pytest.mark.parametrize("attack, field", [
    ("label_outside_classes", "`labels`"), ("activations_3e38", "`activations[0]`"),
    ("sample_weight_1e38", "`sample_weight`"), ("reset_metrics_on_refused_message", "`labels`")])
def test_a_refused_step_over_the_network_changes_nothing(network, attack, field):
    # These pass the wire's own checks (finite, non-negative); the role refuses them.
    role, step = network
    twin = _role()
    step(_honest(1))
    twin.handle(_honest(1))
    before = _server_state(role)
    x, y = _batch(2)
    with pytest.raises(grpc.RpcError) as info:
        step(ATTACKS[attack][1](x, y))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field)
    _assert_same(_server_state(role), before)
    # The refused step was not applied: the next honest one takes its number.
    got = wire.reply_from_pb(step(_honest(2)), 10_000)
    _assert_same_reply(got, twin.handle(_honest(2)))
    _assert_same(_server_state(role), _server_state(twin))


# -- the middle party of a chain ---------------------------------------------------


def _relay_model():
    keras.utils.set_random_seed(1)
    inp = keras.Input((6,), name="relay_in")
    x = layers.Dense(6, kernel_regularizer=keras.regularizers.L2(0.1), name="relay_dense")(inp)
    x = layers.BatchNormalization(name="relay_bn")(x)
    x = layers.Dropout(0.5, seed=5, name="relay_drop")(x)
    return keras.Model(inp, x, name="relay_half")


class Link(Transport):
    """The relay's link downstream; `attack(message)` replaces one exchange."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.attack = inner, None
        self.bytes = inner.bytes

    def _exchange(self, message):
        attack, self.attack = self.attack, None
        if attack is not None:
            return attack(message), 0, 0
        return self.inner.exchange(message), 0, 0


def _chain():
    server = _role()
    link = Link(InProcessTransport(server))
    return RelayRole(_relay_model(), keras.optimizers.Adam(0.01), link), server, link


def _chain_state(relay, server) -> dict:
    return {**_state(_variables(relay.model, relay.optimizer)),
            **{f"server/{k}": v for k, v in _server_state(server).items()}}


def _fail(_message):
    raise ConnectionError("the party downstream is gone")


def _gradient(value):
    def reply(message):
        return Reply(step=message.step, gradients=(np.full_like(message.tensors[0], value),),
                     logs={"loss": 1.0})
    return reply


# name: (what the link does instead of the exchange, or None; message; the error expected)
RELAY_ATTACKS = {
    "downstream_refuses": (None, lambda x, y: _message(x, _set(y, 2, 3)),
                           ValueError, r"class indices"),
    "downstream_refuses_a_reset": (None, lambda x, y: _message(x, _set(y, 2, 3), reset=True),
                                   ValueError, r"class indices"),
    "downstream_link_fails": (_fail, lambda x, y: _message(x, y), ConnectionError, "gone"),
    "nan_gradient_from_downstream": (_gradient(np.nan), lambda x, y: _message(x, y), ValueError,
                                     r"gradient received for cut tensor 0 contains NaN"),
    "overflowing_gradient_from_downstream": (
        _gradient(1e30), lambda x, y: _message(x, y), ValueError,
        r"weight and input gradients are not finite, or so large"),
    "activations_3e38": (None, lambda x, y: _message(_set(x, 0, 3e38), y), ValueError,
                         r"`activations\[0\]` holds a value of magnitude 3e\+38"),
    "empty_batch": (None, lambda x, y: _message(x[:0], y[:0]), ValueError, "empty batch"),
}


@pytest.mark.parametrize("attack", list(RELAY_ATTACKS))
def test_a_relay_step_that_fails_changes_nothing(attack):
    replace, make, error_type, error = RELAY_ATTACKS[attack]
    (relay, server, link), (twin, twin_server, _) = _chain(), _chain()
    for r in (relay, twin):
        r.handle(_honest(1))
    before = _chain_state(relay, server)
    _assert_same(before, _chain_state(twin, twin_server))
    x, y = _batch(2)
    link.attack = replace
    with pytest.raises(error_type, match=error):
        relay.handle(make(x, y))
    _assert_same(_chain_state(relay, server), before)
    got, want = relay.handle(_honest(2)), twin.handle(_honest(2))
    _assert_same_reply(got, want)  # the logs include the relay's running regularization
    _assert_same(_chain_state(relay, server), _chain_state(twin, twin_server))
    assert _chain_state(relay, server) != before


# -- vertical: the gathering server ------------------------------------------------


@pytest.mark.parametrize("ids, tensors, error", [
    (np.array([-1, 0, 1, 2, 3, 4, 5, 6]), 1, r"sample IDs .* integers in \[0, 16\)"),
    (np.arange(8) + 10, 1, r"integers in \[0, 16\)"),
    (np.arange(8) + 0.5, 1, r"integers in \[0, 16\)"),
    (np.arange(8), 2, r"Party 'a' sent 2 cut tensors; expected its share of 1"),
])
def test_gather_role_refuses_bad_sample_ids_and_shares(ids, tensors, error):
    labels = np.random.default_rng(0).integers(0, 3, 16)
    role, twin = _role(), _role()
    gather = GatherRole(role, ["a"], labels=labels)
    x, _ = _batch(1)
    first = Activations(1, "train", (x,), labels=np.arange(8))
    gather.handle_from("a", first)
    twin.handle(dataclasses.replace(first, labels=labels[:8]))
    before = _server_state(role)
    bad = Activations(2, "train", (x,) * tensors, labels=ids)
    with pytest.raises(ValueError, match=error):
        gather.handle_from("a", bad)
    _assert_same(_server_state(role), before)
    gather.handle_from("a", Activations(2, "train", (x,), labels=np.arange(8, 16)))
    twin.handle(Activations(2, "train", (x,), labels=labels[8:]))
    _assert_same(_server_state(role), _server_state(twin))
