"""The attacks on what crosses the cut (keras_split.privacy.attacks), and their gates.

Gates (deterministic: seeded data, weights and batch order; each run takes seconds):

- Undefended, on a 9:1 imbalanced binary task (400 samples, a small MLP cut
  after its first layer), the norm attack reaches a mean per-batch AUC of at
  least 0.8 and the cosine attack at least 0.95 (Li et al. report up to 1.0).
- The inversion network beats the mean-image baseline (lower MSE, higher
  SSIM) on held-out images, through a spatial cut and through a flat one.
- dCor(x, cut) is 1 for a similarity transform of the inputs, and near the
  shuffled baseline for activations that ignore them.

The defences' gates are in tests/test_privacy_defences.py.
"""

import math
import sys

import keras
import numpy as np
import pytest

import keras_split
from keras_split.privacy import distance_correlation
from keras_split.privacy.attacks import (
    AuditReport,
    CutGradients,
    audit,
    collect_cut_gradients,
    dcor_leakage,
    inversion_decoder,
    label_leakage,
    model_inversion,
    roc_auc,
)

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# -- shared with tests/test_privacy_defences.py ----------------------------------


def imbalanced_task(n=400, seed=0):
    """A 9:1 binary task: 10 features, the rare positives shifted on three of them."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype("int32")
    x = rng.normal(size=(n, 10)).astype("float32")
    x[:, :3] += 1.5 * y[:, None]
    return x, y


def mlp(seed=0):
    """Client: one Dense layer (the cut); server: one hidden layer and two logits."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((10,), name="features")
    h = keras.layers.Dense(16, activation="relu", name="client_dense")(inputs)
    h = keras.layers.Dense(16, activation="relu", name="server_dense")(h)
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(h)), "client_dense"


def accuracy(split, x, y):
    return float(np.mean(np.argmax(split.merge().predict(x, verbose=0), -1) == y))


# -- ROC AUC ---------------------------------------------------------------------


def test_roc_auc_by_hand():
    # Positives score 0.35 and 0.8, negatives 0.1 and 0.4. Of the 4 (positive,
    # negative) pairs, the positive is higher in 3: (0.35, 0.1), (0.8, 0.1),
    # (0.8, 0.4); (0.35, 0.4) is lower. AUC = 3/4.
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # Ties count one half: positives 1 and 2, negative 1 -> (0.5 + 1) / 2.
    assert roc_auc([1.0, 1.0, 2.0], [0, 1, 1]) == 0.75
    assert roc_auc([3, 2, 1], [1, 0, 0]) == 1.0
    assert roc_auc([3, 2, 1], [0, 1, 1]) == 0.0
    assert roc_auc([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5
    assert math.isnan(roc_auc([1, 2], [1, 1]))  # one class: undefined


def test_roc_auc_against_the_pair_count(rng):
    scores = rng.integers(0, 6, size=60).astype(float)  # many ties
    labels = rng.random(60) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert roc_auc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)))


# -- label leakage -----------------------------------------------------------------


def test_label_leakage_by_hand():
    # A linear server head with weight w: the cut gradient of sample i is
    # (p_i - y_i) w. Positives (p - 1 < 0) point along -w with large norms,
    # negatives (p > 0) along +w with small ones: both attacks read every label.
    w = np.array([1.0, -2.0, 0.5])
    p = np.array([0.1, 0.2, 0.15, 0.3, 0.1, 0.25])
    y = np.array([0, 1, 0, 1, 0, 1])
    grads = (p - y)[:, None] * w[None, :]
    result = label_leakage(grads, y)
    assert result.norm_auc == 1.0 and result.cosine_auc == 1.0
    # The first positive (sample 1) is the reference and left out: the other
    # positives have cosine 1, the negatives -1.
    assert len(result.norm_aucs) == 1
    # Flipping every direction but keeping norms: the cosine attack still
    # separates (against the flipped reference), the norm attack unchanged.
    flipped = label_leakage([-grads], [y])
    assert flipped.norm_auc == 1.0 and flipped.cosine_auc == 1.0
    # A fixed reference along +w ranks negatives first: AUC 0.
    assert label_leakage(grads, y, reference=w).cosine_auc == 0.0


def test_label_leakage_skips_batches_without_both_classes():
    grads = [np.ones((4, 2)), np.array([[1.0, 0], [3.0, 0], [1.0, 0], [3.0, 0]])]
    labels = [np.zeros(4), np.array([0, 1, 0, 1])]
    result = label_leakage(CutGradients(grads, labels))
    assert math.isnan(result.norm_aucs[0]) and result.norm_aucs[1] == 1.0
    assert result.norm_auc == 1.0
    # One positive besides the reference is needed for a cosine AUC.
    assert math.isnan(result.cosine_aucs[0])
    with pytest.raises(ValueError, match="one label array per batch"):
        label_leakage(grads, labels[:1])
    with pytest.raises(ValueError, match="one label per sample"):
        label_leakage([np.ones((4, 2))], [np.zeros(3)])


