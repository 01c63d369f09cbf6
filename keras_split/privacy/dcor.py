"""Sample distance correlation (Székely, Rizzo and Bakirov), in `keras.ops`.

Distance correlation measures any dependence between two random vectors, not
only a linear one: it is 0 exactly when they are independent (in the
population) and 1 when one is a similarity transform of the other (a
scaling, rotation and shift). NoPeek (`keras_split.privacy.NoPeek`) minimises
it between a client's raw batch and its cut activations.

The batch estimate, for `n` samples flattened to rows `x_i` and `z_i`:

1. Euclidean (not squared) pairwise distances `a_ij = |x_i - x_j|`,
   `b_ij = |z_i - z_j|`, each an `n x n` matrix computed with one matmul
   (`|u|^2 + |v|^2 - 2 u.v`, on rows centred on the batch mean).
2. Double centring: `A = a - row means - column means + grand mean`, and `B`
   likewise.
3. `dCov^2 = mean(A * B)`, `dVarX^2 = mean(A * A)`, `dVarZ^2 = mean(B * B)`
   (the V-statistics, each >= 0).
4. `dCor = dCov / sqrt(dVarX * dVarZ)`, i.e. `sqrt(dCov^2 / sqrt(dVarX^2 *
   dVarZ^2))`, in [0, 1]; 0 when either variance is 0 (a constant batch).

Two places would make the gradient NaN, and neither does here: the
derivative of `sqrt` at a zero distance (a sample with itself, or two
identical samples) and at `dCov^2 = 0`. Both square roots are taken only
above a threshold, with 0 (and a zero gradient) below it.
"""

from __future__ import annotations

import math

import keras
from keras import ops

# Squared distances at most this are treated as 0: two rows closer than 1e-6
# count as the same sample, and the square root (whose slope is infinite at 0)
# is not differentiated there.
SQUARED_DISTANCE_EPSILON = 1e-12
# dCor^2 at most this is reported as 0 (dCor below 1e-6), for the same reason.
SQUARED_DCOR_EPSILON = 1e-12


def _compute_dtype(*structures) -> str:
    leaves = [leaf for s in structures for leaf in keras.tree.flatten(s)]
    float64 = any(keras.backend.standardize_dtype(leaf.dtype) == "float64" for leaf in leaves
                  if hasattr(leaf, "dtype"))
    return "float64" if float64 else "float32"


def _rows(structure, dtype):
    """One row per sample: each tensor of `structure` flattened, side by side."""
    parts = []
    for leaf in keras.tree.flatten(structure):
        leaf = ops.cast(ops.convert_to_tensor(leaf), dtype)
        features = 1
        for size in leaf.shape[1:]:
            if size is None:
                raise ValueError(f"distance_correlation needs the sizes of every axis but the "
                                 f"batch; received a tensor of shape {tuple(leaf.shape)}.")
            features *= int(size)
        parts.append(ops.reshape(leaf, (-1, features)))
    if not parts:
        raise ValueError("distance_correlation received an empty structure: expected a "
                         "tensor (or a list of tensors) with one row per sample.")
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=1)


def _safe_sqrt(value, threshold):
    """sqrt(value) above `threshold`, else 0; its gradient is finite everywhere."""
    keep = ops.greater(value, threshold)
    return ops.where(keep, ops.sqrt(ops.where(keep, value, ops.ones_like(value))),
                     ops.zeros_like(value))


def _distances(rows):
    """(rows centred on the batch mean, their distances, the pairs kept)."""
    # Distances do not change under a shift; centring first keeps the matmul
    # form accurate for data far from the origin (|u|^2 + |v|^2 - 2 u.v would
    # otherwise lose every digit of a small distance between large vectors).
    rows = rows - ops.mean(rows, axis=0, keepdims=True)
    squares = ops.sum(ops.square(rows), axis=1)
    squared = (ops.expand_dims(squares, 1) + ops.expand_dims(squares, 0)
               - 2.0 * ops.matmul(rows, ops.transpose(rows)))
    index = ops.arange(ops.shape(rows)[0])
    # The matmul form leaves rounding noise where the distance is 0: the
    # diagonal is dropped outright, with pairs closer than the threshold.
    off_diagonal = ops.not_equal(ops.expand_dims(index, 1), ops.expand_dims(index, 0))
    keep = ops.logical_and(off_diagonal, ops.greater(squared, SQUARED_DISTANCE_EPSILON))
    distances = ops.where(keep, ops.sqrt(ops.where(keep, squared, ops.ones_like(squared))),
                          ops.zeros_like(squared))
    return rows, distances, keep


def pairwise_distances(rows):
    """Euclidean distances between the rows of an `(n, p)` matrix, as `(n, n)`.

    The diagonal is exactly 0, and so is any pair closer than 1e-6 (see
    `SQUARED_DISTANCE_EPSILON`); no gradient flows through those.
    """
    return _distances(rows)[1]


def double_centre(distances):
    """`d - row means - column means + grand mean` (each row and column then sums to 0)."""
    return (distances - ops.mean(distances, axis=1, keepdims=True)
            - ops.mean(distances, axis=0, keepdims=True) + ops.mean(distances))


