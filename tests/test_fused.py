"""The fused in-process step (`InProcessTransport(fused=True)`, the default):
the server's step runs inside the client's compiled call. Its reference is the
message path (`fused=False`), step for step: the same weights, server state,
logs and byte counts bit for bit, and the same refusals with nothing changed
on either side.
"""

import keras
import numpy as np
import pytest

import keras_split
from keras_split import protocol
from keras_split.privacy import NoPeek
from keras_split.roles import ServerRole
from keras_split.transport import InProcessTransport
from tests.models import bn_dropout, small_cnn

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(model, n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *model.inputs[0].shape[1:])).astype("float32")
    return x, rng.integers(0, 3, n)


def _train(fused, build=small_cnn, nopeek=None, sample_weight=False, epochs=2):
    keras.utils.set_random_seed(3)
    model, cut = build()
    split = keras_split.split(model, cut)
    role = ServerRole(split.server, keras.optimizers.Adam(1e-2), LOSS, metrics=["accuracy"])
    transport = InProcessTransport(role, fused=fused)
    split.compile(optimizer=keras.optimizers.Adam(1e-2), transport=transport, nopeek=nopeek)
    x, y = _data(model)
    weights = np.linspace(0.5, 2.0, len(x)) if sample_weight else None
    history = split.fit(x, y, sample_weight=weights, batch_size=16, epochs=epochs, verbose=0,
                        seed=0)
    state = split.get_weights() + [v.numpy() for v in role.model.variables]
    state += [v.numpy() for v in role.optimizer.variables]
    return state, history.history, transport.bytes.snapshot()


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("case", ["cnn", "BatchNorm + Dropout server", "NoPeek",
                                  "sample weights"])
def test_the_fused_step_is_the_message_path_bit_for_bit(case):
    kwargs = {"cnn": {}, "BatchNorm + Dropout server": {"build": bn_dropout},
              "NoPeek": {"nopeek": NoPeek(0.5)}, "sample weights": {"sample_weight": True}}[case]
    fused, plain = _train(True, **kwargs), _train(False, **kwargs)
    assert _same(fused[0], plain[0])
    assert fused[1] == plain[1]
    assert fused[2] == plain[2] and fused[2][0] > 0


def _one_step(fused, x, y, max_activation=1e9, build=bn_dropout):
    keras.utils.set_random_seed(3)
    model, cut = build()
    split = keras_split.split(model, cut)
    role = ServerRole(split.server, keras.optimizers.Adam(1e-2), LOSS, metrics=["accuracy"],
                      max_activation=max_activation)
    split.compile(optimizer=keras.optimizers.Adam(1e-2),
                  transport=InProcessTransport(role, fused=fused))
    good_x, good_y = _data(model, 16, seed=1)
    protocol.train_step(split.client_role, split.transport, 1, good_x, good_y)  # builds both
    before = (split.get_weights(), [v.numpy() for v in role.model.variables],
              [v.numpy() for v in role.optimizer.variables],
              [v.numpy() for v in split.client_role.optimizer.variables],
              split.transport.bytes.snapshot())
    outcome = None
    try:
        reply, _ = protocol.train_step(split.client_role, split.transport, 2, x, y,
                                       reset_metrics=True)
        outcome = reply
    except ValueError as error:
        outcome = str(error)
    after = (split.get_weights(), [v.numpy() for v in role.model.variables],
             [v.numpy() for v in role.optimizer.variables],
             [v.numpy() for v in split.client_role.optimizer.variables],
             split.transport.bytes.snapshot())
    return outcome, before, after


@pytest.mark.parametrize("case", ["activations beyond max_activation", "a label out of range",
                                  "the client diverged"])