def test_collect_cut_gradients_records_what_the_client_receives():
    x, y = imbalanced_task(64)
    model, cut = mlp()
    split = keras_split.split(model, cut)
    split.compile(optimizer="sgd", loss=LOSS)
    transport = split.transport
    grads = collect_cut_gradients(split, x, y, batch_size=16, epochs=2, seed=0)
    assert split.transport is transport  # put back
    assert len(grads) == 8 and all(g.shape == (16, 16) for g in grads.gradients)
    assert sorted(np.concatenate(grads.labels[:4]).tolist()) == sorted(y.tolist())
    with pytest.raises(ValueError, match="compiled first"):
        collect_cut_gradients(keras_split.split(mlp()[0], cut), x, y)


def test_gate_undefended_label_leakage_on_an_imbalanced_task():
    """Norm attack AUC >= 0.8, cosine attack AUC >= 0.95 (undefended)."""
    x, y = imbalanced_task()
    model, cut = mlp()
    split = keras_split.split(model, cut)
    split.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSS, metrics=["accuracy"])
    leak = label_leakage(collect_cut_gradients(split, x, y, batch_size=32, epochs=3, seed=0))
    assert leak.norm_auc >= 0.8, leak
    assert leak.cosine_auc >= 0.95, leak


# -- model inversion -----------------------------------------------------------------


