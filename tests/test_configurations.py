"""The seed papers' configurations, each against an independent reference: the
unsplit model trained on the same data in the same order, or a hand-computed
average."""

import dataclasses

import keras
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

import keras_split
from keras_split.configurations import sharding
from keras_split.configurations.chain import split_chain
from keras_split.configurations.federation import RoundRobin, SplitFed, fedavg
from keras_split.configurations.multitask import split_multitask
from keras_split.configurations.vertical import split_vertical
from keras_split.transport import Transport

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((10,))
    x = keras.layers.Dense(8, activation="relu", name="a")(inputs)
    x = keras.layers.Dense(8, activation="tanh", name="b")(x)
    x = keras.layers.Dense(6, activation="relu", name="c")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x))


def _data(rng, n=64):
    return rng.normal(size=(n, 10)).astype("float32"), rng.integers(0, 3, n)


def _reference_fit(build, x, y, optimizer=lambda: keras.optimizers.SGD(0.1), **kwargs):
    model = build()
    model.compile(optimizer(), loss=kwargs.pop("loss", LOSS))
    history = model.fit(x, y, batch_size=8, shuffle=False, verbose=0, **kwargs)
    return model, history


def _assert_weights(got, want, atol=1e-5):
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=atol)


class Recorder(Transport):
    """Wraps a hop and records every message and reply that crosses it."""

    def __init__(self, inner, log):
        super().__init__()
        self.inner, self.log = inner, log
        self.bytes = inner.bytes

    def _exchange(self, message):
        reply = self.inner.exchange(message)
        self.log.append((message, reply))
        return reply, 0, 0  # counted by the inner link


@pytest.mark.parametrize("optimizer", [lambda: keras.optimizers.SGD(0.1),
                                       lambda: keras.optimizers.Adam(1e-2)], ids=["sgd", "adam"])
def test_multi_hop_chain_equals_unsplit(rng, optimizer):
    x, y = _data(rng)
    model = _mlp()
    chain = split_chain(model, ["a", "b"])
    chain.compile(optimizer(), LOSS)
    assert chain.parties == ["client", "party 1", "server"]
    got = chain.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    reference, want = _reference_fit(_mlp, x, y, optimizer)
    assert got.history["loss"][0] == pytest.approx(want.history["loss"][0], rel=1e-5)
    _assert_weights(model.get_weights(), reference.get_weights())
    np.testing.assert_allclose(chain.predict(x, verbose=0), reference.predict(x, verbose=0),
                               atol=1e-5)


def test_multi_hop_loss_includes_every_party_regularization(rng):
    def build():
        keras.utils.set_random_seed(5)
        inputs = keras.Input((10,))
        x = keras.layers.Dense(8, activation="relu", name="a",
                               kernel_regularizer=keras.regularizers.L2(0.1))(inputs)
        x = keras.layers.Dense(8, activation="tanh", name="b",
                               kernel_regularizer=keras.regularizers.L2(0.2))(x)
        return keras.Model(inputs, keras.layers.Dense(3, name="out",
                                                      kernel_regularizer="l2")(x))

    x, y = _data(rng)
    model = build()
    chain = split_chain(model, ["a", "b"])
    chain.compile(keras.optimizers.SGD(0.1), LOSS)
    got = chain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    reference, want = _reference_fit(build, x, y, epochs=2)
    np.testing.assert_allclose(got.history["loss"], want.history["loss"], rtol=1e-5)
    _assert_weights(model.get_weights(), reference.get_weights())


