"""MedMNIST: twelve 2-D health-imaging datasets at 28, 64, 128 and 224 pixels.

The official files are MedMNIST's own (MedMNIST v2 at 28x28, MedMNIST+ at the
larger sizes; one Zenodo record holds them all), CC BY 4.0. They are `.npz`
files with the keys `train_images`, `train_labels`, `val_images`,
`val_labels`, `test_images`, `test_labels`; images are uint8, (N, H, W) for
grayscale and (N, H, W, 3) for colour; labels are (N, 1) integers, or (N, K)
0/1 for the multi-label ChestMNIST. `read_medmnist_npz` reads any file in that
layout, so it is also the format for your own data.

Reference:
    Jiancheng Yang, Rui Shi, Donglai Wei, Zequan Liu, Lin Zhao, Bilian Ke,
    Hanspeter Pfister, Bingbing Ni. "MedMNIST v2 - A large-scale lightweight
    benchmark for 2D and 3D biomedical image classification". Scientific Data
    2023. https://medmnist.com
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keras_split.datasets.download import ChecksumError, fetch, md5_of

SIZES = (28, 64, 128, 224)
# One record holds every size; its 28x28 files equal MedMNIST v2's, except the
# three Organ{A,C,S}MNIST files, which were re-released (hence their MD5s here).
MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{file}?download=1"

Splits = tuple[tuple[np.ndarray, np.ndarray], ...]


@dataclass(frozen=True)
class MedMNISTInfo:
    """One MedMNIST dataset, as MedMNIST's own table describes it.

    Attributes:
        name: the lower-case name ("pneumoniamnist"), also its file name.
        title: the published name ("PneumoniaMNIST").
        task: "binary-class", "multi-class", "multi-label, binary-class" or
            "ordinal-regression".
        labels: the class names, by label value.
        channels: 1 (grayscale) or 3 (colour).
        samples: (train, val, test) image counts.
        md5: the MD5 of the file of each size (28, 64, 128, 224).
    """

    name: str
    title: str
    task: str
    labels: tuple[str, ...]
    channels: int
    samples: tuple[int, int, int]
    md5: dict[int, str]

    @property
    def classes(self) -> int:
        return len(self.labels)

    def file(self, size: int = 28) -> str:
        """The official file name at `size` ("bloodmnist_64.npz"; 28x28 has no suffix)."""
        return f"{self.name}.npz" if size == 28 else f"{self.name}_{size}.npz"


_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
           "liver", "lung-left", "lung-right", "pancreas", "spleen")


def _info(title, task, labels, channels, samples, md5s) -> MedMNISTInfo:
    return MedMNISTInfo(name=title.lower(), title=title, task=task, labels=tuple(labels),
                        channels=channels, samples=samples,
                        md5=dict(zip(SIZES, md5s, strict=True)))


# MD5s, class names and sample counts from MedMNIST's INFO table (version 3.0).
MEDMNIST: dict[str, MedMNISTInfo] = {info.name: info for info in [
    _info("PathMNIST", "multi-class",
          ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
           "normal colon mucosa", "cancer-associated stroma",
           "colorectal adenocarcinoma epithelium"], 3, (89996, 10004, 7180),
          ["a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
           "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec"]),
    _info("ChestMNIST", "multi-label, binary-class",
          ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
           "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
           "pleural", "hernia"], 1, (78468, 11219, 22433),
          ["02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
           "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa"]),
    _info("DermaMNIST", "multi-class",
          ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
           "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
           "vascular lesions"], 3, (7007, 1003, 2005),
          ["0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
           "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d"]),
    _info("OCTMNIST", "multi-class",
          ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"], 1,
          (97477, 10832, 1000),
          ["c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
           "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3"]),
    _info("PneumoniaMNIST", "binary-class", ["normal", "pneumonia"], 1, (4708, 524, 624),
          ["28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
           "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1"]),
    _info("RetinaMNIST", "ordinal-regression", ["0", "1", "2", "3", "4"], 3, (1080, 120, 400),
          ["bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
           "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348"]),
    _info("BreastMNIST", "binary-class", ["malignant", "normal, benign"], 1, (546, 78, 156),
          ["750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
           "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b"]),
    _info("BloodMNIST", "multi-class",
          ["basophil", "eosinophil", "erythroblast",
           "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
           "monocyte", "neutrophil", "platelet"], 3, (11959, 1712, 3421),
          ["7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
           "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601"]),
    _info("TissueMNIST", "multi-class",
          ["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
           "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
           "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"], 1,
          (165466, 23640, 47280),
          ["ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
           "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c"]),
    _info("OrganAMNIST", "multi-class", _ORGANS, 1, (34561, 6491, 17778),
          ["68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
           "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170"]),
    _info("OrganCMNIST", "multi-class", _ORGANS, 1, (12975, 2392, 8216),
          ["b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
           "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1"]),
    _info("OrganSMNIST", "multi-class", _ORGANS, 1, (13932, 2452, 8827),
          ["9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
           "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1"]),
]}


def default_cache() -> Path:
    """`$KERAS_SPLIT_CACHE/medmnist`, or `~/.keras_split/medmnist`."""
    base = os.environ.get("KERAS_SPLIT_CACHE")
    return (Path(base) if base else Path.home() / ".keras_split") / "medmnist"


def medmnist_info(name: str) -> MedMNISTInfo:
    """The table entry of a MedMNIST dataset; `name` in any case ("BloodMNIST")."""
    key = str(name).lower()
    if key not in MEDMNIST:
        raise ValueError(f"Unknown MedMNIST dataset {name!r}. Available: "
                         f"{[info.title for info in MEDMNIST.values()]}.")
    return MEDMNIST[key]


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


def as_tf_datasets(splits: Splits) -> tuple:
    """Each (x, y) split as an unbatched `tf.data.Dataset` of (image, label) pairs."""
    import tensorflow as tf

    return tuple(tf.data.Dataset.from_tensor_slices((x, y)) for x, y in splits)


def load_medmnist(name: str, size: int = 28, root=None, download: bool = True, *,
                  as_dataset: bool = False, url: str | None = None):
    """Load an official MedMNIST dataset at one of its sizes, downloading it once.

    The file is kept in `root` under its official name and checked against
    MedMNIST's MD5 at every load; a download that fails or does not match
    leaves nothing in the cache. Offline (or with `KERAS_SPLIT_OFFLINE=1`) a
    `DownloadError` says where to put the file by hand; `except
    ConnectionError` catches it.

    Args:
        name: a dataset of `MEDMNIST`, in any case: "PneumoniaMNIST",
            "bloodmnist", "DermaMNIST", "PathMNIST", "ChestMNIST" (multi-label).
        size: 28, 64, 128 or 224 pixels a side (the larger sizes are MedMNIST+;
            the 224-pixel files are up to several GB).
        root: the cache folder; by default `$KERAS_SPLIT_CACHE/medmnist` or
            `~/.keras_split/medmnist`.
        download: fetch the file when it is not cached.
        as_dataset: return `tf.data.Dataset`s of (image, label) pairs
            (unbatched) instead of numpy arrays.
        url: a URL template with `{file}` for a mirror (default: MedMNIST's record).

    Returns:
        ((x_train, y_train), (x_val, y_val), (x_test, y_test)): uint8 images
        (N, size, size, channels) and int64 labels (N,), or (N, 14) for ChestMNIST.

    Example:

    ```python
    (x, y), (x_val, y_val), (x_test, y_test) = keras_split.datasets.load_medmnist(
        "BloodMNIST", size=64)
    ```

    Reference:
        Yang et al., "MedMNIST v2", Scientific Data 2023 (CC BY 4.0).
    """
    info = medmnist_info(name)
    if size not in SIZES:
        raise ValueError(f"MedMNIST publishes sizes {list(SIZES)}; received size={size!r}.")
    md5 = info.md5[size]
    root = Path(root) if root is not None else default_cache()
    path = root / info.file(size)
    if not path.exists():
        if not download:
            raise FileNotFoundError(f"{path} does not exist and download=False. Pass "
                                    "download=True, or put the official file there.")
        fetch((url or MEDMNIST_URL).format(file=info.file(size)), path, md5,
              what=f"{info.title} ({size}x{size})")
    else:
        actual = md5_of(path)
        if actual != md5:
            raise ChecksumError(
                f"{path} has MD5 {actual}, expected {md5}: it is not the official "
                f"{info.title} file at {size}x{size}. Delete it and call load_medmnist again.")
    splits = read_medmnist_npz(path)
    return as_tf_datasets(splits) if as_dataset else splits
