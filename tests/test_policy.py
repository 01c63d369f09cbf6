"""The round policy on its own (turn order, hand-off, FedAvg, dropouts, round
ends, refused reports), and its two drivers: the in-process `RoundRobin` and
`SplitFed`, and the network `RoundCoordinator`, which consult the same policy
and so make the same decisions from the same events."""

import copy
import json
import pickle

import hypothesis
import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    # Finite but absurd: one such weight would outweigh every other client's.
    ("a", 1, [np.full(2, 3e38, "float32"), GOOD[1]], 5, 2,
     r"magnitude up to 3e\+38, beyond max_weight=1e\+06 in weights\[0\]"),
    ("a", 1, [GOOD[0], np.full((1, 3), -2e6, "float32")], 5, 2, r"beyond max_weight"),
    ("a", 1, [GOOD[0].astype("int32"), GOOD[1]], 5, 2, "dtypes .*int32"),
    ("a", 1, GOOD + [GOOD[0]], 5, 2, "gives 3 weight arrays; the client half has 2"),
    ("a", 1, np.stack([GOOD[0], GOOD[0]]), 5, 2, "weights of type ndarray"),
    ("a", 1, "weights", 5, 2, "weights of type str"),
    ("a", 1, [[1.0, 2.0], [[1.0], [2.0, 3.0]]], 5, 2, "weights that are not arrays"),
    ("a", 1, [object(), object()], 5, 2, "dtypes .*object"),
    # b reported 5 samples: a count of -5 would make the FedAvg total zero.
    ("a", 1, GOOD, np.int64(-5), 2, "sample count of -5"),
    ("a", 1, GOOD, 10**30, 2, "sample count of 10{30}"),
    ("a", 1, GOOD, "5", 2, "sample count of '5'"),
    ("a", 1, GOOD, None, 2, "sample count of None"),
    ("a", None, GOOD, 5, 2, "names round None; `round` must be an integer"),
    ("a", np.array([1, 1]), GOOD, 5, 2, "names round"),
    (["a"], 1, GOOD, 5, 2, "client id must be hashable"),
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
    (entry,) = history
    counted = entry.pop("bytes")
    assert entry == {"round": 1, "dropped": [1], "clients": 1}
    # Both received the round's client half (35 float32 = 140 B); only client 0's
    # trained half was taken back: the refused report sent nothing the round used.
    assert [(counted[i]["handoff_down"], counted[i]["handoff_up"]) for i in (0, 1)] == [
        (140, 140), (140, 0)]
    assert fed.policy.history[0].trained == [0]
    # FedAvg of client 0 alone is client 0's weights.
    assert _equal(split.client.get_weights(), fed.clients[0].client.get_weights())


# -- no call derails the rounds ---------------------------------------------------


def test_fedavg_sums_in_float64_so_finite_reports_average_to_finite_weights():
    # In float32, 3e38 + 3e38 overflows to inf; the average, 3e38, does not.
    big = [np.full(2, 3e38, "float32")]
    (averaged,) = fedavg([big, big], [1, 1])
    assert averaged.dtype == "float32" and np.isfinite(averaged).all()
    np.testing.assert_allclose(averaged, 3e38, rtol=1e-7)
    # float16: a small client's share survives (1 * 1/1001 would be lost in
    # float16 sums at 2048); (2048 * 1000 + 0 * 1) / 1001 = 2045.95 -> 2046.
    (half,) = fedavg([[np.full(1, 2048, "float16")], [np.zeros(1, "float16")]], [1000, 1])
    assert half.dtype == "float16" and half[0] == 2046
    # Integers round to the nearest value their dtype holds: (1 * 1 + 2 * 2) / 3 = 1.67 -> 2,
    # and an int64 at its maximum stays there instead of overflowing the cast.
    top = np.iinfo("int64").max
    got = fedavg([[np.array([1, top], "int64")], [np.array([2, top], "int64")]], [1, 2])
    assert got[0].dtype == "int64" and got[0][0] == 2 and got[0][1] > top - 2048