def squares(n, seed):
    """8x8 uint8 images: a bright 3x3 square at a random place on a dim noisy background."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(n, 8, 8, 1))
    for image, (r, c) in zip(images, rng.integers(0, 6, size=(n, 2)), strict=True):
        image[r:r + 3, c:c + 3] = 220
    return images.astype("uint8")


def conv_client():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    return keras.Model(inputs, keras.layers.MaxPooling2D()(x))


def test_inversion_decoder_fits_the_cut_and_the_input():
    spatial = inversion_decoder((5, 5, 32), (28, 28, 1))
    assert spatial.output_shape == (None, 28, 28, 1)
    assert any(isinstance(layer, keras.layers.Conv2DTranspose) for layer in spatial.layers)
    flat = inversion_decoder((64,), (28, 28, 1))
    assert flat.output_shape == (None, 28, 28, 1)
    assert not any(isinstance(layer, keras.layers.Conv2DTranspose) for layer in flat.layers)
    assert inversion_decoder((3, 2, 4), (7, 5, 3)).output_shape == (None, 7, 5, 3)


def test_gate_inversion_beats_the_mean_image_through_a_spatial_cut():
    client = conv_client()
    result = model_inversion(client, squares(300, 0), squares(100, 1), epochs=30,
                             batch_size=32, examples=5)
    assert result.mse < result.baseline_mse, result
    assert result.ssim > result.baseline_ssim, result
    assert result.originals.shape == result.reconstructions.shape == (5, 8, 8, 1)
    assert 0 <= result.originals.min() and result.originals.max() <= 1


def test_gate_inversion_beats_the_mean_image_through_a_flat_cut():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    client = keras.Model(inputs, keras.layers.Dense(24, activation="relu")(x))
    # A function x -> cut works as well as a model.
    result = model_inversion(lambda batch: client(batch, training=False), squares(300, 0),
                             squares(100, 1), epochs=30, batch_size=32)
    assert result.mse < result.baseline_mse, result


def test_inversion_checks_its_inputs():
    with pytest.raises(ValueError, match="one shape"):
        model_inversion(conv_client(), squares(4, 0), np.zeros((2, 4, 4, 1)))
    with pytest.raises(TypeError, match="keras.Model"):
        model_inversion("client", squares(4, 0), squares(4, 1))


# -- distance correlation -----------------------------------------------------------------


def test_dcor_leakage_of_a_similarity_and_of_noise(rng):
    x = rng.normal(size=(256, 6)).astype("float32")
    same = dcor_leakage(lambda batch: 2.0 * batch + 1.0, x, batch_size=64)
    assert same.dcor == pytest.approx(1.0, abs=1e-4)
    assert same.per_batch.shape == (4,) and same.batch_size == 64
    # Independent activations read about the shuffled baseline: dCor's
    # finite-sample bias at 64 samples (about 0.5 here), far from 1.
    noise = dcor_leakage(lambda batch: rng.normal(size=(len(batch), 3)), x, batch_size=64)
    assert noise.dcor < 0.6 and abs(noise.dcor - noise.baseline) < 0.1
    assert same.baseline < 0.6
    with pytest.raises(ValueError, match="fewer than one batch"):
        dcor_leakage(lambda batch: batch, x[:10], batch_size=64)


def test_dcor_label_reference_is_dcor_of_the_inputs_with_the_labels(rng):
    x = rng.normal(size=(192, 5)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")  # binary labels that depend on x
    result = dcor_leakage(lambda batch: batch[:, :2], x, batch_size=64, y=y)
    # Binary one-hot rows are sqrt(2)|y_i - y_j| apart: the same dCor as the labels
    # as one numeric column (dCor is invariant to scaling), batch by batch.
    want = np.mean([float(distance_correlation(x[i:i + 64], y[i:i + 64, None].astype("float32")))
                    for i in range(0, 192, 64)])
    assert result.label_reference == pytest.approx(want, abs=1e-5)
    assert 0.3 < result.label_reference < 1.0
    assert dcor_leakage(lambda batch: batch, x, batch_size=64).label_reference is None


def test_dcor_label_reference_treats_class_indices_as_categories(rng):
    x = rng.normal(size=(128, 4)).astype("float32")
    y = rng.integers(0, 5, size=128)
    result = dcor_leakage(lambda batch: batch, x, batch_size=64, y=y)
    # Renaming the classes changes nothing (as integers, it would move their distances),
    # and one-hot rows passed as floats read the same.
    renamed = np.array([3, 0, 4, 1, 2])[y]
    assert dcor_leakage(lambda batch: batch, x, batch_size=64, y=renamed).label_reference == \
        pytest.approx(result.label_reference, abs=1e-6)
    one_hot = np.eye(5, dtype="float32")[y]
    assert dcor_leakage(lambda batch: batch, x, batch_size=64, y=one_hot).label_reference == \
        pytest.approx(result.label_reference, abs=1e-6)
    as_numbers = np.mean([float(distance_correlation(x[i:i + 64],
                                                     y[i:i + 64, None].astype("float32")))
                          for i in (0, 64)])
    assert abs(as_numbers - result.label_reference) > 1e-3
    with pytest.raises(ValueError, match="127 labels, but `x` has 128"):
        dcor_leakage(lambda batch: batch, x, batch_size=64, y=y[:127])
    with pytest.raises(ValueError, match="must hold numbers"):
        dcor_leakage(lambda batch: batch, x, batch_size=64, y=np.array(["a"] * 128))


# -- the audit and the figures -----------------------------------------------------------


def _trained_mlp_split():
    x, y = imbalanced_task(256)
    model, cut = mlp()
    split = keras_split.split(model, cut)
    split.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSS)
    split.fit(x, y, batch_size=32, epochs=1, verbose=0, seed=0)
    return split, x, y


def test_audit_prints_one_table():
    split, x, y = _trained_mlp_split()
    printed = []
    report = audit(split, x, y, imbalanced_task(128, 1)[0], inversion_epochs=2,
                   dcor_batch_size=64, print_fn=printed.append)
    assert isinstance(report, AuditReport) and printed == [str(report)]
    attacks = [row.attack for row in report.rows]
    assert attacks == ["label leakage: norm", "label leakage: cosine", "model inversion",
                       "distance correlation"]  # no SSIM row: the inputs are not images
    table = printed[0].splitlines()
    assert table[0].split() == ["attack", "metric", "value", "baseline"]
    assert len(table) == 2 + len(report.rows)
    assert report.label.norm_auc == report.rows[0].value
    assert report.dcor.label_reference is None


def test_audit_with_test_labels_adds_the_dcor_reference_row():
    split, x, y = _trained_mlp_split()
    x_test, y_test = imbalanced_task(128, 1)
    report = audit(split, x, y, x_test, inversion_epochs=1, dcor_batch_size=64,
                   y_test=y_test, print_fn=None)
    reference = report.rows[-1]
    assert reference.metric == "dCor(x, labels): the task's own"
    assert reference.value == pytest.approx(
        dcor_leakage(split.client, x_test, batch_size=64, y=y_test).label_reference)


def _block(monkeypatch, name):
    for loaded in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        monkeypatch.setitem(sys.modules, loaded, None)
    monkeypatch.setitem(sys.modules, name, None)


def test_plots_need_matplotlib_and_say_how_to_install_it(monkeypatch):
    _block(monkeypatch, "matplotlib")
    leak = label_leakage(np.eye(4), np.array([0, 1, 0, 1]))
    with pytest.raises(ImportError, match=r"pip install 'keras-split\[plot\]'"):
        leak.plot()


def test_plots_draw_figures():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    result = model_inversion(conv_client(), squares(64, 0), squares(16, 1), epochs=1)
    assert len(result.plot(n=4).axes) == 8
    leak = label_leakage([np.eye(4)] * 3, [np.array([0, 1, 0, 1])] * 3)
    assert len(leak.plot().axes) == 1
