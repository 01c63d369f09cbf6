"""The round policy on its own (turn order, hand-off, FedAvg, dropouts, round
ends, refused reports), and its two drivers: the in-process `RoundRobin` and
`SplitFed`, and the network `RoundCoordinator`, which consult the same policy
and so make the same decisions from the same events."""

import pickle

import keras
import numpy as np
import pytest

import keras_split
from keras_split.configurations import federation, rounds
from keras_split.configurations.federation import RoundRobin, SplitFed
from keras_split.configurations.policy import (
    RoundError,
    RoundPolicy,
    Turn,
    fedavg,
    fedavg_coefficients,
)
from keras_split.configurations.rounds import RoundCoordinator
from tests.test_configurations import FailAt

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _half(value, dtype="float32"):
    """A client half of two arrays, every value `value`."""
    return [np.full(2, value, dtype), np.full((1, 3), value, dtype)]


def _equal(got, want):
    return len(got) == len(want) and all(
        a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        for a, b in zip(got, want, strict=True))


def _state(policy):
    # Every attribute, arrays included, byte for byte: a refused report must
    # leave all of it as it was (serialized to compare only; nothing is unpickled).
    return pickle.dumps(vars(policy))


# -- the policy by hand -----------------------------------------------------------


def test_round_robin_goes_in_order_of_arrival_and_hands_off():
    policy = RoundPolicy(_half(0), "round_robin", rounds=2, clients=3)
    assert not policy.turn("a", 1, now=0).go  # the first round waits for three clients
    assert not policy.turn("b", 1, now=0).go  # and then a (first to arrive) goes first
    assert not policy.turn("c", 1, now=0).go
    assert policy.members == ["a", "b", "c"]
    first = policy.turn("a", 1, now=0)
    assert first.go and first.round == 1 and _equal(first.weights, _half(0))
    assert not policy.turn("b", 1, now=0).go  # one client at a time
    assert policy.report("a", 1, _half(1), 10, now=1) == 1
    second = policy.turn("b", 1, now=1)
    assert second.go and _equal(second.weights, _half(1))  # a's weights, handed off
    policy.report("b", 1, _half(2), 20, now=2)
    assert _equal(policy.turn("c", 1, now=2).weights, _half(2))
    assert policy.take_round_ends() == []  # c is still training
    assert policy.report("c", 1, _half(3), 30, now=3) == 2  # every member had its turn
    (ended,) = policy.take_round_ends()
    assert ended.round == 1 and _equal(ended.weights, _half(3))
    assert ended.counts == {"a": 10, "b": 20, "c": 30}
    assert policy.history[0].trained == ["a", "b", "c"] and policy.history[0].dropped == []
    assert not policy.turn("c", 2, now=3).go  # round 2 starts with a again
    assert _equal(policy.turn("a", 2, now=3).weights, _half(3))
    for client, value in (("a", 4), ("b", 5), ("c", 6)):
        if client != "a":
            assert policy.turn(client, 2, now=4).go
        policy.report(client, 2, _half(value), 10, now=4)
    assert policy.finished and len(policy.history) == 2 and policy.round == 3
    assert policy.turn("a", 3, now=5) == Turn(False, 3, [], True)
    assert _equal(policy.weights, _half(6))


def test_splitfed_starts_everyone_together_and_averages_by_sample_count():
    policy = RoundPolicy(_half(0), "splitfed", rounds=2, clients=3)
    assert not policy.turn("a", 1, now=0).go
    assert not policy.turn("b", 1, now=0).go
    assert policy.turn("c", 1, now=0).go  # the third arrival starts the round
    starts = [policy.turn(c, 1, now=0) for c in ("a", "b")]
    assert all(s.go and _equal(s.weights, _half(0)) for s in starts)  # the same start
    assert sorted(policy.training) == ["a", "b", "c"]
    policy.report("a", 1, _half(1), 10, now=1)
    assert not policy.turn("a", 1, now=1).go  # once per round
    policy.report("b", 1, _half(4), 30, now=2)
    assert policy.round == 1  # waits for c
    assert policy.report("c", 1, _half(2), 60, now=3) == 2
    # FedAvg by hand: shares 10/100, 30/100, 60/100, so every value is
    # 1 * 0.1 + 4 * 0.3 + 2 * 0.6 = 0.1 + 1.2 + 1.2 = 2.5.
    assert fedavg_coefficients([10, 30, 60]) == pytest.approx([0.1, 0.3, 0.6])
    np.testing.assert_allclose(policy.weights[0], [2.5, 2.5], rtol=1e-6)
    np.testing.assert_allclose(policy.weights[1], [[2.5, 2.5, 2.5]], rtol=1e-6)
    assert [w.dtype for w in policy.weights] == ["float32", "float32"]
    (ended,) = policy.take_round_ends()
    assert ended.counts == {"a": 10, "b": 30, "c": 60}
    second = policy.turn("b", 2, now=4)
    assert second.go and second.round == 2 and _equal(second.weights, policy.weights)