def test_without_a_bound_huge_finite_reports_still_average_to_finite_weights():
    policy = RoundPolicy(_half(0), "splitfed", rounds=1, clients=2, max_weight=None)
    for client in ("a", "b"):
        policy.join(client, now=0)
    for client in ("a", "b"):
        assert policy.turn(client, 1, now=0).go
        policy.report(client, 1, _half(3e38), 10, now=1)
    assert policy.finished and all(np.isfinite(w).all() for w in policy.weights)


def test_the_initial_weights_are_checked():
    with pytest.raises(ValueError, match=r"initial weights\[1\] have non-finite values"):
        RoundPolicy([np.zeros(2), np.full(2, np.nan)])
    with pytest.raises(ValueError, match=r"beyond max_weight=10.*a larger `max_weight`"):
        RoundPolicy([np.full(2, 20.0)], max_weight=10)
    with pytest.raises(ValueError, match="must be numeric arrays"):
        RoundPolicy([np.array(["a"])])
    with pytest.raises(ValueError, match="`max_weight` must be a positive number or None"):
        RoundPolicy(_half(0), max_weight=0)


def test_a_dropped_client_cannot_report_and_bad_turns_change_nothing():
    policy = _two_training()
    policy.fail("a", now=2)  # the round ends with b's report alone
    assert policy.finished
    before = _state(policy)
    for call, match in [
            (lambda: policy.report("a", 1, GOOD, 5, now=3), "no turn of 'a' in round 1"),
            (lambda: policy.fail("a", now=3), "has no open turn"),
            (lambda: policy.turn("a", None, now=3), "must be an integer"),
            (lambda: policy.turn({}, 1, now=3), "must be hashable"),
            (lambda: policy.join([], now=3), "must be hashable"),
            (lambda: policy.fail([], now=3), "must be hashable")]:
        with pytest.raises(RoundError, match=match):
            call()
        assert _state(policy) == before


def _header_and_arrays(coordinator):
    header, arrays = coordinator.state()
    return json.dumps(header, sort_keys=True), {k: v.tobytes() for k, v in arrays.items()}


@pytest.mark.parametrize("mode", ["round_robin", "splitfed"])
def test_the_coordinator_refuses_bad_calls_with_round_errors_only(mode):
    clock = [0.0]
    coordinator = RoundCoordinator(_half(0), mode, rounds=2, clients=2, turn_timeout=10,
                                   poll=0, max_samples=1000, clock=lambda: clock[0])
    coordinator.turn("a", 1)
    assert coordinator.turn("b", 1)[0] or coordinator.turn("a", 1)[0]
    training = coordinator.policy.training[0]
    before = _header_and_arrays(coordinator)
    bad = [(training, 1, [np.full(2, 3e38, "float32"), GOOD[1]], 5),
           (training, 1, [GOOD[0].astype("int64"), GOOD[1]], 5),
           (training, 1, GOOD[:1], 5), (training, 1, GOOD, 0), (training, 1, GOOD, -10**12),
           (training, 1, GOOD, 10**12), (training, 1, [np.full(2, np.nan, "float32"),
                                                       GOOD[1]], 5),
           (training, "1", GOOD, 5), (training, 2, GOOD, 5), ("stranger", 1, GOOD, 5),
           (["unhashable"], 1, GOOD, 5), (training, 1, None, 5), (training, 1, GOOD, 2.0)]
    for report in bad:
        with pytest.raises(RoundError):
            coordinator.report(*report)
        assert _header_and_arrays(coordinator) == before, report
    for call in (lambda: coordinator.turn(["x"], 1), lambda: coordinator.turn("a", "1"),
                 lambda: coordinator.fail("stranger"), lambda: coordinator.join({})):
        with pytest.raises(RoundError):
            call()
        assert _header_and_arrays(coordinator) == before
    clock[0] = 1.0
    assert coordinator.report(training, 1, GOOD, 5) in (1, 2)  # the turn is still open