def test_u_shaped_keeps_labels_and_loss_on_the_client(rng):
    x, y = _data(rng)
    model = _mlp()
    chain = split_chain(model, ["a", "c"])
    log = []
    chain.compile(keras.optimizers.SGD(0.1), LOSS, labels="client", metrics=["accuracy"],
                  transports=[lambda t: Recorder(t, log), lambda t: Recorder(t, log)])
    assert chain.parties == ["client", "server", "client"]
    got = chain.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    predictions = chain.predict(x[:5], verbose=0)
    evaluation = chain.evaluate(x, y, verbose=0, return_dict=True)
    reference, want = _reference_fit(_mlp, x, y)
    _assert_weights(model.get_weights(), reference.get_weights())
    assert got.history["loss"][0] == pytest.approx(want.history["loss"][0], rel=1e-5)
    np.testing.assert_allclose(predictions, reference.predict(x[:5], verbose=0), atol=1e-5)
    assert {"loss", "accuracy"} <= set(evaluation)
    # Everything that crossed either hop: cut activations up, cut gradients down.
    cut_shapes = {tuple(s.shape[1:]) for specs in chain.cut_specs for s in specs}
    assert len(log) == 2 * (8 + 1 + 2)  # both hops: 8 training steps, 1 predict, 2 evaluate
    for message, reply in log:
        assert message.labels is None and message.sample_weight is None
        assert reply.outputs is None and reply.logs == {}
        assert all(a.shape[1:] in cut_shapes for a in message.tensors)
        assert all(g.shape[1:] in cut_shapes for g in reply.gradients)


def _two_heads():
    """A body and two heads: a classifier (with a hidden layer) and a regressor."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((10,))
    body = keras.layers.Dense(8, activation="relu", name="body")(inputs)
    a = keras.layers.Dense(3, name="a")(keras.layers.Dense(5, name="head_a")(body))
    b = keras.layers.Dense(1, name="b")(body)
    return keras.Model(inputs, {"a": a, "b": b})


def test_u_shaped_step_that_fails_leaves_no_labels_behind(rng):
    from keras_split.configurations.chain import KeepLabels

    x, y = _data(rng, 16)
    model = _mlp()
    chain = split_chain(model, ["a", "c"])
    chain.compile(keras.optimizers.SGD(0.1), LOSS, labels="client",
                  transports=[lambda t: FailAt(t, 2)])
    with pytest.raises(ConnectionError):
        chain.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    assert isinstance(chain.transport, KeepLabels)
    assert not chain.transport.store._pending and not chain.transport.store._results
    chain.fit(x, y, batch_size=8, shuffle=False, verbose=0)  # goes on, aligned


def test_multi_task_heads_equal_the_unsplit_multi_output_model(rng):
    build = _two_heads
    x, y = _data(rng)
    labels = {"a": y, "b": rng.normal(size=(64, 1)).astype("float32")}
    model = build()
    split = split_multitask(model, "body")
    split.compile(keras.optimizers.SGD(0.1), {"a": LOSS, "b": "mse"})
    got = split.fit(x, labels, batch_size=8, shuffle=False, verbose=0)
    reference, want = _reference_fit(build, x, labels, loss={"a": LOSS, "b": "mse"})
    _assert_weights(model.get_weights(), reference.get_weights())
    assert got.history["loss"][0] == pytest.approx(want.history["loss"][0], rel=1e-5)
    assert {"a_loss", "b_loss"} <= set(got.history)
    with pytest.raises(ValueError, match="must name every head"):
        split.compile("sgd", {"a": LOSS})


def _breast_cancer_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs, branches = [], []
    for name in ("mean", "error", "worst"):
        features = keras.Input((10,), name=name)
        inputs.append(features)
        branches.append(keras.layers.Dense(8, activation="relu", name=f"{name}_branch")(features))
    merged = keras.layers.Concatenate(name="merge")(branches)
    hidden = keras.layers.Dense(8, activation="relu")(merged)
    return keras.Model(inputs, keras.layers.Dense(2)(hidden))


def test_vertical_breast_cancer_three_hospitals_match_unsplit():
    data = load_breast_cancer()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    x, y = x.astype("float32"), data.target
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:450], order[450:]
    groups = [slice(0, 10), slice(10, 20), slice(20, 30)]  # mean, standard error, worst
    parties = sharding.split_columns(x, groups)
    model = _breast_cancer_model()
    vertical = split_vertical(model, ["mean_branch", "error_branch", "worst_branch"])
    vertical.compile(keras.optimizers.Adam(1e-2), LOSS, metrics=["accuracy"])
    vertical.fit([p[train] for p in parties], y[train], batch_size=32, epochs=5, shuffle=False,
                 verbose=0)
    got = vertical.evaluate([p[test] for p in parties], y[test], verbose=0, return_dict=True)
    reference = _breast_cancer_model()
    reference.compile(keras.optimizers.Adam(1e-2), LOSS, metrics=["accuracy"])
    reference.fit([p[train] for p in parties], y[train], batch_size=32, epochs=5,
                  shuffle=False, verbose=0)
    _, want = reference.evaluate([p[test] for p in parties], y[test], verbose=0)
    assert abs(got["accuracy"] - want) <= 0.01
    assert got["accuracy"] > 0.9
    _assert_weights(model.get_weights(), reference.get_weights(), atol=1e-4)
    with pytest.raises(ValueError, match="one cut per input"):
        split_vertical(_breast_cancer_model(), ["mean_branch"])
    with pytest.raises(ValueError, match=r"is not minimal"):
        split_vertical(_breast_cancer_model(), ["merge", "error_branch", "worst_branch"])


def test_round_robin_equals_centralized_training_in_the_same_order(rng):
    x, y = _data(rng, 96)
    shards = [(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]) for i in range(3)]
    for handoff in ("peer", "server"):
        model = _mlp()
        split = keras_split.split(model, "b")
        rr = RoundRobin(split.client, split.server, 3, handoff=handoff)
        rr.compile(keras.optimizers.SGD(0.1), LOSS)
        rr.fit(shards, rounds=2, batch_size=8)
        assert rr.weights_seen_by == ({"clients"} if handoff == "peer" else {"server"})
        reference, _ = _reference_fit(_mlp, np.concatenate([x, x]), np.concatenate([y, y]))
        _assert_weights(model.get_weights(), reference.get_weights())


def test_round_robin_with_optimizer_handoff_equals_centralized_adam(rng):
    x, y = _data(rng, 96)
    shards = [(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]) for i in range(3)]
    model = _mlp()
    split = keras_split.split(model, "b")
    rr = RoundRobin(split.client, split.server, 3, handoff_optimizer=True)
    rr.compile(keras.optimizers.Adam(1e-2), LOSS)
    rr.fit(shards, rounds=1, batch_size=8)
    reference, _ = _reference_fit(_mlp, x, y, lambda: keras.optimizers.Adam(1e-2))
    _assert_weights(model.get_weights(), reference.get_weights())


class FailAt(Transport):
    """A client's link that fails at one of its steps, once (a killed process)."""

    def __init__(self, inner, at):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0
        self.bytes = inner.bytes

    def _exchange(self, message):
        self.calls += 1
        if self.calls == self.at:
            raise ConnectionError("client process killed")
        return self.inner.exchange(message), 0, 0  # counted by the inner link


