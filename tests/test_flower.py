"""Flower runs the rounds, keras_split's gRPC carries the steps (keras_split.flower):
SplitFed v2 and round-robin through Flower's simulation engine equal the
in-process `SplitFed`/`RoundRobin`, with Adam, each client's optimizer state
kept across rounds (on the node, in Flower's Context.state), and the split
steps over TLS with development certificates.

Skipped without the `flower` extra (`pip install 'keras-split[flower]'`)."""

import functools
from pathlib import Path

import keras
import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

import keras_split  # noqa: E402
from keras_split import flower  # noqa: E402
from keras_split.network import devcerts  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
NODES, ROUNDS, SAMPLES = 3, 2, 24
# One actor (one TensorFlow start) runs the ClientApps, one at a time.
BACKEND = {"init_args": {"num_cpus": 1}, "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}

# Ray leaves files and processes to the garbage collector, and Flower's and
# Ray's imports warn of their own deprecations: not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _split():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10,))
    hidden = keras.layers.Dense(8, activation="relu", name="cut")(inputs)
    return keras_split.split(keras.Model(inputs, keras.layers.Dense(3)(hidden)), "cut")


def _shard(index):
    rng = np.random.default_rng(100 + index)
    # Unequal shards, so FedAvg's sample weighting matters.
    n = SAMPLES + 8 * index
    return rng.normal(size=(n, 10)).astype("float32"), rng.integers(0, 3, n)


# What the ClientApp runs on a node (pickled to a Ray actor): recipes, no live models.
def client_half(context):
    return _split().client


def node_data(context):
    return _shard(int(context.node_config["partition-id"]))


def flaky_data(marker, context):
    """Partition 1's first turn fails (once: the marker file says it did)."""
    if int(context.node_config["partition-id"]) == 1 and not Path(marker).exists():
        Path(marker).touch()
        raise ConnectionError("the node lost its link")
    return node_data(context)


def _adam():
    return keras.optimizers.Adam(1e-2)


@pytest.fixture
def simulate(monkeypatch, tmp_path):
    from flwr.simulation import run_simulation

    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    certs = devcerts.write_dev_certificates(tmp_path / "certs")

    def run(split, data=node_data, **options):
        for attempt in (1, 2):
            rounds = flower.SplitRounds(split, LOSS, _adam(), rounds=ROUNDS, min_nodes=NODES,
                                        certificate=certs["server_cert"],
                                        private_key=certs["server_key"],
                                        root_certificates=certs["ca"], **options)
            app = flower.client_app(client_half, data, _adam, batch_size=8)
            try:
                run_simulation(rounds.server_app(), app, num_supernodes=NODES,
                               backend_config=BACKEND)
            except RuntimeError as error:
                # Ray's own start-up, before any node ran (its control store's
                # port file, 60 s on a busy machine): once more, on a fresh Ray.
                if attempt == 2 or not _ray_did_not_start(error):
                    raise
                import ray

                ray.shutdown()
                continue
            return rounds

    return run


def _ray_did_not_start(error: BaseException | None) -> bool:
    while error is not None:
        if "Timed out waiting for file" in str(error) and "gcs_server" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _order(rounds):
    """The shards in the order the nodes trained (the same every round)."""
    first = rounds.history[0]
    for record in rounds.history:
        assert record["trained"] == first["trained"] and record["dropped"] == []
    partitions = [int(first["metrics"][node]["partition-id"]) for node in first["trained"]]
    assert sorted(partitions) == list(range(NODES))
    return [_shard(p) for p in partitions]


def _assert_equal(got, want):
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_splitfed_v2_through_flower_equals_in_process_splitfed(simulate):
    split = _split()
    rounds = simulate(split, mode="splitfed", sequential=True)
    assert len(rounds.history) == ROUNDS
    shards = _order(rounds)
    assert [rounds.history[0]["samples"][n] for n in rounds.history[0]["trained"]] == [
        len(x) for x, _ in shards]

    local = _split()
    reference = keras_split.SplitFed(local.client, local.server, NODES, version=2)
    reference.compile(_adam(), LOSS)
    reference.fit(shards, rounds=ROUNDS, batch_size=8)
    _assert_equal(rounds.weights, local.client.get_weights())
    _assert_equal(split.server.get_weights(), local.server.get_weights())


@pytest.mark.parametrize("handoff_optimizer", [False, True], ids=["own-adam", "handed-adam"])
def test_round_robin_through_flower_equals_in_process_round_robin(simulate, handoff_optimizer):
    split = _split()
    rounds = simulate(split, mode="round_robin", handoff_optimizer=handoff_optimizer)
    shards = _order(rounds)

    local = _split()
    reference = keras_split.RoundRobin(local.client, local.server, NODES,
                                       handoff_optimizer=handoff_optimizer)
    reference.compile(_adam(), LOSS)
    reference.fit(shards, rounds=ROUNDS, batch_size=8)
    _assert_equal(rounds.weights, local.client.get_weights())
    _assert_equal(split.server.get_weights(), local.server.get_weights())


def test_concurrent_splitfed_drops_a_failed_node_and_takes_it_back(simulate, tmp_path):
    # By default every node gets its turn at once (SFLv2 as a real server runs
    # it); a node whose ClientApp fails is dropped for the round, the round's
    # FedAvg is over the others, and it trains again in the next round.
    split = _split()
    start = split.client.get_weights()
    rounds = simulate(split, data=functools.partial(flaky_data, str(tmp_path / "failed")),
                      mode="splitfed")
    first, second = rounds.history
    assert len(first["dropped"]) == 1 and len(first["trained"]) == NODES - 1
    assert sorted(second["trained"]) == sorted(first["trained"] + first["dropped"])
    assert second["dropped"] == []
    assert {int(m["partition-id"]) for m in first["metrics"].values()} == {0, 2}
    assert all(np.isfinite(w).all() for w in rounds.weights)
    assert not all(np.allclose(a, b) for a, b in zip(rounds.weights, start, strict=True))
