"""Health-imaging data for examples: the shipped chest X-ray subset and MedMNIST.

`load_pneumoniamnist_balanced()` works offline: the package ships a
class-balanced subset of PneumoniaMNIST (see `keras_split/datasets/data/NOTICE.md` for
its licence, attribution and why results on it must say "balanced
PneumoniaMNIST subset"). `load_medmnist(name)` downloads an official MedMNIST
v2 file (28x28) once, checks its MD5, and reads it; use it on Colab or a
laptop with internet.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from importlib import resources
from pathlib import Path

import numpy as np

BALANCED_PNEUMONIA_MD5 = "3062d8c693378b506564f35a50301b11"

# Official MedMNIST v2 (28x28) files: name -> (MD5, number of classes, channels).
# The MD5s are MedMNIST's own (its INFO table); the files are CC BY 4.0.
MEDMNIST = {
    "pathmnist": ("a8b06965200029087d5bd730944a56c1", 9, 3),
    "chestmnist": ("02c8a6516a18b556561a56cbdd36c4a8", 14, 1),  # multi-label
    "dermamnist": ("0744692d530f8e62ec473284d019b0c7", 7, 3),
    "octmnist": ("c68d92d5b585d8d81f7112f81e2d0842", 4, 1),
    "pneumoniamnist": ("28209eda62fecd6e6a2d98b1501bb15f", 2, 1),
    "retinamnist": ("bd4c0672f1bba3e3a89f0e4e876791e4", 5, 3),
    "breastmnist": ("750601b1f35ba3300ea97c75c52ff8f6", 2, 1),
    "bloodmnist": ("7053d0359d879ad8a5505303e11de1dc", 8, 3),
    "tissuemnist": ("ebe78ee8b05294063de985d821c1c34b", 8, 1),
    "organamnist": ("866b832ed4eeba67bfb9edee1d5544e6", 11, 1),
    "organcmnist": ("0afa5834fb105f7705a7d93372119a21", 11, 1),
    "organsmnist": ("e5c39f1af030238290b9557d9503af9d", 11, 1),
}
MEDMNIST_URL = "https://zenodo.org/record/6496656/files/{name}.npz?download=1"

Splits = tuple[tuple[np.ndarray, np.ndarray], ...]


def md5_of(path) -> str:
    digest = hashlib.md5()  # noqa: S324 - a checksum against the publisher's, not security
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_medmnist_npz(path) -> Splits:
    """Read a MedMNIST-layout `.npz`: ((x_train, y_train), (x_val, y_val), (x_test, y_test)).

    Images come back as uint8 with a channel axis (N, H, W, C); labels as
    int64 of shape (N,) for single-label tasks, (N, K) for multi-label ones.
    """
    # WARNING: never set allow_pickle to True; a .npz can carry pickled code.
    with np.load(path, allow_pickle=False) as data:
        missing = [
            f"{split}_{kind}"
            for split in ("train", "val", "test")
            for kind in ("images", "labels")
            if f"{split}_{kind}" not in data
        ]
        if missing:
            raise ValueError(
                f"{os.fspath(path)!r} is not in MedMNIST layout: it lacks {missing}. Expected "
                "the keys train_images, train_labels, val_images, val_labels, test_images, "
                "test_labels."
            )
        splits = []
        for split in ("train", "val", "test"):
            images = data[f"{split}_images"]
            labels = data[f"{split}_labels"].astype("int64")
            if images.ndim == 3:
                images = images[..., None]
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if len(images) != len(labels):
                raise ValueError(
                    f"{split}: {len(images)} images but {len(labels)} labels in {path!r}."
                )
            splits.append((images, labels))
    return tuple(splits)


def load_pneumoniamnist_balanced() -> Splits:
    """The shipped balanced PneumoniaMNIST subset (offline).

    2,428 / 270 / 468 chest X-rays (train / val / test), 28x28x1 uint8, label
    0 = normal, 1 = pneumonia, half of each class in every split.

    Returns:
        ((x_train, y_train), (x_val, y_val), (x_test, y_test)).
    """
    resource = resources.files("keras_split.datasets") / "data" / "pneumoniamnist_balanced.npz"
    with resources.as_file(resource) as path:
        if md5_of(path) != BALANCED_PNEUMONIA_MD5:
            raise OSError(
                f"The shipped data file {os.fspath(path)!r} is corrupted (MD5 mismatch). "
                "Reinstall keras-split."
            )
        return read_medmnist_npz(path)


def load_medmnist(name: str, root=None, download: bool = True) -> Splits:
    """Load an official MedMNIST v2 28x28 dataset, downloading it once.

    Args:
        name: one of `MEDMNIST`, e.g. "pneumoniamnist", "bloodmnist".
        root: cache folder; default `~/.keras_split/medmnist`.
        download: fetch the file when it is not cached.

    Returns:
        ((x_train, y_train), (x_val, y_val), (x_test, y_test)).

    Reference:
        Yang et al., "MedMNIST v2", Scientific Data 2023 (CC BY 4.0).
    """
    if name not in MEDMNIST:
        raise ValueError(f"Unknown MedMNIST dataset {name!r}. Available: {sorted(MEDMNIST)}.")
    md5 = MEDMNIST[name][0]
    root = Path(root or Path.home() / ".keras_split" / "medmnist")
    path = root / f"{name}.npz"
    if not path.exists():
        if not download:
            raise FileNotFoundError(f"{path} does not exist and download=False.")
        root.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        urllib.request.urlretrieve(MEDMNIST_URL.format(name=name), partial)  # noqa: S310
        partial.replace(path)
    actual = md5_of(path)
    if actual != md5:
        raise OSError(
            f"{path} has MD5 {actual}, expected {md5}: the download is incomplete or not the "
            "official file. Delete it and call load_medmnist again."
        )
    return read_medmnist_npz(path)
