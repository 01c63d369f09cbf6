"""Rounds of client processes through the server (round-robin, SplitFed): a
client killed during its turn is dropped, the others go on, and it rejoins."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_split
from keras_split.configurations.rounds import RoundCoordinator, RoundError

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
HERE = Path(__file__).resolve().parent
NAMES = ["hospital-a", "hospital-b", "hospital-c"]


def _split():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10,))
    hidden = keras.layers.Dense(8, activation="relu", name="cut")(inputs)
    return keras_split.split(keras.Model(inputs, keras.layers.Dense(3)(hidden)), "cut")


def test_coordinator_rules_by_hand():
    weights = [np.zeros(2, "float32")]
    rr = RoundCoordinator(weights, "round_robin", rounds=2, clients=2, turn_timeout=60,
                          poll=0.05)
    assert rr.turn("a", 1)[0] is False  # round 1 waits for both clients
    go, round_, handed, _ = rr.turn("b", 1)
    assert not go  # it is a's turn first (a arrived first)
    assert rr.turn("a", 1)[:2] == (True, 1)
    with pytest.raises(RoundError, match="no turn of 'b'"):
        rr.report("b", 1, weights, 5)
    rr.report("a", 1, [np.ones(2, "float32")], 5)
    go, _, handed, _ = rr.turn("b", 1)
    assert go and np.array_equal(handed[0], np.ones(2))  # a's weights, handed over
    with pytest.raises(RoundError, match="shapes"):
        rr.report("b", 1, [np.ones(3, "float32")], 5)
    rr.report("b", 1, [np.full(2, 2.0, "float32")], 5)
    assert rr.round == 2 and rr.history[0].trained == ["a", "b"]

    fed = RoundCoordinator(weights, "splitfed", rounds=1, clients=2, poll=0.05)
    fed.turn("a", 1)
    assert fed.turn("b", 1)[0] and fed.turn("a", 1)[0]  # both train at once
    fed.report("a", 1, [np.full(2, 1.0, "float32")], 10)
    assert fed.round == 1  # waits for b
    fed.report("b", 1, [np.full(2, 4.0, "float32")], 30)
    assert fed.finished and np.allclose(fed.weights[0], (1.0 * 10 + 4.0 * 30) / 40)


def test_listeners_hear_every_change_and_only_changes():
    """What the asyncio server waits on instead of polling: a callback after
    each change of the coordinator's state (a join, a turn taken, a report,
    a drop), none for a call that changes nothing."""
    now = [0.0]
    weights = [np.zeros(2, "float32")]
    rr = RoundCoordinator(weights, "round_robin", rounds=2, clients=2, turn_timeout=10,
                          poll=0.05, clock=lambda: now[0])
    heard = []
    stop = rr.listen(lambda: heard.append(rr.round))
    assert rr.seconds_to_expiry() is None  # nobody is due before the first round
    rr.join("a")
    assert len(heard) == 1
    rr.join("a")
    assert len(heard) == 1  # already a member: nothing changed, nobody is woken
    rr.turn("b", 1, wait=0.0)  # b joins; the round starts; a's turn is open
    after_b = len(heard)
    assert after_b >= 2
    assert rr.turn("b", 1, wait=0.0)[0] is False and len(heard) == after_b
    assert rr.seconds_to_expiry() == pytest.approx(10.0)  # a has 10 s to claim its turn
    now[0] = 4.0
    assert rr.turn("a", 1, wait=0.0)[0] and len(heard) == after_b + 1
    rr.report("a", 1, [np.ones(2, "float32")], 3)
    assert len(heard) == after_b + 2
    now[0] = 30.0
    assert rr.expire() == ["b"] and len(heard) == after_b + 3  # b's turn ran out
    stop()
    rr.turn("b", 2, wait=0.0)
    assert len(heard) == after_b + 3  # removed: no more calls


def _start(folder, port, index):
    command = [sys.executable, str(HERE / "round_client.py"), str(folder / "client.keras"),
               str(folder / f"data{index}.npz"), str(port), f"t{index}"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _lines(process, into):
    with process.stdout:  # closed once the process has ended
        for line in process.stdout:
            into.append(line)


@pytest.mark.parametrize("mode", ["round_robin", "splitfed"])
def test_a_killed_client_is_dropped_and_rejoins(tmp_path, rng, mode):
    split = _split()
    split.client.save(tmp_path / "client.keras")
    for i in range(3):
        np.savez(tmp_path / f"data{i}.npz", x=rng.normal(size=(64, 10)).astype("float32"),
                 y=rng.integers(0, 3, 64))
    coordinator = RoundCoordinator(split.client.get_weights(), mode, rounds=3, clients=3,
                                   turn_timeout=4.0, poll=1.0)
    server = keras_split.SplitServer(split.server, LOSS, keras.optimizers.SGD(0.1),
                                     tokens={f"t{i}": n for i, n in enumerate(NAMES)},
                                     insecure=True, coordinator=coordinator).start()
    outputs = [[], [], []]
    processes = [_start(tmp_path, server.port, i) for i in range(3)]
    readers = [threading.Thread(target=_lines, args=(p, o), daemon=True)
               for p, o in zip(processes, outputs, strict=True)]
    try:
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + 120
        while not any("turn in round 1" in line for line in outputs[1]):
            assert time.monotonic() < deadline, outputs
            time.sleep(0.01)
        processes[1].kill()  # hospital-b dies during its round-1 turn
        processes[1].wait()
        readers[1].join(10)
        restarted = []
        processes[1] = _start(tmp_path, server.port, 1)
        readers[1] = threading.Thread(target=_lines, args=(processes[1], restarted), daemon=True)
        readers[1].start()
        for process in processes:
            assert process.wait(timeout=180) == 0
        for reader in readers:
            reader.join(10)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        server.stop()
    history = coordinator.history
    assert [r.round for r in history] == [1, 2, 3]
    assert "hospital-b" in history[0].dropped
    assert sorted(history[0].trained) == ["hospital-a", "hospital-c"]
    for record in history[1:]:  # it rejoined, and nobody else was dropped
        assert sorted(record.trained) == NAMES and record.dropped == []
    assert any("trained in rounds [2, 3]" in line for line in restarted), restarted


def test_turn_and_report_refuse_bad_calls():
    import grpc

    from keras_split.network import convert as wire
    from keras_split_wire.proto import split_pb2 as pb
    from keras_split_wire.proto import split_pb2_grpc as pb_grpc

    split = _split()
    coordinator = RoundCoordinator(split.client.get_weights(), "splitfed", rounds=1,
                                   clients=1, poll=0.1)
    servers = [keras_split.SplitServer(split.server, LOSS, tokens={"a": "x", "b": "y"},
                                       insecure=True, coordinator=c).start()
               for c in (coordinator, None)]
    try:
        stubs = []
        for server in servers:
            channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
            stubs.append(pb_grpc.SplitLearningStub(channel))

        def call(stub, method, request, token="a"):
            return getattr(stub, method)(request, metadata=(("authorization", f"Bearer {token}"),),
                                         timeout=10)

        opened = pb.OpenRequest(protocol_version=wire.PROTOCOL_VERSION,
                                cut=[wire.spec_to_pb(s) for s in split.cut_specs])
        session = call(stubs[0], "Open", opened).session_id
        assert call(stubs[0], "Turn", pb.TurnRequest(session_id=session, round=1)).go
        good = [w.copy() for w in split.client.get_weights()]
        for weights, code in (([good[0]], grpc.StatusCode.FAILED_PRECONDITION),
                              ([np.full_like(good[0], np.nan), good[1]],
                               grpc.StatusCode.INVALID_ARGUMENT)):
            request = pb.ReportRequest(session_id=session, round=1, samples=4,
                                       weights=[wire.encode(w) for w in weights])
            with pytest.raises(grpc.RpcError) as info:
                call(stubs[0], "Report", request)
            assert info.value.code() == code
        with pytest.raises(grpc.RpcError) as info:
            call(stubs[0], "Turn", pb.TurnRequest(session_id=session), token="b")
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        other = call(stubs[1], "Open", opened).session_id
        with pytest.raises(grpc.RpcError) as info:
            call(stubs[1], "Turn", pb.TurnRequest(session_id=other))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert coordinator.round == 1  # nothing bad was taken
    finally:
        for server in servers:
            server.stop()


# Both drivers consult the same `RoundPolicy`, so they decide alike by
# construction (tests/test_policy.py replays one's events into the other). This
# end-to-end run checks the rest: client processes, gRPC and SFLv1's per-client
# server copies give the in-process weights.
def test_splitfed_v1_with_client_processes_equals_in_process(tmp_path, rng):
    from keras_split.configurations.federation import SplitFed
    from keras_split.configurations.rounds import PerClientRole

    data = [(rng.normal(size=(48, 10)).astype("float32"), rng.integers(0, 3, 48))
            for _ in range(3)]
    local = _split()
    reference = SplitFed(local.client, local.server, 3, version=1)
    reference.compile(keras.optimizers.SGD(0.1), LOSS)
    reference.fit(data, rounds=2, batch_size=16, shuffle=True, seed=0)

    split = _split()
    split.client.save(tmp_path / "client.keras")
    for i, (x, y) in enumerate(data):
        np.savez(tmp_path / f"data{i}.npz", x=x, y=y)
    role = PerClientRole(split.server, keras.optimizers.SGD(0.1), LOSS)
    coordinator = RoundCoordinator(split.client.get_weights(), "splitfed", rounds=2,
                                   clients=3, server=role, poll=1.0)
    server = keras_split.SplitServer(split.server, role=role, insecure=True,
                                     tokens={f"t{i}": n for i, n in enumerate(NAMES)},
                                     coordinator=coordinator).start()
    processes = [_start(tmp_path, server.port, i) for i in range(3)]
    try:
        for process in processes:
            output, _ = process.communicate(timeout=180)
            assert process.returncode == 0, output[-2000:]
    finally:
        server.stop()
    for a, b in zip(coordinator.weights, local.client.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b in zip(split.server.get_weights(), local.server.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_sflv1_averages_a_client_that_never_stepped_from_the_round_start():
    # A client may report without a step (or lose its copy in a server
    # restart): its server copy is then the round's start, not a KeyError.
    from keras_split.configurations.rounds import PerClientRole

    split = _split()
    role = PerClientRole(split.server, keras.optimizers.SGD(0.1), LOSS)
    start = split.server.get_weights()
    role._copy("hospital-a")[0].model.set_weights([w + 2.0 for w in start])
    role.average({"hospital-a": 1, "hospital-b": 3})  # b has no copy yet
    # (start + 2) * 1/4 + start * 3/4 = start + 0.5.
    for got, want in zip(split.server.get_weights(), start, strict=True):
        # float32: start + 2 rounds to about 2e-7 (absolute), whatever start is.
        np.testing.assert_allclose(got, want + 0.5, atol=1e-6)
