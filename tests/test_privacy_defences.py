"""The defences (keras_split.privacy.defences): each off is plain split training
bit for bit, each does what its docstring says, and the label defences' gates.

Gates (the 9:1 task and MLP of tests/test_privacy_attacks.py, 3 epochs, seeded):

- Max-norm alignment brings the norm attack's mean AUC to <= 0.7 (from
  >= 0.8 undefended), with test accuracy within 0.03 of the undefended run.
- Randomized response at epsilon = 1 brings both attacks to <= 0.75: the
  server's gradients follow the randomized labels.
"""

import math

import keras
import numpy as np
import pytest

import keras_split
from keras_split.messages import Activations, Reply
from keras_split.privacy.attacks import collect_cut_gradients, label_leakage
from keras_split.privacy.defences import (
    CutNoise,
    GaussianGradientNoise,
    MaxNormAlignment,
    RandomizedLabels,
    add_cut_noise,
    keep_probability,
    randomized_response,
)
from keras_split.roles import MessageHandler, ServerRole
from keras_split.transport import InProcessTransport, Transport
from tests.models import small_cnn
from tests.test_privacy_attacks import LOSS, accuracy, imbalanced_task, mlp


def _cnn_data(n=48):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8, 8, 1)).astype("float32"), rng.integers(0, 3, n)


def _fit(split, x, y, batch_size=16, epochs=2):
    split.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, seed=0)
    return split.get_weights()


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))


def _plain(seed=0):
    keras.utils.set_random_seed(seed)
    model, cut = small_cnn()
    return keras_split.split(model, cut)


def _baseline_weights(x, y, batch_size=16):
    split = _plain()
    split.compile(optimizer=keras.optimizers.SGD(0.05), loss=LOSS)
    return _fit(split, x, y, batch_size)


def _role(split):
    return ServerRole(split.server, keras.optimizers.SGD(0.05), LOSS)


# -- defence off = baseline, bit for bit ------------------------------------------------


def test_cut_noise_off_is_plain_split_training():
    x, y = _cnn_data()
    split = _plain()
    defended = keras_split.SplitModel(client=add_cut_noise(split.client), server=split.server)
    defended.compile(optimizer=keras.optimizers.SGD(0.05), loss=LOSS)
    assert _same(_fit(defended, x, y), _baseline_weights(x, y))


def test_gaussian_gradient_noise_at_ratio_zero_is_plain_split_training():
    x, y = _cnn_data()
    split = _plain()
    role = GaussianGradientNoise(_role(split), ratio=0.0, seed=0)
    split.compile(optimizer=keras.optimizers.SGD(0.05), transport=InProcessTransport(role))
    assert _same(_fit(split, x, y), _baseline_weights(x, y))


def test_max_norm_with_equal_norms_is_plain_split_training():
    # With one sample per batch, every sample is its batch's largest: σ = 0.
    x, y = _cnn_data(12)
    split = _plain()
    split.compile(optimizer=keras.optimizers.SGD(0.05),
                  transport=InProcessTransport(MaxNormAlignment(_role(split), seed=0)))
    assert _same(_fit(split, x, y, batch_size=1), _baseline_weights(x, y, batch_size=1))


def test_randomized_labels_at_infinite_epsilon_is_plain_split_training():
    x, y = _cnn_data()
    split = _plain()
    transport = RandomizedLabels(InProcessTransport(_role(split)), epsilon=math.inf,
                                 num_classes=3)
    split.compile(optimizer=keras.optimizers.SGD(0.05), transport=transport)
    assert _same(_fit(split, x, y), _baseline_weights(x, y))
    assert transport.bytes.up > 0  # the inner link's counter, shared


# -- activations: CutNoise --------------------------------------------------------------