def test_splitfed_v1_averages_like_independent_clients(rng):
    x, y = _data(rng, 96)
    shards = [(x[:24], y[:24]), (x[24:56], y[24:56]), (x[56:], y[56:])]  # unequal sizes
    model = _mlp()
    start = model.get_weights()
    split = keras_split.split(model, "b")
    fed = SplitFed(split.client, split.server, 3, version=1)
    fed.compile(keras.optimizers.SGD(0.1), LOSS)
    fed.fit(shards, rounds=1, batch_size=8)
    # Reference: each client alone, from the same start, with its own server copy.
    trained = []
    for xs, ys in shards:
        alone, _ = _reference_fit(_mlp, xs, ys)  # _mlp() has the same start weights
        trained.append(alone.get_weights())
    want = fedavg(trained, [24, 32, 40])
    _assert_weights(model.get_weights(), want)
    assert model.get_weights()[0] is not start[0]


def test_splitfed_and_round_robin_complete_rounds_without_a_dropped_client(rng):
    x, y = _data(rng, 96)
    shards = [(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]) for i in range(3)]
    for version in (1, 2):
        model = _mlp()
        split = keras_split.split(model, "b")
        fed = SplitFed(split.client, split.server, 3, version=version)
        fed.compile(keras.optimizers.SGD(0.1), LOSS,
                    transport_wrapper=lambda i, t: FailAt(t, 2) if i == 1 else t)
        history = fed.fit(shards, rounds=2, batch_size=8)
        assert history[0]["dropped"] == [1] and history[0]["clients"] == 2
        assert history[1]["dropped"] == [] and history[1]["clients"] == 3  # it rejoined
    model = _mlp()
    split = keras_split.split(model, "b")
    rr = RoundRobin(split.client, split.server, 3)
    rr.compile(keras.optimizers.SGD(0.1), LOSS,
               transport_wrapper=lambda i, t: FailAt(t, 3) if i == 0 else t)
    history = rr.fit(shards, rounds=2, batch_size=8)
    assert history[0]["dropped"] == [0] and set(history[0]["loss"]) == {1, 2}
    assert set(history[1]["loss"]) == {0, 1, 2}