def test_round_robin_drops_a_turn_that_times_out_or_is_never_claimed():
    policy = RoundPolicy(_half(0), "round_robin", rounds=1, clients=3, turn_timeout=10)
    for client in ("a", "b", "c"):
        policy.join(client, now=0)  # the first turn opens at 0
    assert policy.turn("a", 1, now=0).go
    assert policy.next_expiry() == 10
    assert policy.expire(10) == []  # exactly turn_timeout is still in time
    assert policy.expire(10.5) == ["a"]  # a never reported (a killed process)
    assert policy.history[0].dropped == ["a"]
    assert policy.next_expiry() == 20.5  # b's turn opened when a was dropped
    assert policy.expire(21) == ["b"]  # b never asked for it
    third = policy.turn("c", 1, now=21)
    assert third.go and _equal(third.weights, _half(0))  # nobody handed anything on
    with pytest.raises(RoundError, match="no turn of 'a' in round 1"):
        policy.report("a", 1, _half(1), 5, now=22)  # a's late report is refused
    policy.report("c", 1, _half(3), 5, now=22)
    assert policy.finished and policy.history[0].trained == ["c"]
    assert policy.history[0].dropped == ["a", "b"] and policy.next_expiry() is None


def test_splitfed_drops_a_failed_link_and_the_unclaimed_and_they_rejoin():
    policy = RoundPolicy(_half(0), "splitfed", rounds=2, clients=3, turn_timeout=10)
    for client in ("a", "b", "c"):
        policy.join(client, now=0)
    assert all(policy.turn(c, 1, now=0).go for c in ("a", "b", "c"))
    policy.report("a", 1, _half(1), 10, now=1)
    policy.fail("b", now=2)  # its link failed: dropped, its update never counts
    assert policy.round == 1 and policy.history[0].dropped == ["b"]  # c still trains
    with pytest.raises(RoundError, match="has no open turn"):
        policy.fail("b", now=2)
    policy.report("c", 1, _half(4), 30, now=3)
    # FedAvg of a and c only: (1 * 10 + 4 * 30) / 40 = 130 / 40 = 3.25.
    assert _equal(policy.weights, _half(3.25))
    rejoined = policy.turn("b", 2, now=3)  # b takes part again in the next round
    assert rejoined.go and _equal(rejoined.weights, _half(3.25))
    policy.report("b", 2, _half(5), 10, now=5)
    # a and c never claim round 2 (opened at 3): both are dropped at once, and
    # the round ends once, with b's report alone.
    assert policy.next_expiry() == 13
    assert policy.expire(13.5) == ["a", "c"]
    assert policy.finished and policy.history[1].dropped == ["a", "c"]
    assert policy.history[1].trained == ["b"] and _equal(policy.weights, _half(5))
    assert [e.round for e in policy.take_round_ends()] == [1, 2]


def test_a_dropout_does_not_end_the_round_for_those_yet_to_start():
    policy = RoundPolicy(_half(0), "splitfed", rounds=1, clients=3, turn_timeout=10)
    for client in ("a", "b", "c"):
        policy.join(client, now=0)
    assert policy.turn("a", 1, now=0).go
    policy.fail("a", now=1)
    assert policy.round == 1  # b and c have not asked yet, and have time to
    for client, value in (("b", 2), ("c", 6)):
        assert policy.turn(client, 1, now=2).go
        policy.report(client, 1, _half(value), 10, now=3)
    assert policy.finished and _equal(policy.weights, _half(4))  # (2 * 10 + 6 * 10) / 20
    assert policy.history[0].dropped == ["a"] and policy.history[0].trained == ["b", "c"]


