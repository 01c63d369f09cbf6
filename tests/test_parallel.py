"""Server-side aggregation of concurrent clients' steps (`ParallelRole`), against
a hand derivation: a linear server half with mean squared error and SGD."""

import re
import threading

import keras
import numpy as np
import pytest

from keras_split.configurations.parallel import ParallelRole
from keras_split.messages import Activations
from keras_split.network.server import SplitServer
from keras_split.roles import ServerRole

LR = 0.1
SIZES = (2, 3, 1)  # three clients' batch sizes


def _server_half(seed=0):
    inp = keras.Input((3,), name="cut")
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(inp), name="linear_server")
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=(3, 2)).astype("float32"),
                       rng.normal(size=2).astype("float32")])
    return model


def _role(**options):
    model = _server_half()
    return ParallelRole(ServerRole(model, keras.optimizers.SGD(LR), "mse"), **options)


def _batches(rng, sizes=SIZES):
    return [(rng.normal(size=(n, 3)).astype("float32"), rng.normal(size=(n, 2)).astype("float32"))
            for n in sizes]


def _message(step, z, y, **options):
    return Activations(step=step, mode="train", tensors=(z,), labels=y, **options)


def _all_at_once(role, messages, parties=None):
    """Each message from its own thread, as a server's workers would send them."""
    results = [None] * len(messages)

    def send(i):
        try:
            results[i] = role.handle_from((parties or [f"c{j}" for j in range(len(messages))])[i],
                                          messages[i])
        except ValueError as error:
            results[i] = error

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(messages))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def _by_hand(batches, w, b):
    """One SGD step on the rows of all batches: L = mean over rows and outputs of
    (zW + b - y)^2, so dL/dpred = 2 r / r.size and dL/dz = dL/dpred W^T, row by
    row (a row's gradient depends on its own sample only, in whatever order the
    group holds the rows)."""
    residuals = [z.astype(np.float64) @ w + b - y for z, y in batches]
    size = sum(r.size for r in residuals)
    d_preds = [2 * r / size for r in residuals]
    loss = sum((r ** 2).sum() for r in residuals) / size
    d_w = sum(z.astype(np.float64).T @ d for (z, _), d in zip(batches, d_preds, strict=True))
    d_b = sum(d.sum(0) for d in d_preds)
    return loss, [d @ w.T for d in d_preds], w - LR * d_w, b - LR * d_b


def _weights(role):
    return [v.astype(np.float64) for v in role.model.get_weights()]


@pytest.mark.parametrize("gradients", ["union", "own"])
def test_one_step_on_the_concatenated_batch_equals_the_hand_derivation(gradients, rng):
    role = _role(window=30.0, max_group=3, gradients=gradients)  # closes when 3 arrive
    w, b = _weights(role)
    batches = _batches(rng)
    replies = _all_at_once(role, [_message(7 + k, z, y) for k, (z, y) in enumerate(batches)])

    loss, d_z, new_w, new_b = _by_hand(batches, w, b)
    assert (role.groups, role.grouped, role.retried) == (1, 3, 0)
    n = sum(SIZES)
    for k, reply in enumerate(replies):
        assert reply.step == 7 + k
        expected = d_z[k] * (n / SIZES[k] if gradients == "own" else 1.0)
        np.testing.assert_allclose(reply.gradients[0], expected, rtol=1e-5, atol=1e-7)
        assert reply.logs["loss"] == pytest.approx(loss, rel=1e-5)
    new = _weights(role)
    np.testing.assert_allclose(new[0], new_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new[1], new_b, rtol=1e-5, atol=1e-7)
    # "own": each client's gradient is that of its own batch's mean loss alone.
    if gradients == "own":
        for k, (z, y) in enumerate(batches):
            _, alone, _, _ = _by_hand([(z, y)], w, b)
            np.testing.assert_allclose(replies[k].gradients[0], alone[0], rtol=1e-5, atol=1e-7)