# Random sequences of events, good and bad, against the policy and (with a
# checkpoint and restore at a random point) the coordinator, on a fake clock.
CLIENTS = ["a", "b", "c", "d"]
TIMEOUT = 10.0
START = _half(0)
_BAD_WEIGHTS = {
    "count": lambda v: _half(v)[:1],
    "extra": lambda v: _half(v) + [np.zeros(1, "float32")],
    "int": lambda v: [w.astype("int32") for w in _half(v)],
    "float64": lambda v: _half(v, "float64"),
    "shape": lambda v: [np.zeros(3, "float32"), _half(v)[1]],
    "nan": lambda v: [np.full(2, np.nan, "float32"), _half(v)[1]],
    "inf": lambda v: [_half(v)[0], np.full((1, 3), -np.inf, "float32")],
    "huge": lambda v: [np.full(2, 3e38, "float32"), _half(v)[1]],
    "ndarray": lambda v: np.zeros(2, "float32"),
    "ragged": lambda v: [[v, v], [[v], [v, v]]],
    "none": lambda v: None,
}
# "training" and "next" stand for a client training now and one the policy
# would let start (filled in at the time), so that sequences make progress.
_clients = st.sampled_from(["training"] * 3 + ["next"] * 3 + [*CLIENTS, "unhashable"])
_rounds = st.sampled_from(["current", "current", "current", "next", "previous", 0, None, "1"])
_samples = st.one_of(st.integers(1, 100), st.integers(-10**12, 10**12),
                     st.sampled_from([0, -1, 10**9, 10**9 + 1, True, 2.5, None, "5",
                                      "minus the others"]))
_FIELDS = ("client", "round", "weights", "samples")
# One step: an event (its kind drawn with these weights, so that sequences
# make progress: turns that go and reports that are taken), then `dt` seconds.
_KINDS = (["turn that goes"] * 4 + ["report that fits"] * 4 + ["turn"] * 2 + ["report"] * 2
          + [f"report that fits but for its {field}" for field in _FIELDS] * 2
          + ["join", "fail", "expire"])
# Mostly 0 or 0.5 s between events, sometimes up to and past the timeout.
# Multiples of 0.5 s: sums of them are exact, so times saved as "seconds
# elapsed" and restored give the same decisions as times never saved.
_DT = [0.0] * 20 + [0.5] * 20 + [2.0, 5.0, 10.0, 10.5, 30.0]
_steps = st.lists(st.tuples(st.sampled_from(_KINDS), _clients, _rounds,
                            st.sampled_from(["good"] + sorted(_BAD_WEIGHTS)),
                            st.floats(-100, 100, allow_nan=False), _samples,
                            st.integers(1, 100), st.sampled_from(_DT)),
                  min_size=10, max_size=80)


def _arguments(policy, step):
    """The step's event and its arguments, with the placeholders filled in
    from the policy."""
    kind, client, round_, weights, value, samples, good_samples, _ = step
    if kind == "turn that goes":
        client, round_ = "next", "current"
    elif kind.startswith("report that fits"):
        # Every field fits but (maybe) one, drawn at random: each check alone.
        fits = {"client": "training", "round": "current", "weights": "good",
                "samples": good_samples}
        fits.pop(kind.rsplit(" ", 1)[1], None)
        client, round_ = fits.get("client", client), fits.get("round", round_)
        weights, samples = fits.get("weights", weights), fits.get("samples", samples)
    if client == "training":
        client = policy.training[0] if policy.training else CLIENTS[0]
    elif client == "next":
        ready = [c for c in CLIENTS if c in policy.members and policy.may_start(c, policy.round)]
        new = [c for c in CLIENTS if c not in policy.members]
        client = (ready + new + CLIENTS)[0]
    client = ["x"] if client == "unhashable" else client
    name = kind.split()[0]
    if name in ("join", "fail"):
        return name, [client]
    if name == "expire":
        return name, []
    round_ = {"current": policy.round, "next": policy.round + 1,
              "previous": policy.round - 1}.get(round_, round_)
    if name == "turn":
        return name, [client, round_]
    weights = _half(value) if weights == "good" else _BAD_WEIGHTS[weights](value)
    if samples == "minus the others":
        samples = -sum(policy._counts.values())
    return name, [client, round_, weights, samples]