def test_a_round_that_everyone_drops_keeps_its_weights():
    policy = RoundPolicy(_half(7), "splitfed", rounds=2, clients=2)
    assert policy.turn("a", 1, now=0).go is False and policy.turn("b", 1, now=0).go
    policy.turn("a", 1, now=0)
    policy.fail("a", now=1)
    policy.fail("b", now=1)
    (ended,) = policy.take_round_ends()
    assert ended.counts == {} and _equal(ended.weights, _half(7)) and policy.round == 2


def _two_training(max_samples=1000):
    policy = RoundPolicy(_half(0), "splitfed", rounds=1, clients=2, turn_timeout=10,
                         max_samples=max_samples)
    for client in ("a", "b"):
        policy.join(client, now=0)
    assert policy.turn("a", 1, now=0).go and policy.turn("b", 1, now=0).go
    policy.report("b", 1, _half(1), 5, now=1)  # the round goes on: a is training
    return policy


GOOD = _half(2)


@pytest.mark.parametrize("client, round_, weights, samples, now, match", [
    ("c", 1, GOOD, 5, 2, "no turn of 'c' in round 1"),  # a stranger
    ("b", 1, GOOD, 5, 2, "no turn of 'b' in round 1"),  # a second report
    ("a", 2, GOOD, 5, 2, "no turn of 'a' in round 2 is open"),  # the wrong round
    ("a", 1, GOOD, 5, 10.5, "late: its turn started 10.5 s ago"),
    ("a", 1, GOOD, -5, 2, "sample count of -5"),
    ("a", 1, GOOD, 0, 2, "sample count of 0"),
    ("a", 1, GOOD, 1001, 2, r"sample count of 1001; expected an integer in 1\.\.1000"),
    ("a", 1, GOOD, 2.5, 2, "sample count of 2.5"),
    ("a", 1, GOOD, True, 2, "sample count of True"),
    ("a", 1, None, 5, 2, "weights of type NoneType"),
    ("a", 1, GOOD[:1], 5, 2, "gives 1 weight arrays; the client half has 2"),
    ("a", 1, [np.zeros(3, "float32"), GOOD[1]], 5, 2, r"shapes .*\(3,\)"),
    ("a", 1, [GOOD[0].astype("float64"), GOOD[1]], 5, 2, "dtypes .*float64"),
    ("a", 1, [GOOD[0], np.full((1, 3), np.nan, "float32")], 5, 2,
     r"non-finite values \(NaN or inf\) in weights\[1\]"),
    ("a", 1, [np.array([1.0, np.inf], "float32"), GOOD[1]], 5, 2, "non-finite"),
])
def test_a_refused_report_changes_nothing(client, round_, weights, samples, now, match):
    policy = _two_training()
    before = _state(policy)
    with pytest.raises(RoundError, match=match):
        policy.report(client, round_, weights, samples, now)
    assert _state(policy) == before
    # The turn is still open: a good report is taken and ends the round.
    # FedAvg by hand: (1 * 5 + 2 * 5) / 10 = 1.5.
    policy.report("a", 1, GOOD, 5, now=3)
    assert policy.finished and _equal(policy.weights, _half(1.5))


def test_fedavg_never_divides_by_zero():
    with pytest.raises(ValueError, match="No weights to average"):
        fedavg([], [])
    for counts in ([0, 0], [3, -3], [2, 0], [1.5, 2]):
        with pytest.raises(ValueError, match="positive integer sample count"):
            fedavg([_half(1), _half(2)], counts)
    with pytest.raises(ValueError, match="2 weight lists, received 1 counts"):
        fedavg([_half(1), _half(2)], [1])
    assert _equal(fedavg([_half(1), _half(3)], [4, 4]), _half(2))  # (1 * 4 + 3 * 4) / 8


def test_policy_arguments_are_checked():
    with pytest.raises(ValueError, match="`mode` must be 'round_robin' or 'splitfed'"):
        RoundPolicy(_half(0), "gossip")
    with pytest.raises(ValueError, match="`rounds` must be a non-negative integer"):
        RoundPolicy(_half(0), rounds=-1)
    with pytest.raises(ValueError, match="`clients` must be a positive integer, received 0"):
        RoundPolicy(_half(0), clients=0)
    with pytest.raises(ValueError, match="`turn_timeout` must be a positive number"):
        RoundPolicy(_half(0), turn_timeout=0)
    with pytest.raises(ValueError, match="`max_samples` must be a positive integer"):
        RoundPolicy(_half(0), max_samples=0)


