"""Records beside the images: real breast-cancer features in three groups, and
clearly synthetic records for wiring a second modality."""

from __future__ import annotations

import numpy as np

from keras_split_wire.optional import require

# Wisconsin Diagnostic Breast Cancer: 30 features, in three groups of ten
# measured on the same nuclei (the mean, the standard error, the worst value).
BREAST_CANCER_GROUPS = ("mean", "error", "worst")


def load_breast_cancer_vertical(test_fraction: float = 0.2, seed: int = 0):
    """Wisconsin breast cancer, vertically partitioned: three hospitals, ten features each.

    569 patients (212 malignant, 357 benign) from scikit-learn's copy of the
    Wisconsin Diagnostic Breast Cancer data. Hospital `mean` holds the ten
    mean features, `error` the ten standard errors, `worst` the ten worst
    values: the same patients (rows aligned by patient), different columns.
    Features are standardized with the training patients' mean and standard
    deviation. Labels: 0 = malignant, 1 = benign (scikit-learn's coding).

    Args:
        test_fraction: the share of patients held out for testing.
        seed: the shuffle of the patients before the split.

    Returns:
        ((x_train, y_train), (x_test, y_test)), where each x is a list of
        three float32 arrays (patients, 10), one per hospital, in
        `BREAST_CANCER_GROUPS` order.

    Example:

    ```python
    (parts, y), (test_parts, y_test) = keras_split.datasets.load_breast_cancer_vertical()
    vertical.fit(parts, y, epochs=20)
    ```

    Reference:
        W. N. Street, W. H. Wolberg, O. L. Mangasarian, "Nuclear feature
        extraction for breast tumor diagnosis", 1993.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"`test_fraction` must be between 0 and 1, received {test_fraction!r}.")
    sklearn_datasets = require("sklearn.datasets", "The breast cancer data",
                               "keras-split[examples]", package="scikit-learn")
    data = sklearn_datasets.load_breast_cancer()
    order = np.random.default_rng(seed).permutation(len(data.data))
    cut = len(order) - int(round(test_fraction * len(order)))
    train, test = order[:cut], order[cut:]
    mean, std = data.data[train].mean(0), data.data[train].std(0)
    x = ((data.data - mean) / std).astype("float32")
    y = data.target.astype("int64")
    groups = [slice(10 * i, 10 * (i + 1)) for i in range(len(BREAST_CANCER_GROUPS))]
    return (([x[train, g] for g in groups], y[train]),
            ([x[test, g] for g in groups], y[test]))


def synthetic_records(labels, informative: int = 4, noise: int = 4, strength: float = 1.5,
                      seed: int = 0) -> np.ndarray:
    """SYNTHETIC tabular records for a second modality: not clinical data.

    No public tabular data comes with the MedMNIST images, so to show a
    second party holding records of the same patients, this makes some up:
    `informative` columns are `strength * label + N(0, 1)` (a fever-like
    reading that depends on the label), and `noise` columns are pure N(0, 1).
    A result with them shows the plumbing of two modalities, never a finding.

    Args:
        labels: integer labels (N,) of the patients the records belong to.
        informative, noise: how many columns of each kind.
        strength: how far the informative columns move per unit of label.
        seed: the random draw.

    Returns:
        float32 array (N, informative + noise).
    """
    labels = np.asarray(labels).reshape(len(labels), -1)[:, :1].astype("float32")
    rng = np.random.default_rng(seed)
    signal = labels * strength + rng.normal(size=(len(labels), informative))
    return np.concatenate([signal, rng.normal(size=(len(labels), noise))],
                          axis=1).astype("float32")