def _check_invariants(policy, now, round_before, ends):
    assert round_before <= policy.round <= policy.rounds + 1
    assert len(policy.history) == min(policy.round, policy.rounds)
    assert [r.round for r in policy.history] == list(range(1, len(policy.history) + 1))
    for weights in [policy.weights] + [end.weights for end in ends]:
        assert [(w.dtype, w.shape) for w in weights] == [(w.dtype, w.shape) for w in START]
        assert all(np.isfinite(w).all() and (np.abs(w) <= policy.max_weight).all()
                   for w in weights), weights
    # Liveness: once the first round has started, something is always due
    # within turn_timeout of now, until the rounds are finished.
    started = policy.round > 1 or len(policy.members) >= policy.expected
    if started and not policy.finished:
        due = policy.next_expiry()
        assert due is not None and due <= now + TIMEOUT, (policy, due, now)


def _runs_out(policy, now):
    """From here, with every client gone (only `expire` calls, each when the
    policy says something is due), the rounds finish, and within a bound."""
    policy = copy.deepcopy(policy)
    for index in range(policy.expected - len(policy.members)):
        policy.join(f"late{index}", now)  # the rest arrive, and vanish too
    members, left = len(policy.members), policy.rounds - policy.round + 1
    # Round-robin: one member per due time; SplitFed: each training client's
    # own due time, then the unclaimed round's.
    budget = max(left, 0) * (members + 1)
    start = now
    for _ in range(budget):
        if policy.finished:
            break
        due = policy.next_expiry()
        assert due is not None, policy
        now = max(now, due) + 0.5
        assert policy.expire(now), (policy, now)  # every due time drops someone
    assert policy.finished, policy
    assert now - start <= budget * (TIMEOUT + 0.5)


@settings(max_examples=500, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["round_robin", "splitfed"]), rounds_=st.integers(1, 3),
       clients=st.integers(1, 3), steps=_steps, save_at=st.integers(0, 80))
def test_no_sequence_of_events_derails_a_round(mode, rounds_, clients, steps, save_at):
    policy = RoundPolicy(START, mode, rounds_, clients, turn_timeout=TIMEOUT)
    clock = [0.0]

    def coordinator_from(state=None):
        made = RoundCoordinator(START, mode, rounds_, clients, turn_timeout=TIMEOUT, poll=0,
                                clock=lambda: clock[0])
        if state is not None:
            made.restore(json.loads(json.dumps(state[0])), state[1])
        return made

    coordinator = coordinator_from()
    for index, step in enumerate(steps):
        if index == save_at:  # the server restarts: a fresh coordinator from its checkpoint
            coordinator = coordinator_from(coordinator.state())
        clock[0] += step[-1]
        name, arguments = _arguments(policy, step)
        before, round_before = _state(policy), policy.round
        # Only RoundError is caught: any other exception fails the test.
        direct = _outcome(lambda n=name, a=arguments: getattr(policy, n)(*a, clock[0]))
        through = _outcome(lambda n=name, a=arguments, c=coordinator: getattr(c, n)(*a))
        assert _same(direct, through), (name, arguments, direct, through)
        if isinstance(direct, tuple) and direct[0] == "refused":
            assert _state(policy) == before, (name, arguments, direct)
        _check_invariants(policy, clock[0], round_before, policy.take_round_ends())
    hypothesis.event(f"reached round {min(policy.round, rounds_)} of {rounds_}"
          f"{' (finished)' if policy.finished else ''}")
    hypothesis.event(f"{sum(len(r.trained) for r in policy.history)} reports taken")
    # The coordinator, restarted or not, is where the policy is.
    assert _same(list(coordinator.state()[0].items()),
                 list(policy.state(clock[0])[0].items()))
    assert _equal(coordinator.weights, policy.weights)
    _runs_out(policy, clock[0])


# -- checkpoints ------------------------------------------------------------------


def _play(coordinator, clock, events):
    outcomes = []
    for event, client, *arguments, now in events:
        clock[0] = now
        if event == "report":
            round_, value, samples = arguments
            weights = value if isinstance(value, list) else _half(value)
            arguments = [round_, weights, samples]
        outcomes.append(_outcome(lambda e=event, c=client, a=arguments:
                                 getattr(coordinator, e)(c, *a)))
    return outcomes


