"""fit / evaluate / predict across the cut, against keras.Model.fit on the unsplit model.

Tests taking `compile_split` run twice: with the in-process transport, and over
gRPC on loopback against a `SplitServer` holding the server half.
"""

import csv

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_split
from tests import models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture(params=["in-process", "grpc"])
def compile_split(request):
    """`compile_split(split, **compile_args)`, then train as usual."""
    servers = []

    def compile_(split, optimizer="rmsprop", loss=None, metrics=None, loss_weights=None):
        if request.param == "in-process":
            split.compile(optimizer=optimizer, loss=loss, metrics=metrics,
                          loss_weights=loss_weights)
            return
        server = keras_split.SplitServer(split.server, loss, optimizer, metrics, loss_weights,
                                         tokens={"t": "test"}, insecure=True).start()
        servers.append(server)
        transport = keras_split.GrpcTransport(f"127.0.0.1:{server.port}", "t", insecure=True)
        transport.open(split.cut_specs)
        split.compile(optimizer=optimizer, transport=transport)

    compile_.kind = request.param
    yield compile_
    for server in servers:
        server.stop()


def _assert_payload(compile_split, got, payload):
    """Exact payload bytes in process; over gRPC, payload plus message framing."""
    if compile_split.kind == "in-process":
        assert got == payload
    else:
        assert payload < got < payload * 1.2


def _twins(build):
    """Two copies of one model with identical initial weights."""
    model, cut = build()
    twin, _ = build()
    twin.set_weights(model.get_weights())
    return model, twin, cut


def _data(model, n, rng):
    return models.inputs_for(model, n, rng), rng.integers(0, 3, size=n)


@pytest.mark.parametrize(
    "optimizer",
    [lambda: keras.optimizers.SGD(learning_rate=0.1), lambda: keras.optimizers.Adam(1e-2)],
    ids=["sgd", "adam"],
)
@pytest.mark.parametrize("name", ["small_cnn", "resnet_block", "multi_input", "sequential"])
def test_twenty_steps_match_unsplit_fit(name, optimizer, rng, compile_split):
    model, reference, cut = _twins(models.ALL[name])
    x, y = _data(model, 20 * 8, rng)  # 20 steps of batch 8, in order

    reference.compile(optimizer=optimizer(), loss=LOSS)
    want = reference.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    split = keras_split.split(model, cut)
    compile_split(split, optimizer=optimizer(), loss=LOSS)
    got = split.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    # The reported loss includes both sides' regularization, as Keras's does.
    assert got.history["loss"][0] == pytest.approx(want.history["loss"][0], rel=1e-5)

    merged = split.merge()
    for got, want in zip(merged.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_dataset_and_numpy_inputs_agree(rng, compile_split):
    model, twin, cut = _twins(models.small_cnn)
    x, y = _data(model, 64, rng)
    a = keras_split.split(model, cut)
    b = keras_split.split(twin, cut)
    for split in (a, b):
        compile_split(split, optimizer="adam", loss=LOSS, metrics=["accuracy"])
    ha = a.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    hb = b.fit(dataset, epochs=2, verbose=0)
    np.testing.assert_allclose(ha.history["loss"], hb.history["loss"], rtol=1e-6)
    assert ha.history["bytes_up"] == hb.history["bytes_up"]


def test_history_counts_bytes_exactly(rng):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    split.compile(optimizer="sgd", loss=LOSS, metrics=["accuracy"])
    x, y = _data(model, 50, rng)
    y = y.astype("int32")
    history = split.fit(x, y, batch_size=16, epochs=2, validation_data=(x[:10], y[:10]),
                        verbose=0)
    # Up: 144 bytes of activations (3x3x4 float32) + 4 bytes of int32 label per sample.
    # Down: the gradient at the cut, 144 bytes per sample. Validation sends
    # activations and labels up and only scalar metrics down.
    assert history.history["bytes_up"] == [50 * 148, 50 * 148]
    assert history.history["bytes_down"] == [50 * 144, 50 * 144]
    assert history.history["val_bytes_up"] == [10 * 148, 10 * 148]
    assert history.history["val_bytes_down"] == [0, 0]
    assert set(history.history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert split.transport.bytes.up == 2 * (50 + 10) * 148


def test_evaluate_and_predict_match_the_merged_model(rng, compile_split):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    compile_split(split, optimizer="adam", loss=LOSS, metrics=["accuracy"])
    x, y = _data(model, 40, rng)
    split.fit(x, y, epochs=1, verbose=0)
    merged = split.merge()
    merged.compile(loss=LOSS, metrics=["accuracy"])
    want_loss, want_acc = merged.evaluate(x, y, batch_size=8, verbose=0)
    got_loss, got_acc = split.evaluate(x, y, batch_size=8, verbose=0)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    assert got_acc == pytest.approx(want_acc)
    np.testing.assert_allclose(split.predict(x, batch_size=7, verbose=0),
                               merged.predict(x, verbose=0), atol=1e-5)
    logs = split.evaluate(x, y, verbose=0, return_dict=True)
    _assert_payload(compile_split, logs["bytes_up"], 40 * (144 + 8))


def test_multi_output_losses_and_metrics(rng, compile_split):
    model, cut = models.multi_output()
    split = keras_split.split(model, cut)
    compile_split(
        split,
        optimizer="adam",
        loss={"cls": LOSS, "reg": "mse"},
        loss_weights={"cls": 1.0, "reg": 0.5},
        metrics={"cls": ["accuracy"]},
    )
    x = rng.normal(size=(32, 10)).astype("float32")
    y = {"cls": rng.integers(0, 3, 32), "reg": rng.normal(size=(32, 1)).astype("float32")}
    history = split.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert "cls_accuracy" in history.history
    out = split.predict(x, verbose=0)
    assert set(out) == {"cls", "reg"} and out["cls"].shape == (32, 3)


def test_standard_callbacks(tmp_path, rng, compile_split):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    compile_split(split, optimizer="adam", loss=LOSS, metrics=["accuracy"])
    x, y = _data(model, 48, rng)
    csv_path = tmp_path / "log.csv"
    callbacks = [
        keras.callbacks.CSVLogger(str(csv_path)),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb")),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt.keras")),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "w.weights.h5"), save_weights_only=True),
        keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=10.0,
                                      restore_best_weights=True),
    ]
    history = split.fit(x, y, epochs=5, validation_data=(x, y), callbacks=callbacks, verbose=0)
    # min_delta=10 means no epoch counts as an improvement: stop after epoch 2.
    assert len(history.history["loss"]) == 2
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {"bytes_up", "val_loss"} <= set(rows[0])
    assert (tmp_path / "ckpt_client.keras").exists() and (tmp_path / "ckpt_server.keras").exists()
    assert list((tmp_path / "tb").rglob("*.tfevents*"))
    loaded = keras_split.SplitModel.load(str(tmp_path / "ckpt.keras"))
    assert [s.shape for s in loaded.cut_specs] == [s.shape for s in split.cut_specs]
    split.load_weights(str(tmp_path / "w.weights.h5"))