def test_a_group_of_one_is_the_plain_step(rng):
    role, plain = _role(window=0.0), ServerRole(_server_half(), keras.optimizers.SGD(LR), "mse")
    (z, y), = _batches(rng, (4,))
    got = role.handle_from("c0", _message(1, z, y))
    want = plain.handle(_message(1, z, y))
    np.testing.assert_array_equal(got.gradients[0], want.gradients[0])
    for a, b in zip(role.model.get_weights(), plain.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_bad_message_is_refused_alone_and_the_others_step_together(rng):
    role = _role(window=1.0, max_group=3)
    w, b = _weights(role)
    batches = _batches(rng)
    bad = batches[1][0].copy()
    bad[0, 0] = np.nan
    messages = [_message(1, z, y) for z, y in batches]
    messages[1] = _message(1, bad, batches[1][1])
    replies = _all_at_once(role, messages)
    assert isinstance(replies[1], ValueError) and "finite" in str(replies[1])
    assert (role.groups, role.grouped) == (1, 2)
    _, d_z, new_w, new_b = _by_hand([batches[0], batches[2]], w, b)
    np.testing.assert_allclose(replies[0].gradients[0], d_z[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(replies[2].gradients[0], d_z[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_weights(role)[0], new_w, rtol=1e-5, atol=1e-7)


def test_a_refused_group_changes_nothing_and_its_members_are_retried_alone(rng):
    role = _role(window=30.0, max_group=3)
    w, b = _weights(role)
    batches = _batches(rng)
    # Finite, in-range labels whose squared error overflows float32: the group's
    # loss is infinite, so the combined step is refused; then alone, only this
    # client's is.
    huge = np.full_like(batches[2][1], 3e19)
    messages = [_message(1, z, y) for z, y in batches[:2]] + [_message(1, batches[2][0], huge)]
    replies = _all_at_once(role, messages)
    assert role.retried == 1 and role.groups == 0
    assert isinstance(replies[2], ValueError) and "not finite" in str(replies[2])
    # The two good clients each took a step of their own, one after the other,
    # in arrival order: either order is two plain SGD steps from (w, b).
    candidates = []
    for first, second in ((0, 1), (1, 0)):
        _, _, w1, b1 = _by_hand([batches[first]], w, b)
        _, _, w2, b2 = _by_hand([batches[second]], w1, b1)
        candidates.append(w2)
    got = _weights(role)[0]
    assert any(np.allclose(got, c, rtol=1e-5, atol=1e-6) for c in candidates)


def test_evaluation_is_not_grouped_and_options_are_checked(rng):
    role = _role(window=30.0, max_group=4)
    (z, y), = _batches(rng, (3,))
    before = role.model.get_weights()
    reply = role.handle_from("c0", Activations(step=1, mode="evaluate", tensors=(z,), labels=y))
    assert reply.gradients == () and role.groups == 0  # answered at once, not after 30 s
    for a, b in zip(before, role.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    server = ServerRole(_server_half(), "sgd", "mse")
    for options, message in [
        ({"window": -1}, "`window` must be a number of seconds in [0, 60], received -1"),
        ({"max_group": 0}, "`max_group` must be a positive integer, received 0"),
        ({"gradients": "mean"}, "`gradients` must be one of ('union', 'own'), received 'mean'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            ParallelRole(server, **options)
    with pytest.raises(TypeError, match="must be a keras_split.roles.ServerRole"):
        ParallelRole(object())


def test_over_grpc_the_server_groups_concurrent_clients(rng, tmp_path):
    from keras_split_edge.link import ServerLink

    role = _role(window=30.0, max_group=3)
    w, b = _weights(role)
    tokens = {f"t{i}": f"client-{i}" for i in range(3)}
    server = SplitServer(role.model, role=role, tokens=tokens, insecure=True, max_workers=5,
                         checkpoint_dir=tmp_path / "server").start()
    try:
        links = [ServerLink(f"127.0.0.1:{server.port}", token=f"t{i}", insecure=True)
                 for i in range(3)]
        for link in links:
            link.open([("float32", (-1, 3))])
        batches = _batches(rng)
        results = [None] * 3

        def step(i):
            results[i] = links[i].exchange("train", [batches[i][0]], batches[i][1])

        threads = [threading.Thread(target=step, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        _, d_z, new_w, _ = _by_hand(batches, w, b)
        assert role.groups == 1
        for i in range(3):
            np.testing.assert_allclose(results[i][0][0], d_z[i], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(_weights(role)[0], new_w, rtol=1e-5, atol=1e-7)
        for link in links:
            link.close()
    finally:
        server.stop()


def test_steps_that_arrive_while_the_server_is_busy_form_one_group(rng):
    role = _role(max_group=8)  # no window: a group closes when the server takes it
    w, b = _weights(role)
    batches = _batches(rng)
    results = []
    role._step_lock.acquire()  # the server is busy with a step
    try:
        thread = threading.Thread(target=lambda: results.append(_all_at_once(
            role, [_message(1, z, y) for z, y in batches])))
        thread.start()
        for _ in range(600):  # all three join the waiting group
            if role._open is not None and len(role._open.members) == 3:
                break
            threading.Event().wait(0.05)
        assert len(role._open.members) == 3
    finally:
        role._step_lock.release()
    thread.join(timeout=60)
    assert (role.groups, role.grouped) == (1, 3)
    _, d_z, new_w, _ = _by_hand(batches, w, b)
    for k in range(3):
        np.testing.assert_allclose(results[0][k].gradients[0], d_z[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_weights(role)[0], new_w, rtol=1e-5, atol=1e-7)


def _stateful_half():
    inp = keras.Input((6,), name="cut")
    x = keras.layers.Dense(8, use_bias=False, name="dense")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    return keras.Model(inp, keras.layers.Dense(3, name="logits")(x), name="stateful_half")


def test_a_stateful_server_half_steps_on_the_group_as_on_its_concatenated_batch(rng):
    # BatchNormalization (batch statistics, moving averages), Adam and a metric: the
    # group's step is the ServerRole's step on the clients' rows put together.
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    grouped, alone = _stateful_half(), _stateful_half()
    alone.set_weights(grouped.get_weights())
    role = ParallelRole(ServerRole(grouped, keras.optimizers.Adam(0.01), loss,
                                   metrics=["accuracy"]), window=30.0, max_group=3)
    reference = ServerRole(alone, keras.optimizers.Adam(0.01), loss, metrics=["accuracy"])
    batches = [(rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n))
               for n in (4, 2, 5)]
    replies = _all_at_once(role, [_message(1, z, y) for z, y in batches])
    want = reference.handle(_message(1, np.concatenate([z for z, _ in batches]),
                                     np.concatenate([y for _, y in batches])))
    rows = np.cumsum([0, 4, 2, 5])
    assert role.groups == 1
    for k, reply in enumerate(replies):
        np.testing.assert_allclose(reply.gradients[0], want.gradients[0][rows[k]:rows[k + 1]],
                                   rtol=1e-5, atol=1e-7)
        assert reply.logs == pytest.approx(want.logs, rel=1e-5)
    for a, b in zip(grouped.get_weights(), alone.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # moving statistics included
    assert int(role.role.optimizer.iterations) == 1  # one Adam step for the group


def test_a_hostile_member_cannot_poison_a_stateful_group(rng):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _stateful_half()
    role = ParallelRole(ServerRole(model, keras.optimizers.Adam(0.01), loss,
                                   max_activation=1e38), window=30.0, max_group=3)
    batches = [(rng.normal(size=(4, 6)).astype("float32"), rng.integers(0, 3, 4))
               for _ in range(3)]
    hostile = batches[1][0].copy()
    hostile[0] = 1e30  # within max_activation; squares overflow in BatchNormalization
    messages = [_message(1, z, y) for z, y in batches]
    messages[1] = _message(1, hostile, batches[1][1])
    replies = _all_at_once(role, messages)
    assert isinstance(replies[1], ValueError) and role.retried == 1
    assert all(not isinstance(replies[k], Exception) for k in (0, 2))
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert int(role.role.optimizer.iterations) == 2  # the two honest clients, one each