@pytest.mark.parametrize("mode", ["round_robin", "splitfed"])
def test_a_restored_coordinator_carries_on_as_if_it_never_stopped(mode):
    def fresh(clock):
        return RoundCoordinator(_half(0), mode, rounds=3, clients=3, turn_timeout=10, poll=0,
                                clock=lambda: clock[0])

    clock = [0.0]
    never_stopped = fresh(clock)
    want = _play(never_stopped, clock, SCRIPT)
    pending = 0
    for cut in range(len(SCRIPT) + 1):  # a restart after every event in turn
        clock = [0.0]
        first = fresh(clock)
        got = _play(first, clock, SCRIPT[:cut])
        header, arrays = first.state()
        pending = max(pending, len(header["reports"]) * (mode == "splitfed"))
        # Through JSON, as in a checkpoint file; the arrays as read back.
        restarted = fresh(clock)
        restarted.restore(json.loads(json.dumps(header)), {k: v.copy() for k, v in
                                                          arrays.items()})
        got += _play(restarted, clock, SCRIPT[cut:])
        assert all(_same(a, b) for a, b in zip(got, want, strict=True)), cut
        assert _equal(restarted.weights, never_stopped.weights)
        assert [(r.round, r.trained, r.dropped) for r in restarted.history] == [
            (r.round, r.trained, r.dropped) for r in never_stopped.history]
    # Some restarts came mid-round, with reports in that were yet to be averaged.
    assert mode == "round_robin" or pending >= 1


def _mid_round():
    clock = [0.0]
    coordinator = RoundCoordinator(_half(0), "splitfed", rounds=2, clients=3, turn_timeout=10,
                                   poll=0, max_samples=100, clock=lambda: clock[0])
    for client in ("a", "b", "c"):
        coordinator.turn(client, 1)
    assert coordinator.turn("a", 1)[0] and coordinator.turn("b", 1)[0]
    clock[0] = 1.0
    coordinator.report("a", 1, _half(2), 10)
    clock[0] = 2.0
    return coordinator, clock


def test_state_is_json_and_names_everything_in_the_round():
    coordinator, _ = _mid_round()
    header, arrays = coordinator.state()
    assert json.loads(json.dumps(header)) == header
    assert header["round"] == 1 and header["members"] == ["a", "b", "c"]
    assert header["reports"] == [["a", 10]]
    # c, the third to arrive, started the round and went first; all at 0, saved at 2.
    assert header["training"] == [["c", 2.0], ["b", 2.0]]
    assert header["opened"] == 2.0  # the round opened when c, the third, arrived at 0
    assert header["history"] == [{"round": 1, "trained": ["a"], "dropped": []}]
    assert sorted(arrays) == ["reports/0/0", "reports/0/1", "weights/0", "weights/1"]
    assert _equal([arrays["reports/0/0"], arrays["reports/0/1"]], _half(2))
    arrays["weights/0"][:] = 9  # copies: the coordinator's stay as they were
    assert _equal(coordinator.weights, _half(0))


@pytest.mark.parametrize("restart_timers, dropped_at", [(False, 108.5), (True, 110.5)])
def test_timers_resume_with_the_time_they_had_left_or_restart(restart_timers, dropped_at):
    coordinator, clock = _mid_round()
    header, arrays = coordinator.state()  # b and c have trained for 2 s of their 10
    clock[0] = 100.0  # the server was down for 98 s: that does not count
    restarted = RoundCoordinator(_half(0), "splitfed", rounds=2, clients=3, turn_timeout=10,
                                 poll=0, max_samples=100, clock=lambda: clock[0])
    restarted.restore(header, arrays, restart_timers=restart_timers)
    clock[0] = dropped_at - 0.5
    assert restarted.expire() == []
    clock[0] = dropped_at
    assert restarted.expire() == ["c", "b"]
    assert restarted.round == 2 and _equal(restarted.weights, _half(2))  # a's report alone