# -- two drivers, one policy ------------------------------------------------------

# A scripted sequence of events: (event, client, arguments..., time). It covers
# arrivals, turns, hand-offs, a failed link, a late report, a report of the
# wrong shape, a timeout and a turn never claimed.
SCRIPT = [
    ("turn", "a", 1, 0.0),
    ("turn", "b", 1, 0.0),
    ("join", "c", 0.5),
    ("turn", "a", 1, 0.5),
    ("turn", "b", 1, 0.5),
    ("turn", "c", 1, 0.5),
    ("report", "a", 1, 1.0, 10, 1.0),
    ("report", "a", 1, 1.0, 10, 1.0),
    ("turn", "b", 1, 1.0),
    ("turn", "c", 1, 1.0),
    ("fail", "b", 2.0),
    ("turn", "c", 1, 2.0),
    ("report", "c", 1, [np.zeros(5, "float32")], 20, 2.5),
    ("report", "c", 1, 3.0, 20, 2.5),
    ("turn", "b", 1, 3.0),
    ("turn", "a", 2, 3.0),
    ("turn", "b", 2, 3.0),
    ("turn", "c", 2, 3.0),
    ("report", "b", 2, 5.0, 30, 20.0),
    ("turn", "a", 2, 20.0),
    ("turn", "b", 2, 20.0),
    ("turn", "c", 2, 20.0),
    ("report", "b", 2, 4.0, 10, 21.0),
    ("report", "b", 3, 4.0, 10, 21.0),
    ("turn", "c", 2, 22.0),
    ("report", "c", 2, 5.0, 30, 23.0),
    ("report", "c", 3, 5.0, 30, 23.0),
    ("turn", "a", 3, 24.0),
    ("report", "a", 3, 6.0, 10, 25.0),
    ("fail", "b", 26.0),
    ("turn", "b", 3, 26.0),
    ("report", "b", 3, 7.0, 10, 27.0),
    ("turn", "a", 4, 40.0),
]


def _outcome(call):
    try:
        result = call()
    except RoundError as error:
        return "refused", str(error)
    if isinstance(result, Turn):
        result = (result.go, result.round, result.weights, result.finished)
    return result


def _same(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return _equal([np.asarray(a)], [np.asarray(b)])
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("mode", ["round_robin", "splitfed"])
def test_the_coordinator_decides_as_its_policy(mode):
    policy = RoundPolicy(_half(0), mode, rounds=3, clients=3, turn_timeout=10)
    clock = [0.0]
    coordinator = RoundCoordinator(_half(0), mode, rounds=3, clients=3, turn_timeout=10,
                                   poll=0, clock=lambda: clock[0])
    assert isinstance(coordinator.policy, RoundPolicy)
    decisions = []
    for event, client, *arguments, now in SCRIPT:
        clock[0] = now
        if event == "report":
            round_, value, samples = arguments
            weights = value if isinstance(value, list) else _half(value)
            arguments = [round_, weights, samples]
        direct = _outcome(lambda e=event, c=client, a=arguments, t=now:
                          getattr(policy, e)(c, *a, t))
        through = _outcome(lambda e=event, c=client, a=arguments: getattr(coordinator, e)(c, *a))
        assert _same(direct, through), (event, client, arguments, now, direct, through)
        decisions.append(direct)
    assert [(r.round, r.trained, r.dropped) for r in coordinator.history] == [
        (r.round, r.trained, r.dropped) for r in policy.history]
    assert _equal(coordinator.weights, policy.weights)
    # The script is not vacuous: turns went, reports were refused, clients dropped.
    assert any(isinstance(d, tuple) and d[0] is True for d in decisions)
    assert sum(isinstance(d, tuple) and d[0] == "refused" for d in decisions) >= 2
    assert any(r.dropped for r in policy.history) and any(r.trained for r in policy.history)


@pytest.fixture
def spies(monkeypatch):
    """Both drivers build their policy from `RoundPolicy`; this makes each one
    a spy that records the events its driver sends and the answers."""
    made = []

    class Spy(RoundPolicy):
        def __init__(self, *arguments, **options):
            super().__init__(*arguments, **options)
            self.log, self._inside = [], False
            made.append(self)

        def _record(self, event, call, *arguments):
            if self._inside:  # an event called from another (turn joins): not the driver's
                return call(*arguments)
            self._inside = True
            try:
                result = _outcome(lambda: call(*arguments))
            finally:
                self._inside = False
            self.log.append((event, arguments[:-1], result))  # all but the time
            if isinstance(result, tuple) and result[0] == "refused":
                raise RoundError(result[1])
            if event == "turn":
                return Turn(*result)
            return result

        def join(self, client_id, now):
            return self._record("join", super().join, client_id, now)

        def turn(self, client_id, ready_for, now):
            return self._record("turn", super().turn, client_id, ready_for, now)

        def report(self, client_id, round_, weights, samples, now):
            return self._record("report", super().report, client_id, round_, weights, samples,
                                now)

        def fail(self, client_id, now):
            return self._record("fail", super().fail, client_id, now)

    monkeypatch.setattr(federation, "RoundPolicy", Spy)
    monkeypatch.setattr(rounds, "RoundPolicy", Spy)
    return made


def _mlp():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, activation="tanh", name="a")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x))