def test_terminate_on_nan_stops_training(rng):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    split.compile(optimizer=keras.optimizers.SGD(learning_rate=1e30), loss=LOSS)
    x, y = _data(model, 64, rng)
    x = x * 1e6
    history = split.fit(x, y, batch_size=8, epochs=3, verbose=0,
                        callbacks=[keras.callbacks.TerminateOnNaN()])
    assert len(history.history["loss"]) == 1


def test_progress_bar_is_printed(rng, capsys, compile_split):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    compile_split(split, optimizer="adam", loss=LOSS)
    x, y = _data(model, 32, rng)
    split.fit(x, y, batch_size=16, epochs=1, verbose=2)
    out = capsys.readouterr().out
    assert "2/2" in out and "loss:" in out
    # The byte counters as integers, under the bar (Keras would print 1234.0000).
    up, down = split.transport.bytes.snapshot()
    assert f"bytes up {up:,}, down {down:,}" in out and "bytes_up:" not in out


def test_errors_before_and_during_fit(rng):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    x, y = _data(model, 10, rng)
    with pytest.raises(RuntimeError, match=r"call `compile\(\)` before `fit\(\)`"):
        split.fit(x, y)
    with pytest.raises(ValueError, match=r"`compile` needs a `loss`"):
        split.compile(optimizer="adam")
    split.compile(optimizer="adam", loss=LOSS)
    with pytest.raises(ValueError, match=r"same number of samples, received 10 vs. 9"):
        split.fit(x, y[:9], verbose=0)
    with pytest.raises(ValueError, match=r"`fit` needs labels"):
        split.fit(x, verbose=0)
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer"):
        split.fit(x, y, batch_size=0, verbose=0)
    sgd = keras.optimizers.SGD()
    with pytest.raises(ValueError, match=r"each side needs its own optimizer state"):
        split.compile(loss=LOSS, client_optimizer=sgd, server_optimizer=sgd)
    with pytest.raises(ValueError, match=r"must end in '.keras', received 'model.h5'"):
        split.save("model.h5")


def test_independent_optimizers_per_side():
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    split.compile(optimizer="adam", loss=LOSS, server_optimizer=keras.optimizers.SGD(0.5))
    assert isinstance(split.client_role.optimizer, keras.optimizers.Adam)
    assert isinstance(split.server_role.optimizer, keras.optimizers.SGD)
    assert split.optimizer is split.client_role.optimizer


def test_validation_split_holds_out_the_last_samples_like_keras(rng, compile_split):
    model, twin, cut = _twins(models.small_cnn)
    x, y = _data(model, 50, rng)
    split = keras_split.split(model, cut)
    compile_split(split, optimizer="sgd", loss=LOSS)
    got = split.fit(x, y, batch_size=8, validation_split=0.2, shuffle=False, verbose=0)
    twin.compile(optimizer="sgd", loss=LOSS)
    want = twin.fit(x, y, batch_size=8, validation_split=0.2, shuffle=False, verbose=0)
    assert got.history["val_loss"][0] == pytest.approx(want.history["val_loss"][0], rel=1e-5)
    _assert_payload(compile_split, got.history["bytes_up"][0], 40 * 152)
    with pytest.raises(ValueError, match=r"`validation_split` must be in \(0, 1\)"):
        split.fit(x, y, validation_split=1.5, verbose=0)