def test_sharding_helpers(rng):
    x, y = rng.normal(size=(300, 4)), rng.integers(0, 3, 300)
    iid = sharding.shard_iid(x, y, 4, seed=0)
    assert sorted(len(s[0]) for s in iid) == [75, 75, 75, 75]
    assert sorted(np.concatenate([s[1] for s in iid]).tolist()) == sorted(y.tolist())
    skewed = sharding.shard_dirichlet(x, y, 4, alpha=0.1, seed=0)
    assert sum(len(s[0]) for s in skewed) == 300
    # Label skew: with alpha=0.1 most clients are dominated by one class.
    dominant = [np.bincount(s[1], minlength=3).max() / len(s[1]) for s in skewed]
    assert np.median(dominant) > 0.7
    balanced = sharding.shard_dirichlet(x, y, 4, alpha=1000, seed=0)
    assert max(np.bincount(s[1], minlength=3).max() / len(s[1]) for s in balanced) < 0.5
    a, b = sharding.split_columns(x, [[0, 2], [1, 3]])
    np.testing.assert_array_equal(a, x[:, [0, 2]])
    with pytest.raises(ValueError, match="overlap"):
        sharding.split_columns(x, [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="`clients` must be an integer"):
        sharding.shard_iid(x, y, 0)


def test_chain_errors():
    with pytest.raises(ValueError, match=r"Cut 2 of 2 \('a'\)"):
        split_chain(_mlp(), ["b", "a"])
    chain = split_chain(_mlp(), ["a"])
    with pytest.raises(ValueError, match="U-shaped learning .* needs at least two cuts"):
        chain.compile("sgd", LOSS, labels="client")
    assert dataclasses.is_dataclass(chain) is False


# -- over gRPC: each party its own server ------------------------------------------


def _grpc_server(model, **options):
    return keras_split.SplitServer(model, tokens={"t": "party"}, insecure=True,
                                   **options).start()


def _link(server, specs):
    transport = keras_split.GrpcTransport(f"127.0.0.1:{server.port}", "t", insecure=True)
    transport.open(specs)
    return transport


def test_multi_hop_over_grpc_equals_unsplit(rng):
    from keras_split.configurations.chain import RelayRole

    x, y = _data(rng)
    model = _mlp()
    first, middle, last = split_chain(model, ["a", "b"]).segments
    end = _grpc_server(last, loss=LOSS, optimizer=keras.optimizers.SGD(0.1))
    relay = RelayRole(middle, keras.optimizers.SGD(0.1),
                      _link(end, [keras_split.partition.spec_of("b", t) for t in last.inputs]))
    hop = _grpc_server(middle, role=relay)
    try:
        client = keras_split.SplitClient(first, server=f"127.0.0.1:{hop.port}", token="t",
                                         insecure=True)
        client.compile(keras.optimizers.SGD(0.1))
        client.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    finally:
        hop.stop()
        end.stop()
    reference, _ = _reference_fit(_mlp, x, y)
    _assert_weights(model.get_weights(), reference.get_weights())


def test_u_shaped_over_grpc_keeps_labels_on_the_client(rng):
    from keras_split.configurations.chain import JoinLabels, KeepLabels, LabelStore, RelayRole
    from keras_split.roles import ServerRole

    x, y = _data(rng)
    model = _mlp()
    head, body, tail = split_chain(model, ["a", "c"]).segments
    store = LabelStore()
    # The client serves its own tail (it holds the labels); the server relays to it.
    tail_server = _grpc_server(tail, role=JoinLabels(
        ServerRole(tail, keras.optimizers.SGD(0.1), LOSS), store))
    relay = RelayRole(body, keras.optimizers.SGD(0.1), _link(
        tail_server, [keras_split.partition.spec_of("c", t) for t in tail.inputs]))
    body_server = _grpc_server(body, role=relay)
    try:
        client = keras_split.SplitClient(head, server=f"127.0.0.1:{body_server.port}",
                                         token="t", insecure=True)
        client.compile(keras.optimizers.SGD(0.1))
        client.transport = KeepLabels(client.transport, store)
        client.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    finally:
        body_server.stop()
        tail_server.stop()
    reference, _ = _reference_fit(_mlp, x, y)
    _assert_weights(model.get_weights(), reference.get_weights())


def _sessions(server, split, count):
    return [_link(server, split.cut_specs) for _ in range(count)]


def test_round_robin_and_splitfed_over_grpc(rng):
    x, y = _data(rng, 96)
    shards = [(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]) for i in range(3)]
    model = _mlp()
    split = keras_split.split(model, "b")
    server = _grpc_server(split.server, loss=LOSS, optimizer=keras.optimizers.SGD(0.1))
    try:
        rr = RoundRobin(split.client, split.server, 3)
        rr.compile(keras.optimizers.SGD(0.1), transports=_sessions(server, split, 3))
        rr.fit(shards, rounds=1, batch_size=8)
    finally:
        server.stop()
    reference, _ = _reference_fit(_mlp, x, y)
    _assert_weights(model.get_weights(), reference.get_weights())

    remote_model, local_model = _mlp(), _mlp()
    remote, local = keras_split.split(remote_model, "b"), keras_split.split(local_model, "b")
    server = _grpc_server(remote.server, loss=LOSS, optimizer=keras.optimizers.SGD(0.1))
    try:
        fed = SplitFed(remote.client, remote.server, 3, version=2)
        fed.compile(keras.optimizers.SGD(0.1), transports=_sessions(server, remote, 3))
        fed.fit(shards, rounds=2, batch_size=8)
    finally:
        server.stop()
    twin = SplitFed(local.client, local.server, 3, version=2)
    twin.compile(keras.optimizers.SGD(0.1), LOSS)
    twin.fit(shards, rounds=2, batch_size=8)
    _assert_weights(remote_model.get_weights(), local_model.get_weights())
    with pytest.raises(ValueError, match="SFLv1 averages one server copy per client"):
        SplitFed(remote.client, remote.server, 3, version=1).compile(
            "sgd", LOSS, transports=[None] * 3)