def test_cut_noise_clips_each_sample_then_adds_noise(rng):
    x = rng.normal(size=(2000, 4, 3)).astype("float32") * 10
    clipped = np.asarray(CutNoise(clip_norm=2.0)(x, training=True))
    norms = np.linalg.norm(clipped.reshape(len(x), -1), axis=1)
    assert norms.max() == pytest.approx(2.0, rel=1e-5)
    small = x / 100  # norms below 2 pass unchanged
    np.testing.assert_allclose(np.asarray(CutNoise(clip_norm=2.0)(small)), small, rtol=1e-6)
    zeros = np.zeros((4000, 50), "float32")
    gaussian = np.asarray(CutNoise(scale=0.5, seed=1)(zeros, training=True))
    assert gaussian.std() == pytest.approx(0.5, rel=0.02)
    # Laplace(b): mean |n| = b, standard deviation b sqrt(2).
    laplace = np.asarray(CutNoise(scale=0.5, distribution="laplace", seed=1)(zeros,
                                                                             training=True))
    assert np.abs(laplace).mean() == pytest.approx(0.5, rel=0.02)
    assert laplace.std() == pytest.approx(0.5 * math.sqrt(2), rel=0.02)
    # Noise at inference too by default (those activations cross as well).
    assert np.asarray(CutNoise(scale=0.5)(zeros, training=False)).std() > 0.4
    assert np.array_equal(np.asarray(CutNoise(scale=0.5, at_inference=False)(zeros)), zeros)


def test_cut_noise_is_savable_and_checks_its_arguments():
    layer = CutNoise(clip_norm=3.0, scale=0.2, distribution="laplace", at_inference=False,
                     seed=5, name="noise")
    again = CutNoise.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()
    assert keras.saving.get_registered_object("keras_split>CutNoise") is CutNoise
    for kwargs, match in [({"clip_norm": 0}, "clip_norm"), ({"scale": -1}, "scale"),
                          ({"scale": math.inf}, "scale"), ({"distribution": "cauchy"}, "one of")]:
        with pytest.raises(ValueError, match=match):
            CutNoise(**kwargs)


def test_a_noisy_client_trains_through_its_clipping():
    x, y = _cnn_data(96)
    split = _plain()
    noisy = add_cut_noise(split.client, clip_norm=5.0, scale=0.05, seed=0)
    defended = keras_split.SplitModel(client=noisy, server=split.server)
    defended.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSS)
    history = defended.fit(x, y, batch_size=16, epochs=4, verbose=0, seed=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    # What crosses is the noisy value: two inference calls differ.
    assert not np.array_equal(np.asarray(noisy(x[:4])), np.asarray(noisy(x[:4])))


# -- labels, server side: gradient perturbation --------------------------------------------


class FixedGradients:
    """A role whose replies carry the same cut gradients every step."""

    def __init__(self, *gradients):
        self.gradients = gradients

    def handle(self, message):
        if message.mode != "train":
            return Reply(step=message.step, logs={"loss": 1.0})
        return Reply(step=message.step, gradients=self.gradients, logs={"loss": 1.0})

    def state(self):
        return {"w": np.ones(2)}

    def restore(self, arrays, path):
        self.restored = arrays


def _train(step, n=3):
    return Activations(step=step, mode="train", tensors=(np.zeros((n, 2), "float32"),),
                       labels=np.zeros(n, "int32"))


def test_max_norm_alignment_matches_the_largest_norm_in_expectation():
    # Per-sample norms 1, 2 and 4 (two cut tensors, concatenated per sample).
    a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], "float32")
    b = np.array([[0.0], [0.0], [4.0]], "float32")
    role = MaxNormAlignment(FixedGradients(a, b), seed=0)
    squares, ratios = [], []
    for step in range(4000):
        ga, gb = role.handle(_train(step)).gradients
        assert ga.dtype == np.float32 and gb.shape == (3, 1)
        rows = np.concatenate([ga, gb], axis=1)
        squares.append(np.sum(rows**2, axis=1))
        # The noise is along each gradient: g̃_j = g_j (1 + σ_j ξ_j).
        ratios.append([rows[0, 0] / 1.0, rows[1, 1] / 2.0])
        assert rows[0, 1] == rows[0, 2] == rows[1, 0] == rows[1, 2] == 0
        assert rows[2, 2] == 4.0  # the largest: σ = 0, unchanged
    # E|g̃_j|^2 = |g_max|^2 = 16 for every sample.
    np.testing.assert_allclose(np.mean(squares, axis=0), 16.0, rtol=0.06)
    # Unbiased: E g̃_j = g_j; σ_1 = sqrt(16/1 - 1), σ_2 = sqrt(16/4 - 1).
    np.testing.assert_allclose(np.mean(ratios, axis=0), 1.0, atol=0.15)
    np.testing.assert_allclose(np.std(ratios, axis=0), [math.sqrt(15), math.sqrt(3)], rtol=0.05)