def test_refusals_match_the_message_path_and_change_nothing(case):
    # A client without normalisation, so that larger inputs give larger activations.
    build = small_cnn if case.startswith("activations") else bn_dropout
    model, _ = build()
    x, y = _data(model, 16, seed=2)
    limit = 1e9
    if case.startswith("activations"):
        x, limit = x * 1e3, 100.0
    elif case.startswith("a label"):
        y = y.copy()
        y[3] = 7
    else:
        x = x.copy()
        x[0, 0] = np.nan
    (fused, before, after), (plain, *_) = (_one_step(True, x, y, limit, build),
                                           _one_step(False, x, y, limit, build))
    for part_before, part_after in zip(before[:4], after[:4], strict=True):
        assert _same(part_before, part_after)
    assert before[4] == after[4]  # nothing counted as sent
    if case == "the client diverged":
        assert fused.step == plain.step == -1 and np.isnan(fused.logs["loss"])
    elif case.startswith("activations"):
        # The message path names the tensor; the fused one the same limit and fix.
        assert "above the server's limit of 100 (`max_activation`)" in fused
        assert "above the server's limit of 100 (`max_activation`)" in plain
    else:
        assert fused == plain and "7" in fused


def test_wrappers_codecs_and_fused_false_take_the_message_path():
    model, cut = small_cnn()
    split = keras_split.split(model, cut)
    role = ServerRole(split.server, "sgd", LOSS)
    assert InProcessTransport(role).fuses
    assert not InProcessTransport(role, fused=False).fuses
    assert not InProcessTransport(role, compression="float16").fuses

    class Wrapped:
        def __init__(self, inner):
            self.inner = inner

        def handle(self, message):
            return self.inner.handle(message)

    assert not InProcessTransport(Wrapped(role)).fuses


ZOO = """
import sys
import keras, numpy as np, keras_split
from keras_split.roles import ServerRole
from keras_split.transport import InProcessTransport
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.normal(size=(16, 64, 64, 3)).astype("float32")
y = rng.integers(0, 5, 16)
base = keras.applications.MobileNetV3Small(input_shape=(64, 64, 3), weights=None, classes=5,
                                           include_preprocessing=False)
keras.utils.set_random_seed(1)
split = keras_split.split(base, "expanded_conv_6_expand")
role = ServerRole(split.server, keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
split.compile(optimizer=keras.optimizers.Adam(1e-3),
              transport=InProcessTransport(role, fused=sys.argv[1] == "fused"))
history = split.fit(x, y, batch_size=8, epochs=2, verbose=0, seed=0)
state = [v.numpy() for v in split.client.variables + role.model.variables
         + role.optimizer.variables + split.client_role.optimizer.variables]
bad = y.copy()
bad[0] = 99
try:
    split.fit(x, bad, batch_size=16, epochs=1, verbose=0)
    refused = "not refused"
except ValueError as error:
    refused = str(error)
after = [v.numpy() for v in split.client.variables + role.model.variables
         + role.optimizer.variables + split.client_role.optimizer.variables]
unchanged = all(np.array_equal(a, b) for a, b in zip(state, after, strict=True))
np.save(sys.argv[2], np.concatenate([s.ravel().astype("float64") for s in state]))
print("LOSSES", history.history["loss"], "UNCHANGED", unchanged, "REFUSED", refused)
"""


def test_a_zoo_network_with_batchnorm_and_dropout_fuses_bit_for_bit(tmp_path):
    """MobileNetV3Small (keras.applications: BatchNormalization on both sides, Dropout
    and Adam in the server half), cut mid-network: two epochs through the fused step
    equal the message path bit for bit, and a refused step (a label out of range)
    changes no variable of either party on either path. In fresh processes with
    oneDNN's rewrites off, which may fuse operations across the cut (see
    InProcessTransport)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
    outputs = {}
    for path in ("fused", "messages"):
        result = subprocess.run([sys.executable, "-c", ZOO, path, str(tmp_path / path)],
                                capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[path] = result.stdout.split("LOSSES", 1)[1]
        assert "UNCHANGED True" in outputs[path] and "class" in outputs[path]
    assert outputs["fused"] == outputs["messages"]
    np.testing.assert_array_equal(np.load(tmp_path / "fused.npy"),
                                  np.load(tmp_path / "messages.npy"))