def test_a_client_whose_server_is_unreachable_drops_out(rng):
    x, y = _data(rng, 96)
    shards = [(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]) for i in range(3)]
    split = keras_split.split(_mlp(), "b")
    server = _grpc_server(split.server, loss=LOSS, optimizer=keras.optimizers.SGD(0.1))
    # Client 2 reaches the server through a path that goes away before the round:
    # its calls fail once the short retry budget is spent.
    gone = _grpc_server(keras.models.clone_model(split.server), loss=LOSS)
    try:
        links = _sessions(server, split, 2) + _sessions(gone, split, 1)
        gone.stop()
        links[2].retry_for = 0.2
        rr = RoundRobin(split.client, split.server, 3)
        rr.compile(keras.optimizers.SGD(0.1), transports=links)
        history = rr.fit(shards, rounds=1, batch_size=8)
    finally:
        server.stop()
    assert history[0]["dropped"] == [2] and set(history[0]["loss"]) == {0, 1}


def test_multi_task_heads_on_two_grpc_servers(rng):
    build = _two_heads
    x, y = _data(rng)
    labels = {"a": y, "b": rng.normal(size=(64, 1)).astype("float32")}
    model = build()
    split = split_multitask(model, "body")
    servers = {"a": _grpc_server(split.heads["a"], loss=LOSS,
                                 optimizer=keras.optimizers.SGD(0.1)),
               "b": _grpc_server(split.heads["b"], loss="mse",
                                 optimizer=keras.optimizers.SGD(0.1))}
    try:
        split.compile(keras.optimizers.SGD(0.1), {"a": LOSS, "b": "mse"},
                      transports={k: _link(s, split.cut_specs) for k, s in servers.items()})
        split.fit(x, labels, batch_size=8, shuffle=False, verbose=0)
    finally:
        for server in servers.values():
            server.stop()
    reference, _ = _reference_fit(build, x, labels, loss={"a": LOSS, "b": "mse"})
    _assert_weights(model.get_weights(), reference.get_weights())


