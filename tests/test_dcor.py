"""Distance correlation (keras_split.privacy.distance_correlation) from closed
forms, against an independent numpy implementation, and its gradient where
samples coincide."""

import math

import numpy as np
import pytest
import tensorflow as tf

from keras_split.privacy import distance_correlation


def dcor_reference(x, z):
    """Székely's sample dCor, written independently: pairwise loops, float64."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    z = np.asarray(z, np.float64).reshape(len(z), -1)
    n = len(x)

    def centred(rows):
        d = np.array([[np.sqrt(np.sum((rows[i] - rows[j]) ** 2)) for j in range(n)]
                      for i in range(n)])
        return d - d.mean(axis=0)[None, :] - d.mean(axis=1)[:, None] + d.mean()

    a, b = centred(x), centred(z)
    covariance, vx, vz = (a * b).mean(), (a * a).mean(), (b * b).mean()
    if vx * vz == 0:
        return 0.0
    return math.sqrt(max(covariance, 0.0) / math.sqrt(vx * vz))


def value(x, z) -> float:
    return float(distance_correlation(x, z))


def test_four_points_by_hand():
    # x = (0, 1, 2, 3), z = (0, 0, 1, 1).
    # a = |i - j|; row means (1.5, 1, 1, 1.5), grand mean 1.25; double centred:
    #   A = [[-1.75, -0.25,  0.75,  1.25],
    #        [-0.25, -0.75,  0.25,  0.75],
    #        [ 0.75,  0.25, -0.75, -0.25],
    #        [ 1.25,  0.75, -0.25, -1.75]]
    # b is 1 between the halves {0, 1} and {2, 3}, else 0; all means 0.5, so
    #   B = b - 0.5 (entries +-0.5).
    # sum(A * B) = 2 + 1 + 1 + 2 = 6       -> dCov^2  = 6 / 16  = 0.375
    # sum(A * A) = 5.25 + 1.25 + 1.25 + 5.25 -> dVarX^2 = 13 / 16 = 0.8125
    # sum(B * B) = 16 * 0.25 = 4           -> dVarZ^2 = 4 / 16  = 0.25
    # dCor^2 = 0.375 / sqrt(0.8125 * 0.25) = 0.375 * 8 / sqrt(13) = 3 / sqrt(13)
    # dCor = sqrt(3 / sqrt(13)) = 0.912168 (the `dcor` package agrees).
    x = np.array([0.0, 1.0, 2.0, 3.0])
    z = np.array([0.0, 0.0, 1.0, 1.0])
    assert value(x, z) == pytest.approx(math.sqrt(3 / math.sqrt(13)), rel=1e-12)
    assert value(x.astype("float32"), z.astype("float32")) == pytest.approx(0.912168, rel=1e-6)
    assert dcor_reference(x, z) == pytest.approx(math.sqrt(3 / math.sqrt(13)), rel=1e-12)


@pytest.mark.parametrize("shape", [(32,), (32, 5), (16, 4, 4, 2)])
@pytest.mark.parametrize(("scale", "shift"), [(2.0, 1.0), (-0.5, 3.0), (1e-3, -7.0)])
def test_affine_image_has_dcor_one(rng, shape, scale, shift):
    # Distances of a * x + b are |a| times those of x: A_z = |a| A_x, so
    # dCov^2 = |a| dVarX^2 and dVarZ^2 = a^2 dVarX^2, and dCor^2 = 1.
    x = rng.normal(size=shape).astype("float32")
    assert value(x, scale * x + shift) == pytest.approx(1.0, abs=1e-5)


def test_invariant_to_scaling_and_rotating_either_argument(rng):
    x = rng.normal(size=(40, 6))
    z = np.tanh(x[:, :3] @ rng.normal(size=(3, 4))) + 0.5 * rng.normal(size=(40, 4))
    q_x, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # orthogonal
    q_z, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    base = value(x, z)
    assert 0.2 < base < 0.95
    for xx, zz in [(3.0 * x, z), (x, 0.01 * z), (x @ q_x, z), (x, z @ q_z),
                   (x @ q_x * 5.0 + 2.0, z @ q_z * 0.1 - 1.0), (z, x)]:
        assert value(xx, zz) == pytest.approx(base, rel=1e-9)


def test_independent_samples_fall_as_one_over_root_n():
    # The docstring's rate: for independent x, z, n dCor^2 -> c in mean with
    # c = E|x - x'| E|z - z'| / (dVar(x) dVar(z)). For standard normals in one
    # dimension E|x - x'| = 2 / sqrt(pi) and dVar^2 = (4 / pi)(1 - sqrt(3) + pi / 3),
    # so c = 1 / (1 - sqrt(3) + pi / 3) = 3.173; dCor itself falls as n^-1/2.
    c = 1 / (1 - math.sqrt(3) + math.pi / 3)
    rng = np.random.default_rng(7)
    means = {}
    for n in (64, 256):
        values = np.array([value(rng.normal(size=(n, 1)), rng.normal(size=(n, 1)))
                           for _ in range(200)])
        assert n * np.mean(values ** 2) == pytest.approx(c, rel=0.2)
        means[n] = values.mean()
    # Four times the samples, half the bias.
    assert means[64] / means[256] == pytest.approx(2.0, rel=0.15)
    assert means[256] < 0.15


@pytest.mark.parametrize("case", ["vectors", "images", "lists", "integers"])
def test_agrees_with_an_independent_numpy_implementation(rng, case):
    n = 24
    x = rng.normal(size=(n, 5))
    z = np.maximum(x @ rng.normal(size=(5, 8)), 0) + 0.3 * rng.normal(size=(n, 8))
    if case == "images":
        x, z = x.reshape(n, 5, 1, 1) * np.ones((1, 1, 3, 2)), z.reshape(n, 2, 2, 2)
    if case == "lists":  # several tensors per sample: flattened and side by side
        got = value([x[:, :2], x[:, 2:]], [z[:, :3].reshape(n, 3, 1), z[:, 3:]])
        assert got == pytest.approx(dcor_reference(x, z), rel=1e-9)
        return
    if case == "integers":  # pixels: cast to float32
        x = rng.integers(0, 256, size=(n, 4, 4, 1)).astype("uint8")
        z = z.astype("float32")
        assert value(x, z) == pytest.approx(dcor_reference(x, z), rel=1e-5)
        return
    assert value(x, z) == pytest.approx(dcor_reference(x, z), rel=1e-9)
    assert value(x.astype("float32"), z.astype("float32")) == pytest.approx(
        dcor_reference(x, z), rel=1e-5)


def test_agrees_with_the_dcor_package():
    # dcor 0.7 (pip install dcor; not a dependency), on this data:
    #   dcor.distance_correlation(x, z) == 0.7237845905174565
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 7))
    z = np.tanh(x @ rng.normal(size=(7, 3))) + 0.3 * rng.normal(size=(40, 3))
    assert value(x, z) == pytest.approx(0.7237845905174565, rel=1e-12)


def test_gradient_agrees_with_finite_differences_of_the_reference(rng):
    x = rng.normal(size=(7, 3))
    z = rng.normal(size=(7, 2)) + 0.5 * x[:, :2]
    variable = tf.Variable(z)
    with tf.GradientTape() as tape:
        result = distance_correlation(x, variable)
    gradient = tape.gradient(result, variable).numpy()
    step, numeric = 1e-6, np.zeros_like(z)
    for index in np.ndindex(*z.shape):
        up, down = z.copy(), z.copy()
        up[index] += step
        down[index] -= step
        numeric[index] = (dcor_reference(x, up) - dcor_reference(x, down)) / (2 * step)
    np.testing.assert_allclose(gradient, numeric, rtol=1e-5, atol=1e-8)


def test_gradient_is_finite_where_samples_coincide(rng):
    # d|z_i - z_j| / dz_i = (z_i - z_j) / |z_i - z_j| is 0/0 for identical rows
    # (and on the diagonal); the safe norm takes no gradient there.
    x = rng.normal(size=(8, 4)).astype("float32")
    z = rng.normal(size=(8, 3)).astype("float32")
    z[1] = z[0]
    z[5] = z[0]
    x[3] = x[2]
    variable = tf.Variable(z)
    with tf.GradientTape() as tape:
        result = distance_correlation(x, variable)
    gradient = tape.gradient(result, variable).numpy()
    assert np.isfinite(float(result)) and np.isfinite(gradient).all()
    assert np.abs(gradient).max() > 0
    assert float(result) == pytest.approx(dcor_reference(x, z), rel=1e-5)


def test_a_constant_batch_has_dcor_zero_and_a_zero_gradient(rng):
    x = rng.normal(size=(6, 4)).astype("float32")
    for z in (np.ones((6, 3), "float32"), np.zeros((6, 3), "float32")):
        variable = tf.Variable(z)
        with tf.GradientTape() as tape:
            result = distance_correlation(x, variable)
        assert float(result) == 0.0
        np.testing.assert_array_equal(tape.gradient(result, variable).numpy(), 0.0)
    assert value(np.full((6, 2), 3.0), x) == 0.0  # the variance of x is 0 too


def test_works_inside_tf_function_with_an_unknown_batch(rng):
    x = rng.normal(size=(10, 4)).astype("float32")
    compiled = tf.function(distance_correlation, input_signature=[
        tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None, 4], tf.float32)])
    assert float(compiled(x, 2 * x)) == pytest.approx(1.0, abs=1e-5)


def test_mismatched_batches_and_unknown_feature_sizes_are_refused(rng):
    with pytest.raises(ValueError, match="same samples.*10 and 9"):
        distance_correlation(np.zeros((10, 2)), np.zeros((9, 2)))
    with pytest.raises(ValueError, match="empty structure"):
        distance_correlation([], np.zeros((9, 2)))