def _variants():
    """(change to a valid state, what the refusal says)."""
    def header(**fields):
        return lambda h, a: h.update(fields)

    def array(key, value):
        return lambda h, a: a.__setitem__(key, value)

    return [
        (header(format=2), "its format is 2; this version reads format 1"),
        (header(mode="round_robin"), "holds 'round_robin' rounds, this coordinator runs "
                                     "'splitfed'"),
        (header(round=4), r"'round' is 4, expected an integer in 1..3"),
        (header(round=3), "'history' must list rounds 1..2 or 1..3"),
        (header(round=2), r"'reports' names \['a'\], but round 2 was trained by \[\]"),
        (header(members=["a", "b", "a"]), "names a client twice"),
        (header(members=["a", "b"]), "not members"),
        (header(members=[["a"], "b", "c"]), "list of client ids"),
        (header(reports=[["a", 101]]), r"sample count of 'a' is 101, expected an integer in "
                                       r"1\.\.100"),
        (header(reports=[["b", 10]]), "'reports' names"),
        (header(training=[["c", 2.0], ["b", -1.0]]), "training time of 'b' is -1.0"),
        (header(training=[["c", 2.0], ["a", 1.0]]), "training and also reported"),
        (header(training=[["z", 1.0]]), "not members"),
        (header(training="b"), r"list of \[client_id, value\] pairs"),
        (header(opened=None), "'opened' is None"),
        (header(turn=1), "SplitFed has no turn order"),
        (header(training=[], history=[{"round": 1, "trained": ["a"],
                                       "dropped": ["b", "c"]}]),
         "should have ended"),
        (lambda h, a: h.pop("history"), "has no 'history'"),
        (array("weights/1", np.zeros((3, 1), "float32")), r"'weights/1' is float32 \(3, 1\)"),
        (array("weights/0", np.zeros(2, "float64")), "'weights/0' is float64"),
        (array("reports/0/0", np.full(2, np.nan, "float32")), "'reports/0/0' has non-finite"),
        (array("reports/0/0", np.full(2, 3e38, "float32")), "beyond max_weight"),
        (array("reports/1/0", np.zeros(2, "float32")), "the arrays are"),
        (lambda h, a: a.pop("reports/0/1"), "the arrays are"),
    ]


@pytest.mark.parametrize("change, match", _variants(),
                         ids=[match[:30] for _, match in _variants()])
def test_restore_refuses_what_does_not_fit_and_changes_nothing(change, match):
    saved, _ = _mid_round()
    header, arrays = saved.state()
    change(header, arrays)
    coordinator, _ = _mid_round()
    coordinator.report("b", 1, _half(4), 30)
    before = _header_and_arrays(coordinator)
    with pytest.raises(ValueError, match=match):
        coordinator.restore(header, arrays)
    assert _header_and_arrays(coordinator) == before


def test_round_robin_restore_checks_the_turn_order():
    clock = [0.0]
    coordinator = RoundCoordinator(_half(0), "round_robin", rounds=1, clients=2, poll=0,
                                   clock=lambda: clock[0])
    coordinator.turn("a", 1)
    coordinator.turn("b", 1)
    coordinator.turn("a", 1)
    coordinator.report("a", 1, _half(1), 5)
    header, arrays = coordinator.state()
    assert header["turn"] == 1 and header["reports"] == [["a", 5]]
    for turn in (0, 2):
        with pytest.raises(ValueError, match=f"'turn'|turn {turn} of"):
            coordinator.restore({**header, "turn": turn}, arrays)
    with pytest.raises(ValueError, match="the arrays are"):
        coordinator.restore(header, {**arrays, "reports/0/0": arrays["weights/0"]})
    coordinator.restore(header, arrays)  # unchanged, it still fits
    assert coordinator.turn("b", 1)[:2] == (True, 1)


def test_a_finished_run_restored_with_more_rounds_carries_on():
    clock = [0.0]
    done = RoundCoordinator(_half(0), "splitfed", rounds=1, clients=1, poll=0,
                            clock=lambda: clock[0])
    done.turn("a", 1)
    done.report("a", 1, _half(3), 5)
    assert done.finished
    header, arrays = done.state()
    longer = RoundCoordinator(_half(0), "splitfed", rounds=2, clients=1, poll=0,
                              clock=lambda: clock[0])
    longer.restore(header, arrays)
    go, round_, weights, finished = longer.turn("a", 2)
    assert go and round_ == 2 and _equal(weights, _half(3)) and not finished
    longer.report("a", 2, _half(5), 5)
    assert longer.finished and [r.round for r in longer.history] == [1, 2]