@pytest.mark.parametrize("driver", ["round_robin", "splitfed_v1", "splitfed_v2"])
def test_both_drivers_consult_the_same_policy(spies, rng, driver):
    shards = [(rng.normal(size=(16, 6)).astype("float32"), rng.integers(0, 3, 16))
              for _ in range(3)]
    split = keras_split.split(_mlp(), "a")
    start = split.client.get_weights()
    failing = 0 if driver == "round_robin" else 1  # its link fails in round 1
    if driver == "round_robin":
        local = RoundRobin(split.client, split.server, 3)
    else:
        local = SplitFed(split.client, split.server, 3, version=int(driver[-1]))
    local.compile(keras.optimizers.SGD(0.1), LOSS,
                  transport_wrapper=lambda i, t: FailAt(t, 2) if i == failing else t)
    history = local.fit(shards, rounds=2, batch_size=8)
    assert history[0]["dropped"] == [failing] and history[1]["dropped"] == []
    (in_process,) = spies
    assert local.policy is in_process

    # The network driver, fed the same events, consults its policy the same way
    # and so decides the same: who goes, from which weights, the FedAvg.
    coordinator = RoundCoordinator(start, "round_robin" if driver == "round_robin" else
                                   "splitfed", rounds=2, clients=3, poll=0, clock=lambda: 0.0)
    for event, arguments, _ in in_process.log:
        if event == "fail":
            coordinator.fail(*arguments)
        else:
            getattr(coordinator, event)(*arguments)
    network = spies[1]
    assert coordinator.policy is network
    assert len(network.log) == len(in_process.log)
    for ours, theirs in zip(in_process.log, network.log, strict=True):
        assert _same(ours, theirs), (ours, theirs)
    assert _equal(coordinator.weights, split.client.get_weights())
    assert [r.dropped for r in coordinator.history] == [r["dropped"] for r in history]


def test_in_process_a_refused_report_is_a_dropout(rng):
    shards = [(rng.normal(size=(16, 6)).astype("float32"), rng.integers(0, 3, 16))
              for _ in range(2)]
    split = keras_split.split(_mlp(), "a")
    fed = SplitFed(split.client, split.server, 2, version=2)
    fed.compile(keras.optimizers.SGD(0.1), LOSS)
    diverged = fed.clients[1].client
    trained = diverged.get_weights
    # Client 1's training "diverges": the policy refuses its report (non-finite
    # values), and it drops out of the round like a client whose link failed.
    diverged.get_weights = lambda: [np.full_like(w, np.nan) for w in trained()]
    history = fed.fit(shards, rounds=1, batch_size=8)
    assert history == [{"round": 1, "dropped": [1], "clients": 1}]
    assert fed.policy.history[0].trained == [0]
    # FedAvg of client 0 alone is client 0's weights.
    assert _equal(split.client.get_weights(), fed.clients[0].client.get_weights())