def test_vertical_parties_over_grpc_equal_in_process(tmp_path):
    """Three hospitals, each its own process (as in deployment: each party's
    blocked step holds one of its process's TensorFlow threads while it waits)."""
    import subprocess
    import sys
    from pathlib import Path

    from keras_split.configurations.vertical import GatherRole
    from keras_split.roles import ServerRole

    data = load_breast_cancer()
    x = ((data.data - data.data.mean(0)) / data.data.std(0)).astype("float32")[:256]
    y = data.target[:256]
    parties = sharding.split_columns(x, [slice(0, 10), slice(10, 20), slice(20, 30)])
    cuts = ["mean_branch", "error_branch", "worst_branch"]
    local_model, remote_model = _breast_cancer_model(), _breast_cancer_model()
    local = split_vertical(local_model, cuts)
    local.compile(keras.optimizers.SGD(0.1), LOSS)
    local.fit(parties, y, batch_size=32, epochs=2, seed=0, verbose=0)

    remote = split_vertical(remote_model, cuts)
    names = ["hospital-a", "hospital-b", "hospital-c"]
    role = GatherRole(ServerRole(remote.server, keras.optimizers.SGD(0.1), LOSS), names,
                      labels=y, timeout=60)
    server = keras_split.SplitServer(remote.server, role=role, insecure=True,
                                     tokens={f"t{i}": n for i, n in enumerate(names)}).start()
    script = Path(__file__).resolve().parent / "vertical_party.py"
    processes = []
    try:
        for i in range(3):
            remote.parties[i].save(tmp_path / f"party{i}.keras")
            # The parties send sample IDs; only the server holds the labels.
            np.savez(tmp_path / f"data{i}.npz", x=parties[i], ids=np.arange(len(y)))
            processes.append(subprocess.Popen(
                [sys.executable, str(script), str(tmp_path / f"party{i}.keras"),
                 str(tmp_path / f"data{i}.npz"), str(server.port), f"t{i}",
                 str(tmp_path / f"out{i}.npz")], stderr=subprocess.PIPE, text=True))
        for process in processes:
            _, errors = process.communicate(timeout=240)
            assert process.returncode == 0, errors[-2000:]
    finally:
        server.stop()
    got = []
    for i in range(3):
        with np.load(tmp_path / f"out{i}.npz") as saved:
            got.append([saved[f"arr_{j}"] for j in range(len(saved.files))])
    for i in range(3):
        _assert_weights(got[i], local.parties[i].get_weights())
    _assert_weights(remote.server.get_weights(), local.server.get_weights())


def test_a_relay_whose_downstream_is_gone_says_so_upstream(rng):
    from keras_split.configurations.chain import RelayRole

    x, y = _data(rng, 16)
    first, middle, last = split_chain(_mlp(), ["a", "b"]).segments
    end = _grpc_server(last, loss=LOSS)
    relay = RelayRole(middle, "sgd", _link(end, [keras_split.partition.spec_of("b", t)
                                                 for t in last.inputs]))
    relay.next.retry_for = 0.2
    end.stop()
    hop = _grpc_server(middle, role=relay)
    try:
        client = keras_split.SplitClient(first, server=f"127.0.0.1:{hop.port}", token="t",
                                         insecure=True, retry_for=0)
        client.compile("sgd")
        with pytest.raises(ConnectionError, match="ABORTED .*the party downstream failed"):
            client.fit(x, y, batch_size=8, verbose=0)
    finally:
        hop.stop()
