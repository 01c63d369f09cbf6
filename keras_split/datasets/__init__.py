"""Health data for examples and notebooks: shipped chest X-rays, MedMNIST, TFDS, records.

- `load_pneumoniamnist_balanced()` works offline: the package ships a
  class-balanced subset of PneumoniaMNIST (see `keras_split/datasets/data/NOTICE.md`
  for its licence, attribution and why results on it must say "balanced
  PneumoniaMNIST subset").
- `load_medmnist(name, size)` downloads an official MedMNIST file (12 sets, 28,
  64, 128 or 224 pixels) once into a cache folder, checked against MedMNIST's
  MD5; `read_medmnist_npz(path)` reads any file in that layout (your own data too).
- `load_tfds(name)`: the TensorFlow Datasets route ("colorectal_histology",
  "malaria").
- `load_health_images(name)`: the official data when it can be had, otherwise
  the shipped X-rays, saying so (what the notebooks use).
- `load_breast_cancer_vertical()`: three hospitals holding different features
  of the same patients (needs scikit-learn); `synthetic_records(y)`: made-up
  records for a second modality.

Downloads fail with a `DownloadError` (a `ConnectionError`) that says how to
get the file by hand; `KERAS_SPLIT_OFFLINE=1` turns every download off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from keras_split.datasets.download import (
    OFFLINE_VARIABLE,
    ChecksumError,
    DownloadError,
    md5_of,
    offline,
)
from keras_split.datasets.medmnist import (
    MEDMNIST,
    MEDMNIST_URL,
    SIZES,
    MedMNISTInfo,
    Splits,
    as_tf_datasets,
    load_medmnist,
    medmnist_info,
    read_medmnist_npz,
)
from keras_split.datasets.tabular import (
    BREAST_CANCER_GROUPS,
    load_breast_cancer_vertical,
    synthetic_records,
)
from keras_split.datasets.tfds import TFDS_HEALTH, load_tfds, tfds_labels

BALANCED_PNEUMONIA_MD5 = "3062d8c693378b506564f35a50301b11"
SHIPPED = "balanced PneumoniaMNIST subset"


def load_pneumoniamnist_balanced() -> Splits:
    """The shipped balanced PneumoniaMNIST subset (offline).

    2,428 / 270 / 468 chest X-rays (train / val / test), 28x28x1 uint8, label
    0 = normal, 1 = pneumonia, half of each class in every split. The
    training split is sorted by class: shuffle before holding part of it
    out (or use the validation split, as the notebooks do).

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


@dataclass(frozen=True)
class HealthImages:
    """Images with where they came from; unpacks as the three (x, y) splits.

    Attributes:
        splits: ((x_train, y_train), (x_val, y_val), (x_test, y_test)).
        source: what the data are, as results on them must be described
            ("PneumoniaMNIST 28x28 (official)", "balanced PneumoniaMNIST subset").
        labels: the class names, by label value.
        official: False when the shipped subset stands in for the set asked for.
    """

    splits: Splits
    source: str
    labels: tuple[str, ...]
    official: bool

    def __iter__(self):
        return iter(self.splits)

    def __len__(self) -> int:
        return len(self.splits)

    def __getitem__(self, index):
        return self.splits[index]


def load_health_images(name: str = "pneumoniamnist", size: int = 28, *, root=None,
                       data_dir=None, fallback: bool = True,
                       print_fn: Callable[[str], None] | None = print) -> HealthImages:
    """The official data set when it can be had; otherwise the shipped chest X-rays.

    What the notebooks call: on Colab or a laptop with internet, `name` is
    downloaded (MedMNIST by name and size, or a TFDS set resized to `size`);
    offline, or with `KERAS_SPLIT_OFFLINE=1`, the shipped balanced
    PneumoniaMNIST subset stands in, and `print_fn` says so. Check
    `.official` (or `.source`) before quoting a result.

    Args:
        name: a MedMNIST name ("BloodMNIST"), a TFDS health set
            ("colorectal_histology", "malaria"), or "shipped" for the shipped subset.
        size: MedMNIST's size (28, 64, 128, 224), or the side TFDS images are resized to.
        root: MedMNIST's cache folder; data_dir: TFDS's data folder.
        fallback: use the shipped subset when the download fails (otherwise raise).
        print_fn: where the note about the fallback goes (None: nowhere).

    Returns:
        A `HealthImages`: `(x, y), (x_val, y_val), (x_test, y_test) = result`.
    """
    key = str(name).lower()
    try:
        if key == "shipped":
            pass
        elif key in MEDMNIST:
            info = MEDMNIST[key]
            return HealthImages(load_medmnist(key, size, root=root),
                                f"{info.title} {size}x{size} (official)", info.labels, True)
        elif key in TFDS_HEALTH:
            return HealthImages(load_tfds(key, image_size=size, data_dir=data_dir),
                                f"{key} (TensorFlow Datasets, {size}x{size})",
                                tfds_labels(key, data_dir), True)
        else:
            raise ValueError(f"Unknown data set {name!r}: give a MedMNIST name "
                             f"({[i.title for i in MEDMNIST.values()]}), a TFDS health set "
                             f"({sorted(TFDS_HEALTH)}) or 'shipped'.")
    except DownloadError as error:
        if not fallback:
            raise
        if print_fn is not None:
            print_fn(f"Could not load {name} ({error.reason}); using the shipped {SHIPPED} "
                     "instead (2,428 / 270 / 468 chest X-rays, 28x28). Results below are "
                     f"on that subset, not on {name}.")
    return HealthImages(load_pneumoniamnist_balanced(), SHIPPED, ("normal", "pneumonia"), False)


__all__ = [
    "BALANCED_PNEUMONIA_MD5",
    "BREAST_CANCER_GROUPS",
    "MEDMNIST",
    "MEDMNIST_URL",
    "OFFLINE_VARIABLE",
    "SHIPPED",
    "SIZES",
    "TFDS_HEALTH",
    "ChecksumError",
    "DownloadError",
    "HealthImages",
    "MedMNISTInfo",
    "Splits",
    "as_tf_datasets",
    "load_breast_cancer_vertical",
    "load_health_images",
    "load_medmnist",
    "load_pneumoniamnist_balanced",
    "load_tfds",
    "md5_of",
    "medmnist_info",
    "offline",
    "read_medmnist_npz",
    "synthetic_records",
    "tfds_labels",
]
