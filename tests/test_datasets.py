"""The data loaders, offline: the shipped X-rays, MedMNIST downloads from a local
HTTP server (files written here in the official layout), TFDS with its own mock
data, and the breast-cancer partitions."""

import dataclasses
import http.server
import threading

import numpy as np
import pytest

from keras_split import datasets
from keras_split.datasets import download, medmnist

pytestmark = pytest.mark.filterwarnings(
    # TensorFlow Datasets' mock data builds its tf.data pipeline with arguments
    # TensorFlow has deprecated; not ours.
    "ignore::DeprecationWarning:tensorflow_datasets.*",
)


def _write_medmnist(path, n=(6, 2, 4), channels=None, drop=None, size=28, classes=2):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        shape = (count, size, size) + ((channels,) if channels else ())
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, classes, (count, 1), dtype=np.uint8)
    if drop:
        del arrays[drop]
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture(autouse=True)
def _online(monkeypatch, tmp_path):
    """Downloads allowed (only ever to 127.0.0.1 here), and no user cache touched."""
    monkeypatch.delenv(datasets.OFFLINE_VARIABLE, raising=False)
    monkeypatch.setenv("KERAS_SPLIT_CACHE", str(tmp_path / "default-cache"))


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves `files` by name (query strings ignored); `truncate` names files sent
    with their full Content-Length but only half their bytes (an interrupted download)."""

    files: dict = {}
    truncate: set = set()
    requests: list = []

    def do_GET(self):  # noqa: N802 - the http.server name
        name = self.path.split("?")[0].lstrip("/")
        self.requests.append(name)
        if name not in self.files:
            self.send_error(404)
            return
        body = self.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if name in self.truncate else body)
        self.wfile.flush()
        if name in self.truncate:
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path):
    """A MedMNIST mirror on 127.0.0.1: {"url": template, "files": {...}, ...}."""
    handler = type("Handler", (_Files,), {"files": {}, "truncate": set(), "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{server.server_port}/{{file}}?download=1",
               "handler": handler}
    finally:
        server.shutdown()
        server.server_close()


def _publish(monkeypatch, mirror, tmp_path, name="bloodmnist", size=28, corrupt=False,
             **options):
    """Write an official-layout file, serve it, and make its MD5 the published one."""
    info = datasets.medmnist_info(name)
    source = _write_medmnist(tmp_path / "source.npz", size=size, **options)
    body = source.read_bytes()
    published = datasets.md5_of(source)
    mirror["handler"].files[info.file(size)] = body + b"x" if corrupt else body
    monkeypatch.setitem(datasets.MEDMNIST, info.name,
                        dataclasses.replace(info, md5={**info.md5, size: published}))
    return info, published


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
    path = _write_medmnist(tmp_path / "fake.npz", channels=3)
    (x, y), (xv, _), (xt, _) = datasets.read_medmnist_npz(path)
    assert x.shape == (6, 28, 28, 3) and y.shape == (6,) and y.dtype == np.int64
    assert (len(xv), len(xt)) == (2, 4)


def test_bad_layout_names_missing_keys(tmp_path):
    path = _write_medmnist(tmp_path / "broken.npz", drop="val_labels")
    with pytest.raises(ValueError, match=r"not in MedMNIST layout: it lacks \['val_labels'\]"):
        datasets.read_medmnist_npz(path)


def test_the_table_has_every_2d_set_at_every_size():
    assert len(datasets.MEDMNIST) == 12
    for info in datasets.MEDMNIST.values():
        assert set(info.md5) == {28, 64, 128, 224}
        assert all(len(md5) == 32 and int(md5, 16) >= 0 for md5 in info.md5.values())
        assert info.channels in (1, 3) and info.classes == len(info.labels)
    assert datasets.medmnist_info("PneumoniaMNIST").md5[28] == "28209eda62fecd6e6a2d98b1501bb15f"
    assert datasets.medmnist_info("bloodmnist").file(64) == "bloodmnist_64.npz"
    assert datasets.medmnist_info("BloodMNIST").file(28) == "bloodmnist.npz"
    assert datasets.medmnist_info("chestmnist").task == "multi-label, binary-class"


def test_names_and_sizes_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown MedMNIST dataset 'mnist'. Available: "
                                         r"\['PathMNIST', 'ChestMNIST'"):
        datasets.load_medmnist("mnist", root=tmp_path)
    with pytest.raises(ValueError, match=r"sizes \[28, 64, 128, 224\]; received size=32"):
        datasets.load_medmnist("BloodMNIST", size=32, root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"bloodmnist_64.npz does not exist and "
                                                r"download=False"):
        datasets.load_medmnist("bloodmnist", size=64, root=tmp_path, download=False)


def test_downloads_by_name_and_size_once_then_reads_the_cache(tmp_path, monkeypatch, mirror):
    _publish(monkeypatch, mirror, tmp_path, "BloodMNIST", size=64, channels=3, classes=8)
    cache = tmp_path / "cache"
    (x, y), (xv, yv), (xt, _) = datasets.load_medmnist("BloodMNIST", size=64, root=cache,
                                                       url=mirror["url"])
    assert x.shape == (6, 64, 64, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert (len(xv), len(xt)) == (2, 4)
    assert mirror["handler"].requests == ["bloodmnist_64.npz"]
    assert sorted(p.name for p in cache.iterdir()) == ["bloodmnist_64.npz"]
    again = datasets.load_medmnist("bloodmnist", size=64, root=cache, url=mirror["url"])
    np.testing.assert_array_equal(again[0][0], x)
    assert len(mirror["handler"].requests) == 1  # from the cache
    # A default cache folder from the environment.
    monkeypatch.setenv("KERAS_SPLIT_CACHE", str(tmp_path / "env-cache"))
    datasets.load_medmnist("bloodmnist", size=64, url=mirror["url"])
    assert (tmp_path / "env-cache" / "medmnist" / "bloodmnist_64.npz").exists()


def test_as_tf_datasets(tmp_path, monkeypatch, mirror):
    _publish(monkeypatch, mirror, tmp_path, "pneumoniamnist")
    train, val, test = datasets.load_medmnist("pneumoniamnist", root=tmp_path / "c",
                                              url=mirror["url"], as_dataset=True)
    image, label = next(iter(train))
    assert tuple(image.shape) == (28, 28, 1) and label.dtype.name == "int64"
    assert [int(d.cardinality()) for d in (train, val, test)] == [6, 2, 4]


def test_a_wrong_md5_is_refused_and_nothing_is_cached(tmp_path, monkeypatch, mirror):
    _, published = _publish(monkeypatch, mirror, tmp_path, "dermamnist", corrupt=True,
                            channels=3)
    cache = tmp_path / "cache"
    with pytest.raises(datasets.ChecksumError, match=rf"expected {published}: it is not the "
                                                     r"published file.*Nothing was kept"):
        datasets.load_medmnist("DermaMNIST", root=cache, url=mirror["url"])
    assert list(cache.iterdir()) == []  # no file, no .part
    # A cached file that is not the official one: refused at load, named.
    _write_medmnist(cache / "dermamnist.npz", channels=3, n=(1, 1, 1))
    with pytest.raises(OSError, match=rf"dermamnist.npz has MD5 [0-9a-f]{{32}}, expected "
                                      rf"{published}.*Delete it"):
        datasets.load_medmnist("dermamnist", root=cache, url=mirror["url"])


def test_an_interrupted_download_leaves_nothing(tmp_path, monkeypatch, mirror):
    info, _ = _publish(monkeypatch, mirror, tmp_path, "pathmnist", channels=3)
    mirror["handler"].truncate.add(info.file(28))
    cache = tmp_path / "cache"
    with pytest.raises(datasets.DownloadError, match=r"PathMNIST \(28x28\) from http://127"
                                                     r".*interrupted") as caught:
        datasets.load_medmnist("PathMNIST", root=cache, url=mirror["url"])
    assert caught.value.reason == "the download was interrupted"
    assert list(cache.iterdir()) == []
    mirror["handler"].truncate.clear()  # the next try succeeds
    (x, _), _, _ = datasets.load_medmnist("PathMNIST", root=cache, url=mirror["url"])
    assert x.shape == (6, 28, 28, 3)


def test_offline_errors_say_what_to_do(tmp_path, monkeypatch, mirror):
    _publish(monkeypatch, mirror, tmp_path, "breastmnist")
    cache = tmp_path / "cache"
    # No server at all (a closed port on this machine): a ConnectionError that says
    # where to put the file by hand.
    closed = mirror["url"].replace(mirror["url"].split("/")[2], "127.0.0.1:9")
    with pytest.raises(ConnectionError, match=r"Cannot download BreastMNIST \(28x28\) from "
                                              r"http://127.0.0.1:9/breastmnist.npz.*no "
                                              r"internet connection\?.*put it at .*breastmnist"
                                              r".npz \(MD5 [0-9a-f]{32}\)"):
        datasets.load_medmnist("breastmnist", root=cache, url=closed)
    with pytest.raises(datasets.DownloadError, match=r"HTTP 404"):
        datasets.load_medmnist("breastmnist", size=128, root=cache, url=mirror["url"])
    # KERAS_SPLIT_OFFLINE: not even a connection is attempted.
    monkeypatch.setenv(datasets.OFFLINE_VARIABLE, "1")
    before = len(mirror["handler"].requests)
    with pytest.raises(datasets.DownloadError, match=r"KERAS_SPLIT_OFFLINE is set, so no "
                                                     r"download is attempted"):
        datasets.load_medmnist("breastmnist", root=cache, url=mirror["url"])
    assert len(mirror["handler"].requests) == before
    assert list(cache.iterdir()) == []


def test_health_images_fall_back_to_the_shipped_xrays_and_say_so(tmp_path, monkeypatch, mirror):
    notes = []
    monkeypatch.setenv(datasets.OFFLINE_VARIABLE, "1")
    data = datasets.load_health_images("BloodMNIST", size=64, root=tmp_path,
                                       print_fn=notes.append)
    assert not data.official and data.source == "balanced PneumoniaMNIST subset"
    assert notes == ["Could not load BloodMNIST (KERAS_SPLIT_OFFLINE is set); using the shipped "
                     "balanced PneumoniaMNIST subset instead (2,428 / 270 / 468 chest X-rays, "
                     "28x28). Results below are on that subset, not on BloodMNIST."]
    (x, y), (xv, _), (xt, _) = data
    assert x.shape == (2428, 28, 28, 1) and data.labels == ("normal", "pneumonia")
    with pytest.raises(datasets.DownloadError):
        datasets.load_health_images("BloodMNIST", root=tmp_path, fallback=False)
    with pytest.raises(ValueError, match=r"Unknown data set 'cifar10'"):
        datasets.load_health_images("cifar10")
    # Online (here: the local mirror's file in the cache), the official set, named.
    monkeypatch.delenv(datasets.OFFLINE_VARIABLE)
    _publish(monkeypatch, mirror, tmp_path, "bloodmnist", channels=3, classes=8)
    datasets.load_medmnist("bloodmnist", root=tmp_path / "c", url=mirror["url"])
    data = datasets.load_health_images("bloodmnist", root=tmp_path / "c", print_fn=notes.append)
    assert data.official and data.source == "BloodMNIST 28x28 (official)"
    assert data.labels[0] == "basophil" and data[0][0].shape == (6, 28, 28, 3)
    assert len(notes) == 1


def test_tfds_route_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        (x, y), (xv, yv), (xt, yt) = datasets.load_tfds("malaria", image_size=32,
                                                        data_dir=tmp_path)
        assert x.shape == (12, 32, 32, 3) and x.dtype == np.uint8
        assert y.dtype == np.int64 and set(np.unique(y)) <= {0, 1}
        assert len(xv) == len(xt) == 12  # the mock gives every slice its examples
        (x, _), _, _ = datasets.load_tfds("colorectal_histology", data_dir=tmp_path)
        assert x.shape[1:] == (150, 150, 3)
        train, _, _ = datasets.load_tfds("colorectal_histology", image_size=28,
                                         data_dir=tmp_path, as_dataset=True)
        image, _ = next(iter(train))
        assert tuple(image.shape) == (28, 28, 3)
        data = datasets.load_health_images("malaria", size=32, data_dir=tmp_path)
        assert data.official and data.labels == ("parasitized", "uninfected")
    assert datasets.tfds_labels("colorectal_histology")[0] == "tumor"
    with pytest.raises(ValueError, match=r"three non-negative shares"):
        datasets.load_tfds("malaria", fractions=(0.5, 0.5))


def test_tfds_offline_is_a_download_error(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.OFFLINE_VARIABLE, "1")
    with pytest.raises(datasets.DownloadError, match=r"'colorectal_histology': downloads are "
                                                     r"off"):
        datasets.load_tfds("colorectal_histology", data_dir=tmp_path)
    notes = []
    data = datasets.load_health_images("colorectal_histology", data_dir=tmp_path,
                                       print_fn=notes.append)
    assert not data.official and "downloads are off" in notes[0]


def test_breast_cancer_in_three_hospitals():
    (parts, y), (test_parts, y_test) = datasets.load_breast_cancer_vertical()
    assert [p.shape for p in parts] == [(455, 10)] * 3
    assert [p.shape for p in test_parts] == [(114, 10)] * 3
    assert len(y) == 455 and len(y_test) == 114 and set(np.unique(y)) == {0, 1}
    # Standardized with the training patients' statistics.
    np.testing.assert_allclose(np.concatenate(parts, 1).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(parts, 1).std(0), 1, atol=1e-4)
    assert datasets.BREAST_CANCER_GROUPS == ("mean", "error", "worst")
    with pytest.raises(ValueError, match=r"`test_fraction` must be between 0 and 1"):
        datasets.load_breast_cancer_vertical(test_fraction=1.5)


def test_synthetic_records_depend_on_the_label():
    y = np.array([0, 1] * 500)
    records = datasets.synthetic_records(y, seed=0)
    assert records.shape == (1000, 8) and records.dtype == np.float32
    gap = records[y == 1].mean(0) - records[y == 0].mean(0)
    np.testing.assert_allclose(gap[:4], 1.5, atol=0.2)  # informative: 1.5 * label + N(0, 1)
    np.testing.assert_allclose(gap[4:], 0.0, atol=0.2)  # noise


def test_fetch_keeps_an_existing_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"local")
    assert download.fetch("http://127.0.0.1:9/x", path, "0" * 32) == path
    assert medmnist.default_cache().name == "medmnist"