def distance_correlation(x, z):
    """The sample distance correlation between two batches, in [0, 1].

    Use it to measure how much a representation `z` still tells about the raw
    data `x` (NoPeek minimises it), or any dependence between two batches. It
    is a batch statistic: every sample is compared with every other, so its
    cost grows with the square of the batch size (two `n x n` matrices).

    Finite-sample bias: for independent `x` and `z` it does not return 0 but a
    positive value that falls as `n ** -0.5` (`n` the batch size): `n * dCov^2`
    converges in distribution with mean `E|x - x'| E|z - z'|`, while the
    variances converge, so `dCor^2 ~ c / n` with
    `c = E|x - x'| E|z - z'| / (dVar(x) dVar(z))`. Four times the batch halves
    it. The constant grows with the dimension (distances between
    high-dimensional samples concentrate), so compare values only at the same
    batch size.

    Args:
        x: a tensor with one sample per row along axis 0 (of any rank), or a
            list (or other structure) of such tensors, flattened per sample
            and concatenated. Integer inputs (pixels) are cast to float.
        z: the same for the other variable; the batch size must be the same.

    Returns:
        A scalar tensor: `dCov(x, z) / sqrt(dVar(x) dVar(z))`, computed in
        float32 (float64 if an input is float64). It is 0 when either batch
        is constant (a zero distance variance), and its gradient is finite
        even when samples coincide.

    Example:

    ```python
    x = np.random.normal(size=(64, 10)).astype("float32")
    distance_correlation(x, 2.0 * x + 1.0)  # 1.0
    distance_correlation(x, np.random.normal(size=(64, 3)))  # about 0.2 (the bias)
    ```

    Reference:
        Székely, Rizzo and Bakirov, "Measuring and testing dependence by
        correlation of distances", Annals of Statistics 35(6), 2007.
    """
    return _statistics(x, z)["dcor"]


def _statistics(x, z):
    """The pieces of dCor(x, z), for the value and for its derivative."""
    dtype = _compute_dtype(x, z)
    x_rows, z_rows = _rows(x, dtype), _rows(z, dtype)
    sizes = (x_rows.shape[0], z_rows.shape[0])
    if None not in sizes and sizes[0] != sizes[1]:
        raise ValueError(f"distance_correlation needs the same samples in `x` and `z`; "
                         f"received batches of {sizes[0]} and {sizes[1]}.")
    a = double_centre(_distances(x_rows)[1])
    z_rows, b, keep = _distances(z_rows)
    big_b = double_centre(b)
    covariance = ops.mean(a * big_b)
    variance_x, variance_z = ops.mean(a * a), ops.mean(big_b * big_b)
    # sqrt(dVarX^2) * sqrt(dVarZ^2), not sqrt of their product: the product
    # underflows float32 for batches of small values (distances of 1e-6).
    scale = _safe_sqrt(variance_x, 0.0) * _safe_sqrt(variance_z, 0.0)
    positive = ops.greater(scale, 0.0)
    squared = ops.where(positive, covariance / ops.where(positive, scale, ops.ones_like(scale)),
                        ops.zeros_like(scale))
    return {"dcor": _safe_sqrt(squared, SQUARED_DCOR_EPSILON), "squared": squared,
            "a": a, "b": b, "big_b": big_b, "keep": keep, "z_rows": z_rows,
            "covariance": covariance, "variance_z": variance_z, "scale": scale}


def _safe_divide(numerator, denominator, where):
    """numerator / denominator where `where`, else 0 (no division by 0 anywhere)."""
    safe = ops.where(where, denominator, ops.ones_like(denominator))
    return ops.where(where, numerator / safe, ops.zeros_like(numerator))


def distance_correlation_gradients(x, z) -> list:
    """The gradient of `distance_correlation(x, z)` with respect to `z`, written out.

    The same derivative TensorFlow's autodiff takes (tests compare them), with
    forward ops only (matmuls, elementwise ops, reductions, `where`): a device
    runtime without gradient kernels (LiteRT's builtins, ONNX) runs it, which
    is how an exported NoPeek client trains on device. Backwards, with `n` the
    batch size, `A`, `B` the double-centred distances of x and z,
    `C = mean(A B)`, `Vz = mean(B B)`, `s = sqrt(Vx) sqrt(Vz)`, `r2 = C / s`
    and `dCor = sqrt(r2)`:

    1. `G = d dCor / d B = (A - (C / Vz) B) / (2 dCor n^2 s)`, 0 where dCor or a
       variance is 0 (below the thresholds the forward pass uses);
    2. through the double centring, its own adjoint, to the distances `b`;
    3. `d b_ij / d d2_ij = 1 / (2 b_ij)` for the pairs kept, else 0;
    4. `d2_ij = |z_i|^2 + |z_j|^2 - 2 z_i.z_j` on centred rows gives
       `2 z (rowsum(G) + colsum(G)) - 2 (G + G^T) z`; then the centring's
       adjoint removes the mean row.

    Args:
        x, z: as in `distance_correlation`.

    Returns:
        One tensor per tensor of `z` (flattened order), of its shape.
    """
    pieces = _statistics(x, z)
    dcor, z_rows = pieces["dcor"], pieces["z_rows"]
    live = ops.greater(pieces["squared"], SQUARED_DCOR_EPSILON)
    count = ops.cast(ops.shape(z_rows)[0], z_rows.dtype)
    factor = _safe_divide(ops.ones_like(dcor), 2.0 * dcor * count * count * pieces["scale"],
                          live)
    ratio = _safe_divide(pieces["covariance"], pieces["variance_z"], live)
    g = double_centre(factor * (pieces["a"] - ratio * pieces["big_b"]))
    g = _safe_divide(g, 2.0 * pieces["b"], pieces["keep"])
    spread = ops.sum(g, axis=1) + ops.sum(g, axis=0)
    dz = (2.0 * z_rows * ops.expand_dims(spread, 1)
          - 2.0 * ops.matmul(g + ops.transpose(g), z_rows))
    dz = dz - ops.mean(dz, axis=0, keepdims=True)
    gradients, start = [], 0
    for leaf in keras.tree.flatten(z):
        shape = tuple(leaf.shape[1:])
        size = math.prod(shape)
        part = dz[:, start:start + size]
        gradients.append(ops.cast(ops.reshape(part, (-1, *shape)), leaf.dtype))
        start += size
    return gradients
