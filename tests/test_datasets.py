"""The shipped chest X-rays and the MedMNIST loader (on files written here)."""

import numpy as np
import pytest

from keras_split import datasets


def _write_medmnist(path, n=(6, 2, 4), channels=None, drop=None):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        shape = (count, 28, 28) + ((channels,) if channels else ())
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (count, 1), dtype=np.uint8)
    if drop:
        del arrays[drop]
    np.savez_compressed(path, **arrays)


def test_shipped_subset_is_the_documented_one():
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        datasets.load_pneumoniamnist_balanced()
    )
    assert x_train.shape == (2428, 28, 28, 1) and x_train.dtype == np.uint8
    assert (len(x_val), len(x_test)) == (270, 468)
    for labels in (y_train, y_val, y_test):
        assert labels.shape == (len(labels),)
        assert np.sum(labels == 1) == np.sum(labels == 0)  # balanced


def test_reads_medmnist_layout(tmp_path):
    path = tmp_path / "fake.npz"
    _write_medmnist(path, channels=3)
    (x, y), (xv, _), (xt, _) = datasets.read_medmnist_npz(path)
    assert x.shape == (6, 28, 28, 3) and y.shape == (6,) and y.dtype == np.int64
    assert (len(xv), len(xt)) == (2, 4)


def test_bad_layout_names_missing_keys(tmp_path):
    path = tmp_path / "broken.npz"
    _write_medmnist(path, drop="val_labels")
    with pytest.raises(ValueError, match=r"not in MedMNIST layout: it lacks \['val_labels'\]"):
        datasets.read_medmnist_npz(path)


def test_load_medmnist_checks_md5_and_name(tmp_path):
    _write_medmnist(tmp_path / "breastmnist.npz")
    with pytest.raises(OSError, match=r"expected 750601b1f35ba3300ea97c75c52ff8f6"):
        datasets.load_medmnist("breastmnist", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"download=False"):
        datasets.load_medmnist("bloodmnist", root=tmp_path, download=False)
    with pytest.raises(ValueError, match=r"Unknown MedMNIST dataset 'mnist'. Available:"):
        datasets.load_medmnist("mnist", root=tmp_path)


def test_load_medmnist_reads_a_cached_file_with_the_right_md5(tmp_path, monkeypatch):
    path = tmp_path / "breastmnist.npz"
    _write_medmnist(path)
    monkeypatch.setitem(
        datasets.MEDMNIST, "breastmnist", (datasets.md5_of(path), 2, 1)
    )
    (x, _), _, _ = datasets.load_medmnist("breastmnist", root=tmp_path, download=False)
    assert x.shape == (6, 28, 28, 1)