def test_gradient_noise_is_drawn_per_step_and_reproducible():
    a = np.array([[1.0, 0.0], [0.0, 2.0]], "float32")
    role = MaxNormAlignment(FixedGradients(a), seed=3)
    first = role.handle(_train(7, 2)).gradients[0]
    assert np.array_equal(first, MaxNormAlignment(FixedGradients(a), seed=3)
                          .handle(_train(7, 2)).gradients[0])  # a retry: the same noise
    assert not np.array_equal(first, role.handle(_train(8, 2)).gradients[0])


def test_isotropic_gradient_noise_is_scaled_to_the_largest_norm():
    d = 20000
    g = np.zeros((2, d), "float32")
    g[0, 0], g[1, 1] = 3.0, 6.0
    role = GaussianGradientNoise(FixedGradients(g), ratio=0.5, seed=0)
    noise = role.handle(_train(1, 2)).gradients[0] - g
    # std = ratio * |g_max| / sqrt(d): the noise's norm is about 0.5 * 6 = 3.
    assert noise.std() == pytest.approx(0.5 * 6.0 / math.sqrt(d), rel=0.02)
    assert np.linalg.norm(noise[0]) == pytest.approx(3.0, rel=0.03)
    with pytest.raises(ValueError, match="ratio"):
        GaussianGradientNoise(FixedGradients(g), ratio=-1)


def test_gradient_perturbation_is_a_role_a_server_serves():
    inner = FixedGradients(np.ones((3, 2), "float32"))
    role = MaxNormAlignment(inner, seed=0)
    assert isinstance(role, MessageHandler)
    # Replies without gradients pass unchanged; state and restore are the inner role's.
    message = Activations(step=1, mode="evaluate", tensors=(np.zeros((3, 2), "float32"),),
                          labels=np.zeros(3))
    assert role.handle(message) == inner.handle(message)
    assert list(role.state()) == ["w"]
    role.restore({"w": np.zeros(2)}, "here")
    assert "w" in inner.restored
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    server = keras_split.SplitServer(model, role=role, tokens={"t": "c"}, insecure=True)
    assert server.role is role
    with pytest.raises(TypeError, match="MessageHandler"):
        MaxNormAlignment(object())


def _leak_and_accuracy(wrap=None, transport=None):
    x, y = imbalanced_task()
    x_test, y_test = imbalanced_task(400, 1)
    model, cut = mlp()
    split = keras_split.split(model, cut)
    role = ServerRole(split.server, keras.optimizers.Adam(1e-2), LOSS)
    link = InProcessTransport(wrap(role) if wrap else role)
    split.compile(optimizer=keras.optimizers.Adam(1e-2),
                  transport=transport(link) if transport else link)
    leak = label_leakage(collect_cut_gradients(split, x, y, batch_size=32, epochs=3, seed=0))
    return leak, accuracy(split, x_test, y_test)


def test_gate_max_norm_alignment_against_the_norm_attack():
    """Norm attack AUC <= 0.7 with max-norm alignment; accuracy within 0.03."""
    plain, plain_accuracy = _leak_and_accuracy()
    leak, defended_accuracy = _leak_and_accuracy(lambda role: MaxNormAlignment(role, seed=0))
    assert plain.norm_auc >= 0.8
    assert leak.norm_auc <= 0.7, leak
    assert abs(defended_accuracy - plain_accuracy) <= 0.03, (plain_accuracy, defended_accuracy)


def test_gate_randomized_response_against_both_attacks():
    """Both attacks' AUC <= 0.75 with randomized response at epsilon = 1."""
    leak, _ = _leak_and_accuracy(
        transport=lambda link: RandomizedLabels(link, epsilon=1.0, num_classes=2, seed=0))
    assert leak.norm_auc <= 0.75 and leak.cosine_auc <= 0.75, leak


