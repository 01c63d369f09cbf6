"""Health-imaging sets of TensorFlow Datasets, as numpy arrays in MedMNIST's layout.

`load_tfds("colorectal_histology")` (5,000 H&E tissue patches, 150x150, 8
classes) and `load_tfds("malaria", image_size=64)` (27,558 thin blood smear
cells of varying size, parasitized or not) go through `tfds.load`, which
downloads and prepares a set once into its data folder (`~/tensorflow_datasets`
by default). Any other TFDS image-classification set with (image, label)
supervised keys works the same way.
"""

from __future__ import annotations

import numpy as np

from keras_split.datasets.download import DownloadError, offline
from keras_split_wire.optional import require

# The health sets the notebooks use: name -> (what it is, its classes' count).
TFDS_HEALTH = {
    "colorectal_histology": "colorectal cancer histology, 5,000 H&E patches 150x150, 8 tissue "
                            "classes (Kather et al. 2016)",
    "malaria": "27,558 thin blood smear cell images of varying size, parasitized or uninfected "
               "(NIH, Rajaraman et al. 2018)",
}


def _tfds():
    return require("tensorflow_datasets", "The TensorFlow Datasets route",
                   "tensorflow-datasets")


def _split_names(fractions) -> list[str]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"`fractions` must be three non-negative shares (train, val, test) "
                         f"that add up to 1; received {fractions!r}.")
    edges = np.round(np.cumsum([0, *fractions]) * 100).astype(int)
    return [f"train[{a}%:{b}%]" for a, b in zip(edges[:-1], edges[1:], strict=True)]


def load_tfds(name: str, image_size: int | None = None, *, fractions=(0.8, 0.1, 0.1),
              data_dir=None, download: bool = True, as_dataset: bool = False):
    """Load a TFDS image-classification set, split into train / val / test.

    The health sets here publish a single "train" split; it is cut into
    `fractions` by TFDS's own split slicing (deterministic). Offline, or with
    `KERAS_SPLIT_OFFLINE=1`, only a set already prepared in `data_dir` loads;
    otherwise a `DownloadError` (a `ConnectionError`) says so.

    Args:
        name: a TFDS name, e.g. "colorectal_histology" or "malaria" (`TFDS_HEALTH`).
        image_size: resize every image to this many pixels a side (needed for
            sets of varying image size, such as "malaria"); None keeps them.
        fractions: the (train, val, test) shares of the "train" split.
        data_dir: TFDS's data folder (default: TFDS's own, ~/tensorflow_datasets).
        download: download and prepare the set when it is not there yet.
        as_dataset: return `tf.data.Dataset`s of (image, label) pairs instead
            of numpy arrays (images then stay uint8, resized if asked).

    Returns:
        ((x_train, y_train), (x_val, y_val), (x_test, y_test)): uint8 images
        (N, H, W, C) and int64 labels (N,).

    Example:

    ```python
    (x, y), _, (x_test, y_test) = keras_split.datasets.load_tfds("malaria", image_size=64)
    ```
    """
    tfds = _tfds()
    import tensorflow as tf

    names = _split_names(fractions)
    allowed = download and not offline()
    try:
        parts = tfds.load(name, split=names, as_supervised=True, data_dir=data_dir,
                          download=allowed)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"TensorFlow Datasets has no dataset {name!r}; the health sets here "
                         f"are {sorted(TFDS_HEALTH)}.") from None
    except Exception as error:  # tfds raises many kinds here; all mean "not available"
        why = ("downloads are off (KERAS_SPLIT_OFFLINE is set or download=False)"
               if not allowed else "the download or preparation failed (no internet?)")
        raise DownloadError(f"Cannot load the TensorFlow Datasets set {name!r}: {why}. "
                            f"{type(error).__name__}: {error}", reason=why) from error

    def resize(image, label):
        if image_size is not None:
            image = tf.image.resize(image, (image_size, image_size), antialias=True)
            image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
        return image, tf.cast(label, tf.int64)

    parts = [part.map(resize) for part in parts]
    if as_dataset:
        return tuple(parts)
    splits = []
    for split_name, part in zip(names, parts, strict=True):
        images, labels = [], []
        try:
            for x, y in tfds.as_numpy(part.batch(256)):
                images.append(x)
                labels.append(y)
        except tf.errors.InvalidArgumentError as error:
            raise ValueError(f"The images of {name!r} ({split_name}) differ in size and "
                             "cannot be stacked; pass image_size=... to resize them.") from error
        if not images:
            raise ValueError(f"{name!r} {split_name} is empty; use larger fractions.")
        splits.append((np.concatenate(images), np.concatenate(labels).astype(np.int64)))
    return tuple(splits)


def tfds_labels(name: str, data_dir=None) -> tuple[str, ...]:
    """The class names of a TFDS set (from its builder; nothing is downloaded)."""
    builder = _tfds().builder(name, data_dir=data_dir)
    return tuple(builder.info.features["label"].names)
