"""The server half's step under a tf.distribute strategy (`DistributedServerRole`),
on two logical CPU devices, against the same step on one device: a `ServerRole`
and, over gRPC, unsplit `keras.Model.fit`.

Logical devices must be set before TensorFlow starts, so each check runs in a
fresh interpreter."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = """
import json, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
from keras_split.devices import DistributedServerRole
from keras_split.messages import Activations
from keras_split.roles import ServerRole

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

def server_half():
    # What a stateful server half holds: a regularization loss, synchronized
    # BatchNormalization (moving statistics), Adam's moments, a metric.
    inp = keras.Input((6,), name="cut")
    x = keras.layers.Dense(8, use_bias=False,
                           kernel_regularizer=keras.regularizers.L2(0.01))(inp)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(synchronized=True)(x))
    return keras.Model(inp, keras.layers.Dense(3)(x), name="server_half")

def replicas_of(model):
    return [[np.asarray(c) for c in strategy.experimental_local_results(v.value)]
            for v in model.variables]

result = {}
"""


def _run(body: str) -> dict:
    script = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(result))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_distributed_step_equals_the_one_device_step():
    result = _run("""
        keras.utils.set_random_seed(0)
        one = server_half()
        with strategy.scope():
            two = server_half()
        two.set_weights(one.get_weights())
        a = ServerRole(one, keras.optimizers.Adam(0.01), LOSS, metrics=["accuracy"])
        b = DistributedServerRole(two, keras.optimizers.Adam(0.01), LOSS, metrics=["accuracy"],
                                  strategy=strategy)
        rng = np.random.default_rng(0)
        gaps, logs = [], []
        # even and uneven shards, and a batch of one (the second replica's shard is empty)
        for step, n in enumerate([16, 7, 1, 16]):
            z = rng.normal(size=(n, 6)).astype("float32")
            y = rng.integers(0, 3, n)
            w = rng.uniform(0.5, 2, n).astype("float32") if step == 3 else None
            message = Activations(step=step + 1, mode="train", tensors=(z,), labels=y,
                                  sample_weight=w, reset_metrics=step == 0)
            ra, rb = a.handle(message), b.handle(message)
            gaps.append(float(np.abs(ra.gradients[0] - rb.gradients[0]).max()))
            logs.append([ra.logs, rb.logs])
        result["cut gradient gaps"] = gaps
        result["logs"] = logs
        result["weight gaps"] = [float(np.abs(p - q).max())
                                 for p, q in zip(one.get_weights(), two.get_weights())]
        result["replicas agree"] = all(np.array_equal(c[0], c[1]) for c in replicas_of(two))
        message = Activations(step=9, mode="evaluate", tensors=(z,), labels=y, reset_metrics=True)
        result["evaluate"] = [a.handle(message).logs, b.handle(message).logs]
        result["predict gap"] = float(np.abs(
            a.handle(Activations(step=10, mode="predict", tensors=(z,))).outputs
            - b.handle(Activations(step=10, mode="predict", tensors=(z,))).outputs).max())
        result["state keys equal"] = sorted(a.state()) == sorted(b.state())
    """)
    assert max(result["cut gradient gaps"]) < 1e-6
    assert max(result["weight gaps"]) < 1e-6
    for one, two in result["logs"] + [result["evaluate"]]:
        assert one.keys() == two.keys()
        for name in one:
            assert two[name] == pytest.approx(one[name], rel=1e-6), name
    assert result["replicas agree"] and result["state keys equal"]
    assert result["predict gap"] < 1e-6


def test_a_refused_step_changes_nothing_on_any_replica_and_bad_setups_are_named():
    result = _run("""
        with strategy.scope():
            two = server_half()
        role = DistributedServerRole(two, "adam", LOSS, metrics=["accuracy"], strategy=strategy,
                                     max_activation=1e38)
        rng = np.random.default_rng(1)
        z = rng.normal(size=(8, 6)).astype("float32")
        y = rng.integers(0, 3, 8)
        role.handle(Activations(step=1, mode="train", tensors=(z,), labels=y))
        before = replicas_of(two)
        optimizer = [np.asarray(v) for v in two.optimizer.variables]
        # Finite and within max_activation, but squares overflow: BatchNormalization's
        # moving variance and the gradients become non-finite on the replica holding it.
        hostile = z.copy()
        hostile[-1] = 1e30
        try:
            role.handle(Activations(step=2, mode="train", tensors=(hostile,), labels=y))
            result["refused"] = ""
        except ValueError as error:
            result["refused"] = str(error)
        after = replicas_of(two)
        result["unchanged"] = all(np.array_equal(p, q) for v, w in zip(before, after)
                                  for p, q in zip(v, w))
        result["optimizer unchanged"] = all(
            np.array_equal(p, np.asarray(q)) for p, q in zip(optimizer, two.optimizer.variables))
        for name, call in [
            ("outside", lambda: DistributedServerRole(server_half(), "sgd", LOSS,
                                                      strategy=strategy)),
            ("not a strategy", lambda: DistributedServerRole(two, "sgd", LOSS, strategy="gpus")),
        ]:
            try:
                call()
                result[name] = "accepted"
            except (TypeError, ValueError) as error:
                result[name] = f"{type(error).__name__}: {error}"
    """)
    assert result["refused"].startswith("Refused the step")
    assert result["unchanged"] and result["optimizer unchanged"]
    assert result["outside"].startswith(
        "ValueError: The server half 'server_half' was built outside the strategy's scope")
    assert "inside `with strategy.scope():`" in result["outside"]
    assert result["not a strategy"] == (
        "TypeError: `strategy` must be a tf.distribute.Strategy, received str.")


def test_over_grpc_a_distributed_server_trains_like_unsplit_fit(tmp_path):
    result = _run("""
        import keras_split
        from keras_split.network import devcerts
        keras.utils.set_random_seed(2)
        inp = keras.Input((10,), name="features")
        h = keras.layers.Dense(6, activation="relu", name="client_dense")(inp)
        # No bias before BatchNormalization: its gradient is zero up to rounding,
        # which Adam would amplify into different updates on any two devices.
        x = keras.layers.Dense(8, use_bias=False)(h)
        x = keras.layers.BatchNormalization(synchronized=True)(x)
        x = keras.layers.ReLU()(x)
        model = keras.Model(inp, keras.layers.Dense(3)(x))
        reference = keras.models.clone_model(model)
        reference.set_weights(model.get_weights())
        split = keras_split.split(model, "client_dense")
        with strategy.scope():
            server_half = keras.models.clone_model(split.server)
        server_half.set_weights(split.server.get_weights())

        rng = np.random.default_rng(3)
        x = rng.normal(size=(60, 10)).astype("float32")
        y = rng.integers(0, 3, 60)
        reference.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS)
        reference.fit(x, y, batch_size=12, epochs=2, shuffle=False, verbose=0)

        authority = devcerts.Authority()
        pair = authority.issue("localhost")
        role = DistributedServerRole(server_half, keras.optimizers.Adam(0.01), LOSS,
                                     strategy=strategy)
        server = keras_split.SplitServer(server_half, role=role, tokens={"t": "hospital"},
                                         certificate=pair.certificate,
                                         private_key=pair.private_key).start()
        try:
            client = keras_split.SplitClient(split.client, server=f"localhost:{server.port}",
                                             token="t", root_certificates=authority.pem)
            client.compile(optimizer=keras.optimizers.Adam(0.01))
            client.fit(x, y, batch_size=12, epochs=2, shuffle=False, verbose=0)
        finally:
            server.stop()
        merged = split.client.get_weights() + server_half.get_weights()
        result["gaps"] = [float(np.abs(p - q).max())
                          for p, q in zip(reference.get_weights(), merged)]
    """)
    assert max(result["gaps"]) < 1e-5, result["gaps"]