# -- labels, client side: randomized response -------------------------------------------------


def test_randomized_response_flips_with_the_stated_probability():
    epsilon = 1.0
    y = np.zeros(200_000, "int64")
    flipped = np.mean(randomized_response(y, epsilon, 2, rng=0) != y)
    assert flipped == pytest.approx(1 / (math.exp(epsilon) + 1), abs=0.004)
    # K classes: keep with e^ε / (e^ε + K - 1), each other class 1 / (e^ε + K - 1).
    noisy = randomized_response(np.full(300_000, 2), epsilon, 4, rng=1)
    frequencies = np.bincount(noisy, minlength=4) / len(noisy)
    denominator = math.exp(epsilon) + 3
    np.testing.assert_allclose(frequencies, [1 / denominator] * 2 + [math.exp(epsilon) /
                                             denominator, 1 / denominator], atol=0.003)
    # The ε-label-DP ratio, exactly: P(ỹ = y | y) / P(ỹ = y | y') = e^ε.
    assert keep_probability(epsilon, 4) / (1 / denominator) == pytest.approx(math.exp(epsilon))


def test_randomized_response_keeps_shapes_dtypes_and_one_hot():
    y = np.array([[0], [1], [1], [0]], "float32")
    noisy = randomized_response(y, 0.5, 2, rng=0)
    assert noisy.shape == y.shape and noisy.dtype == y.dtype and set(noisy.ravel()) <= {0, 1}
    one_hot = np.eye(3, dtype="float32")[[0, 1, 2, 2, 1]]
    noisy = randomized_response(one_hot, 0.1, 3, rng=0)
    assert noisy.shape == one_hot.shape and np.array_equal(noisy.sum(axis=1), np.ones(5))
    assert np.array_equal(randomized_response(y, math.inf, 2), y)
    for labels, epsilon, classes, match in [(np.array([0, 2]), 1.0, 2, r"\[0, 2\)"),
                                            (np.array([0, 1]), 0.0, 2, "epsilon"),
                                            (np.array([0, 1]), 1.0, 1, "num_classes")]:
        with pytest.raises(ValueError, match=match):
            randomized_response(labels, epsilon, classes)


def test_randomized_labels_randomize_what_crosses_and_nothing_else():
    seen = []

    class Server(Transport):
        def _exchange(self, message):
            seen.append(message)
            return Reply(step=message.step), 1, 1

    server = Server()
    link = RandomizedLabels(server, epsilon=0.5, num_classes=2, seed=0)
    y = np.arange(64) % 2
    x = (np.zeros((64, 2), "float32"),)
    link.exchange(Activations(step=1, mode="train", tensors=x, labels=y))
    link.exchange(Activations(step=2, mode="evaluate", tensors=x, labels=y))
    link.exchange(Activations(step=3, mode="predict", tensors=x))
    assert not np.array_equal(seen[0].labels, y) and not np.array_equal(seen[1].labels, y)
    assert seen[2].labels is None and seen[0].tensors is x
    # One counter, the server link's: each message counted once, not twice.
    assert link.bytes is server.bytes and link.bytes.up == 3


# -- U-shaped: labels never leave the client ---------------------------------------------------


def test_u_shaped_training_sends_no_labels_across():
    x, y = imbalanced_task(64)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10,))
    h = keras.layers.Dense(8, activation="relu", name="first")(inputs)
    h = keras.layers.Dense(8, activation="relu", name="middle")(h)
    chain = keras_split.split_chain(keras.Model(inputs, keras.layers.Dense(2)(h)),
                                    cuts=["first", "middle"])
    seen = []

    class Watch(Transport):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.bytes = inner, inner.bytes

        def _exchange(self, message):
            seen.append(message)
            return self.inner.exchange(message), 0, 0

    # Both hops: client -> server, and server -> the client's last segment.
    chain.compile(optimizer="sgd", loss=LOSS, labels="client", transports=[Watch, Watch])
    chain.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert len(seen) == 8 and all(m.labels is None and m.sample_weight is None for m in seen)
