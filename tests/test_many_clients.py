"""Many light clients in rounds: the device runtime's round client
(`keras_split_edge.RoundClient`) against the TensorFlow round client, and the
many-clients benchmark's bookkeeping at a smaller count (slow)."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_split
from keras_split.apps.demo import build_demo_cnn, demo_loss
from keras_split.configurations.rounds import PerClientRole, RoundCoordinator
from keras_split.datasets import load_pneumoniamnist_balanced
from keras_split.export import export_client
from keras_split_edge import RoundClient, load

ROOT = Path(__file__).resolve().parent.parent
TOKENS = {"t0": "hospital-a", "t1": "hospital-b"}


def _halves():
    keras.utils.set_random_seed(0)
    return keras_split.split(build_demo_cnn(), "pool2")


def _shards():
    (x, y), _, _ = load_pneumoniamnist_balanced()
    order = np.random.default_rng(0).permutation(len(x))
    # Unequal shards (FedAvg weighs them 40 : 24), partial last batches.
    return [(x[order[:40]], y[order[:40]]), (x[order[40:64]], y[order[40:64]])]


def _rounds_server(split):
    """SFLv1 (a server copy per client): each client's steps meet only its own
    copy, so the result does not depend on how the two clients' steps interleave."""
    role = PerClientRole(split.server, keras.optimizers.SGD(0.1), demo_loss())
    coordinator = RoundCoordinator(split.client.get_weights(), "splitfed", rounds=2,
                                   clients=2, server=role, poll=0.5, turn_timeout=60)
    server = keras_split.SplitServer(split.server, role=role, tokens=TOKENS, insecure=True,
                                     coordinator=coordinator).start()
    return server, coordinator


def _in_threads(work):
    errors, threads = [], []

    def guarded(i):
        try:
            work(i)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    for i in range(2):
        threads.append(threading.Thread(target=guarded, args=(i,)))
        threads[-1].start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


def test_device_round_client_equals_the_tensorflow_round_client(tmp_path):
    shards = _shards()
    reference = _halves()
    export_client(reference.client, tmp_path / "client.tflite",
                  optimizer=keras.optimizers.SGD(0.1))

    # The TensorFlow round clients: tests/round_client.py (SGD(0.1), batches of
    # 16, seed 0), one process each, as in tests/test_rounds.py.
    reference.client.save(tmp_path / "client.keras")
    for i, (x, y) in enumerate(shards):
        np.savez(tmp_path / f"data{i}.npz", x=x, y=y)
    server, tf_rounds = _rounds_server(reference)
    try:
        processes = [subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "round_client.py"),
             str(tmp_path / "client.keras"), str(tmp_path / f"data{i}.npz"), str(server.port),
             f"t{i}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]
        for process in processes:
            output, _ = process.communicate(timeout=180)
            assert process.returncode == 0, output[-2000:]
            assert "trained in rounds [1, 2]" in output
    finally:
        server.stop()

    device = _halves()
    server, device_rounds = _rounds_server(device)
    results = {}
    try:
        def device_client(i):
            x, y = shards[i]
            client = RoundClient(load(tmp_path / "client.tflite"), f"127.0.0.1:{server.port}",
                                 x, y, batch_size=16, seed=0, token=f"t{i}", insecure=True)
            try:
                results[i] = (client.run(), client.results)
            finally:
                client.close()

        _in_threads(device_client)
    finally:
        server.stop()
    assert {i: r[0] for i, r in results.items()} == {0: [1, 2], 1: [1, 2]}
    # Two turns of 3 and 2 steps; what was handed out and back was counted.
    assert [r.steps for r in results[0][1]] == [3, 3] and [r.steps for r in results[1][1]] == [2, 2]
    assert all(r.samples == len(shards[i][0]) and r.bytes_up > 0 and r.bytes_down > 0
               and r.compute_seconds > 0 for i in results for r in results[i][1])
    for record_tf, record_device in zip(tf_rounds.history, device_rounds.history, strict=True):
        assert sorted(record_tf.trained) == sorted(record_device.trained) == sorted(
            TOKENS.values())
    for got, want in zip(device_rounds.weights, tf_rounds.weights, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)  # the FedAvg of the client halves
    for got, want in zip(device.server.get_weights(), reference.server.get_weights(),
                         strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)  # the averaged server copies


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["splitfed", "round_robin"])
def test_forty_light_clients_killed_batch_dropped_and_rejoined(tmp_path, mode):
    out = tmp_path / "result.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "many_clients.py"), "--clients", "40",
               "--processes", "4", "--mode", mode, "--rounds", "3", "--kill-round", "2",
               "--work", str(tmp_path / "work"), "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["bookkeeping"]["ok"], report["bookkeeping"]
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    everyone = set(report["clients"])
    killed = set(report["killed"])
    assert len(everyone) == 40 and 0 < len(killed) < 40
    # Round 1: everyone; the kill round: the killed batch is dropped (round-robin:
    # those whose turn came while they were down); the round after: all back.
    assert set(rounds[0]["trained"]) == everyone and not rounds[0]["dropped"]
    assert set(rounds[1]["dropped"]) <= killed and rounds[1]["dropped"]
    assert set(rounds[1]["trained"]) | set(rounds[1]["dropped"]) == everyone
    assert set(rounds[2]["trained"]) == everyone and not rounds[2]["dropped"]
    for entry in rounds:
        assert 0.0 <= entry["accuracy"] <= 1.0
        assert entry["bytes_up_per_client"] > 0 and entry["compute_seconds_per_client"] > 0
