"""Feature-space hijacking (keras_split.privacy.hijack): the malicious server's
gradient against TensorFlow's, and the hijack detector against honest servers
(stateful ones: BatchNorm, Dropout, Adam, metrics) and the hijacking one.

Gate: over honest runs with a check at every training step, no check is
flagged (the benchmark measures the rate over many more); against the
hijacking server the first check flags it, before the client applies any of
its gradients.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_split
from keras_split.messages import Activations
from keras_split.privacy.hijack import (
    HijackDetected,
    HijackDetector,
    HijackingServer,
    _wrong_labels,
    feature_space_hijacking,
    gradient_agreement,
)
from keras_split.roles import MessageHandler, ServerRole
from keras_split.transport import InProcessTransport
from tests.models import bn_dropout, small_cnn
from tests.test_privacy_defences import _cnn_data, _same

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _images(n=96, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, size=(n, 8, 8, 1)).astype("float32")


# -- the pieces by hand ------------------------------------------------------------------


def test_gradient_agreement_is_the_mean_per_sample_cosine():
    a = (np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]),)
    b = (np.array([[-3.0, 0.0], [0.0, 1.0], [5.0, 5.0]]),)
    # Rows: cosine -1, cosine 1, and a zero row left out.
    assert gradient_agreement(a, b) == pytest.approx(0.0)
    assert gradient_agreement(a, a) == pytest.approx(1.0)
    assert math.isnan(gradient_agreement((np.zeros((2, 3)),), (np.ones((2, 3)),)))
    # Several cut tensors count as one row per sample.
    two = (np.array([[1.0], [1.0]]), np.array([[0.0, 1.0], [1.0, 0.0]]))
    other = (np.array([[-1.0], [1.0]]), np.array([[0.0, -1.0], [1.0, 0.0]]))
    assert gradient_agreement(two, other) == pytest.approx(0.0)


def test_wrong_labels_change_every_label_and_keep_the_format():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 2, 1, 0])
    wrong = _wrong_labels(y, 3, rng)
    assert wrong.dtype == y.dtype and np.all(wrong != y) and set(wrong) <= {0, 1, 2}
    one_hot = np.eye(3, dtype="float32")[y]
    flipped = _wrong_labels(one_hot, 3, rng)
    assert flipped.shape == one_hot.shape and flipped.dtype == one_hot.dtype
    assert np.all(np.argmax(flipped, -1) != y)
    with pytest.raises(ValueError, match=r"set `num_classes`\) class indices in \[0, 2\)"):
        _wrong_labels(y, 2, rng)


def test_the_hijacking_server_returns_the_critic_gradient_and_ignores_labels():
    keras.utils.set_random_seed(0)
    model, cut = small_cnn()
    split = keras_split.split(model, cut)
    server = HijackingServer(_images(), client=split.client, seed=0)
    assert isinstance(server, MessageHandler)
    z = np.asarray(split.client(_images(16, seed=1)))
    # What the client is told: d/dz of -mean(D(z)), before the server's own step.
    zt = tf.constant(z)
    with tf.GradientTape() as tape:
        tape.watch(zt)
        loss = -tf.reduce_mean(server.discriminator(zt, training=False))
    expected = tape.gradient(loss, zt).numpy()
    state = server.state()
    reply = server.handle(Activations(step=1, mode="train", tensors=(z,),
                                      labels=np.zeros(16, np.int64)))
    np.testing.assert_allclose(reply.gradients[0], expected, rtol=1e-5, atol=1e-7)
    assert reply.logs["loss"] == pytest.approx(float(loss), rel=1e-5)
    # The same state and activations with other labels: the same gradient.
    server.restore(state)
    again = server.handle(Activations(step=1, mode="train", tensors=(z,),
                                      labels=np.ones(16, np.int64)))
    np.testing.assert_allclose(again.gradients[0], expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="no task model"):
        server.handle(Activations(step=2, mode="predict", tensors=(z,)))
    with pytest.raises(ValueError, match=r"do not match the pilot's output"):
        server.handle(Activations(step=2, mode="train", tensors=(z[:, :1],)))


def test_the_hijacking_server_needs_a_pilot_or_the_client():
    with pytest.raises(ValueError, match="Pass `pilot=`"):
        HijackingServer(_images())
    with pytest.raises(ValueError, match="batch of inputs"):
        HijackingServer(np.float32(1.0), client=small_cnn()[0])


# -- the detector ------------------------------------------------------------------------


def _honest(seed=0, optimizer=None, model=None):
    keras.utils.set_random_seed(seed)
    model, cut = model or small_cnn()
    split = keras_split.split(model, cut)
    role = ServerRole(split.server, optimizer or keras.optimizers.SGD(0.05), LOSS,
                      metrics=["accuracy"])
    return split, role


def test_the_detector_off_is_plain_split_training_bit_for_bit():
    x, y = _cnn_data()
    split, role = _honest()
    split.compile(optimizer=keras.optimizers.SGD(0.05), transport=InProcessTransport(role))
    split.fit(x, y, batch_size=16, epochs=2, verbose=0, seed=0)
    plain = split.get_weights() + role.model.get_weights()

    split, role = _honest()
    detector = HijackDetector(InProcessTransport(role), 3, probability=0.0, warmup=10**9)
    split.compile(optimizer=keras.optimizers.SGD(0.05), transport=detector)
    split.fit(x, y, batch_size=16, epochs=2, verbose=0, seed=0)
    assert _same(plain, split.get_weights() + role.model.get_weights())
    assert detector.checks == [] and detector.detected_at is None


@pytest.mark.parametrize("which", ["cnn, 3 classes, SGD", "BatchNorm + Dropout, Adam"])
def test_honest_servers_are_never_flagged(which):
    rng = np.random.default_rng(1)
    if which.startswith("cnn"):
        x, y = _cnn_data(96)
        split, role = _honest()
        classes = 3
    else:
        x = rng.normal(size=(96, 10)).astype("float32")
        y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1)
        split, role = _honest(optimizer=keras.optimizers.Adam(1e-2), model=bn_dropout())
        classes = 3
    detector = HijackDetector(InProcessTransport(role), classes, probability=1.0, seed=0)
    split.compile(optimizer=keras.optimizers.Adam(1e-2), transport=detector)
    split.fit(x, y, batch_size=16, epochs=3, verbose=0, seed=0)
    assert len(detector.checks) == 18 and detector.detected_at is None
    scores = [check.score for check in detector.checks]
    assert max(scores) < 0.5, scores
    # Each check is one extra step on the server, answered in order.
    assert [c.step for c in detector.checks] == list(range(1, 19))


def test_the_hijacking_server_is_flagged_before_any_of_its_gradients_is_applied():
    keras.utils.set_random_seed(0)
    model, cut = small_cnn()
    split = keras_split.split(model, cut)
    before = split.client.get_weights()
    x, y = _cnn_data(96)
    server = HijackingServer(_images(), client=split.client, seed=0)
    detector = HijackDetector(InProcessTransport(server), 3, seed=0)
    split.compile(optimizer=keras.optimizers.Adam(1e-3), transport=detector)
    with pytest.raises(HijackDetected, match=r"do not depend on the labels.*not applied"):
        split.fit(x, y, batch_size=16, epochs=1, verbose=0)
    # Not 1: the critic takes a training step between the two replies.
    assert detector.detected_at == 1 and detector.checks[0].score > 0.8
    assert _same(before, split.client.get_weights())


def test_the_detector_can_warn_or_call_back_and_checks_its_arguments():
    keras.utils.set_random_seed(0)
    model, cut = small_cnn()
    split = keras_split.split(model, cut)
    x, y = _cnn_data(32)
    seen = []
    server = HijackingServer(_images(), client=split.client, seed=0)
    detector = HijackDetector(InProcessTransport(server), 3, probability=1.0,
                              on_detect=seen.append, seed=0)
    split.compile(optimizer=keras.optimizers.Adam(1e-3), transport=detector)
    split.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert [c.step for c in seen] == [1, 2] and all(c.flagged for c in seen)
    transport = InProcessTransport(server)
    for kwargs, message in [({"num_classes": 1}, "integer >= 2"),
                            ({"probability": 2.0}, r"in \[0, 1\]"),
                            ({"threshold": 3.0}, "is a cosine"),
                            ({"on_detect": "ignore"}, "'raise', 'warn' or a function")]:
        with pytest.raises(ValueError, match=message):
            HijackDetector(transport, **{"num_classes": 2, **kwargs})
    with pytest.raises(TypeError, match="must be a keras_split.Transport"):
        HijackDetector(server, 2)


def test_feature_space_hijacking_reports_the_curve_and_the_detection():
    keras.utils.set_random_seed(0)
    model, cut = small_cnn()
    client = keras_split.split(model, cut).client
    x, y = _cnn_data(64)
    result = feature_space_hijacking(client, x, _images(64), x_eval=x[:16], steps=6,
                                     batch_size=16, eval_every=2)
    assert result.steps == [0, 2, 4, 6] and len(result.mse) == 4
    assert result.detected_at is None and result.checks == []
    assert result.baseline_mse > 0 and result.reconstructions.shape == (8, 8, 8, 1)
    grid = result.plot_reconstructions(4)
    assert grid._suptitle.get_text().startswith("Feature-space hijacking, after 6 client steps")
    assert len(grid.axes) == 8  # 4 originals above their 4 reconstructions
    detected = feature_space_hijacking(keras_split.split(small_cnn()[0], cut).client, x,
                                       _images(64), steps=6, batch_size=16, labels=y,
                                       detector={"num_classes": 3, "seed": 0})
    assert detected.detected_at == 1 and detected.steps[-1] == 0
    with pytest.raises(ValueError, match="pass `labels=`"):
        feature_space_hijacking(client, x, _images(64), steps=2, detector={})


def test_keras_split_audit_trains_defends_and_prints_one_table(tmp_path, capsys):
    from keras_split.apps.cli import main

    (x, y), (xv, yv), (xt, yt) = keras_split.datasets.load_pneumoniamnist_balanced()
    rng = np.random.default_rng(0)
    keep, held = rng.permutation(len(x))[:256], rng.permutation(len(xt))[:128]
    data = tmp_path / "small.npz"
    np.savez(data, train_images=x[keep][..., 0], train_labels=y[keep][:, None],
             val_images=xv[:8][..., 0], val_labels=yv[:8][:, None],
             test_images=xt[held][..., 0], test_labels=yt[held][:, None])
    assert main(["audit", "--data", str(data), "--epochs", "1", "--inversion-epochs", "1",
                 "--hijack-steps", "3", "--label-defence", "max-norm", "--nopeek", "0.5",
                 "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "defences: NoPeek alpha 0.5, label defence max-norm" in out
    for row in ["label leakage: norm", "label leakage: cosine", "model inversion",
                "distance correlation", "feature-space hijacking", "hijack detector"]:
        assert row in out, out
    detector = next(line for line in out.splitlines() if line.startswith("hijack detector"))
    assert detector.split()[-2] == "1"  # flagged at the first check
    assert main(["audit", "--data", str(tmp_path / "missing.npz")]) == 2


def test_a_server_that_supplied_the_model_starts_its_pilot_from_the_clients_weights():
    keras.utils.set_random_seed(0)
    client = keras_split.split(*small_cnn()).client
    informed = HijackingServer(_images(), client=client, knows_weights=True)
    assert _same(informed.pilot.get_weights(), client.get_weights())
    blind = HijackingServer(_images(), client=client)
    assert not _same(blind.pilot.get_weights(), client.get_weights())


def test_a_server_that_supplied_the_model_reconstructs_xrays_and_the_detector_stops_it_first():
    """Gate on the shipped chest X-rays: the attack succeeds (its reconstruction
    MSE halves and beats the mean public image), and the detector flags the
    server at its first check, before the MSE halves and before the client
    applies any gradient of that step."""
    from keras_split.apps.demo import build_demo_cnn

    (x, y), _, (x_test, _) = keras_split.datasets.load_pneumoniamnist_balanced()
    order = np.random.default_rng(0).permutation(len(x))
    private, public = order[:len(x) // 2], order[len(x) // 2:]

    def run(**kwargs):
        keras.utils.set_random_seed(3)
        client = keras_split.split(build_demo_cnn(), "pool2").client
        return feature_space_hijacking(
            client, x[private], x[public], x_test[:128], steps=kwargs.pop("steps", 400),
            batch_size=64, optimizer=keras.optimizers.Adam(1e-4), eval_every=50,
            knows_weights=True, seed=3, **kwargs)

    attack = run()
    assert attack.halved_at is not None and attack.halved_at <= 400, attack.mse
    assert attack.below_baseline_at is not None and min(attack.mse) < attack.baseline_mse
    guarded = run(labels=y[private].reshape(-1),
                  detector={"num_classes": 2, "warmup": 50, "seed": 3})
    assert guarded.detected_at == 51 < attack.halved_at
    assert guarded.checks[-1].score > 0.9
    # The flagged step was not applied: the client stopped after step 50.
    assert guarded.steps[-1] == 50
    with pytest.raises(ValueError, match="configures the default server"):
        run(steps=1, server=HijackingServer(x[public], client=keras_split.split(
            build_demo_cnn(), "pool2").client))
