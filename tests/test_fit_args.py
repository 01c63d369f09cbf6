"""fit / evaluate / predict arguments, against keras.Model.fit with the same arguments.

The reference is always Keras itself: the unsplit model (a twin with the same
initial weights) trained by `keras.Model.fit` on the same data with the same
arguments, and for epoch boundaries Keras's own epoch iterator. Shuffling is
off wherever the two are compared, because the two shuffle with different
random generators.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.trainers.epoch_iterator import EpochIterator  # the reference for epochs

import keras_split
from keras_split.batching import class_sample_weight, make_batches
from tests import models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
ROOT = Path(__file__).resolve().parent.parent


def _twins(build=models.small_cnn):
    """The split model and an unsplit twin with the same initial weights."""
    model, cut = build()
    twin, _ = build()
    twin.set_weights(model.get_weights())
    return keras_split.split(model, cut), twin


def _compile(split, twin, optimizer=lambda: keras.optimizers.SGD(0.1), **kwargs):
    split.compile(optimizer=optimizer(), loss=LOSS, **kwargs)
    twin.compile(optimizer=optimizer(), loss=LOSS, **kwargs)


def _data(n, rng, shape=(8, 8, 1), classes=3):
    return rng.normal(size=(n, *shape)).astype("float32"), rng.integers(0, classes, n)


def _assert_same_training(split, twin, got, want, rtol=1e-5):
    assert set(got.history) - {"bytes_up", "bytes_down", "val_bytes_up", "val_bytes_down"} \
        == set(want.history)
    for key, values in want.history.items():
        np.testing.assert_allclose(got.history[key], values, rtol=rtol, err_msg=key)
    for a, b in zip(split.merge().get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _quiet(function, *args, **kwargs):
    """Call, ignoring Keras's "shuffle=True ... ignored" and "ran out of data" warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return function(*args, **kwargs)


# -- class_weight -----------------------------------------------------------------


def test_class_weight_equals_sample_weight_built_by_hand(rng):
    split, twin = _twins()
    other = keras_split.split(twin, "pool1")
    for s in (split, other):
        s.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, metrics=["accuracy"])
    x, y = _data(48, rng)
    class_weight = {0: 0.5, 1: 2.0}  # class 2 has none: weight 1
    by_hand = np.array([{0: 0.5, 1: 2.0}.get(int(c), 1.0) for c in y], "float32")
    got = split.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                    class_weight=class_weight)
    want = other.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                     sample_weight=by_hand)
    assert got.history == want.history
    for a, b in zip(split.get_weights(), other.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("data", ["arrays", "dataset"])
def test_class_weight_matches_unsplit_fit(data, rng):
    split, twin = _twins()
    _compile(split, twin, optimizer=lambda: keras.optimizers.Adam(1e-2), metrics=["accuracy"])
    x, y = _data(40, rng)
    class_weight = {0: 3.0, 1: 0.25, 2: 1.5}
    if data == "arrays":
        args = dict(x=x, y=y, batch_size=8, shuffle=False)
    else:
        args = dict(x=tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    got = split.fit(**args, epochs=2, verbose=0, class_weight=class_weight,
                    validation_data=(x[:16], y[:16]))
    want = _quiet(twin.fit, **args, epochs=2, verbose=0, class_weight=class_weight,
                  validation_data=(x[:16], y[:16]))
    _assert_same_training(split, twin, got, want)


def test_class_sample_weight_follows_keras_rule():
    from keras.src.trainers.data_adapters.data_adapter_utils import (
        class_weight_to_sample_weights,
    )

    weights = {0: 0.5, 1: 4.0}
    for y in (np.array([0, 1, 2, 1]),                      # class indices
              np.array([[0.0], [1.0], [2.0], [0.9]]),       # (n, 1), rounded
              np.eye(3)[[1, 0, 2, 1]]):                     # one-hot: the argmax
        np.testing.assert_array_equal(class_sample_weight(y, weights),
                                      class_weight_to_sample_weights(y, weights))


# -- steps_per_epoch, validation_steps, validation_freq ------------------------------


def _keras_epochs(x, y=None, steps_per_epoch=None, epochs=3, batch_size=None):
    """The first feature of each batch that keras.Model.fit draws, epoch by epoch."""
    iterator = EpochIterator(x=x, y=y, batch_size=batch_size, steps_per_epoch=steps_per_epoch)
    iterator.reset()
    drawn = []
    for _ in range(epochs):
        epoch = []
        with iterator.catch_stop_iteration():
            for _, _, batch in iterator:
                epoch.append(int(np.asarray(batch[0][0] if isinstance(batch[0], tuple)
                                            else batch[0])[0, 0]))
        drawn.append(epoch)
    return drawn


def _ours(x, y=None, steps_per_epoch=None, epochs=3, batch_size=None):
    batches = make_batches(x, y, batch_size=batch_size, steps=steps_per_epoch)
    return [[int(np.asarray(bx)[0, 0]) for _, (bx, _, _) in batches.epoch()]
            for _ in range(epochs)]


@pytest.mark.parametrize(("n", "batch", "steps", "epochs"), [
    (10, 2, 2, 4),     # 5 batches, 2 an epoch: the third epoch runs out after one
    (8, 2, 2, 3),      # 4 batches, 2 an epoch: a new pass every second epoch
    (10, 2, None, 2),  # one pass an epoch
    (6, None, 3, 2),   # no batch size: the steps cover the data once (batch 2)
])
def test_epoch_boundaries_of_arrays_are_keras(n, batch, steps, epochs):
    x = np.arange(n, dtype="float32")[:, None]
    y = np.zeros(n)
    want = _quiet(_keras_epochs, x, y, steps, epochs, batch)
    assert _quiet(_ours, x, y, steps, epochs, batch) == want


@pytest.mark.parametrize(("pipeline", "size"), [
    ("infinite", 7), ("finite", 7), ("finite", 6), ("unknown size", 7), ("unknown size", 6)])
def test_epoch_boundaries_of_datasets_are_keras(pipeline, size):
    dataset = tf.data.Dataset.range(size).map(
        lambda i: (tf.fill((1, 1), tf.cast(i, "float32")), tf.zeros((1,))))
    if pipeline == "infinite":
        dataset = dataset.repeat()
    elif pipeline == "unknown size":
        dataset = dataset.filter(lambda x, y: True)
    want = _quiet(_keras_epochs, dataset, steps_per_epoch=3, epochs=4)
    got = _quiet(_ours, dataset, steps_per_epoch=3, epochs=4)
    if pipeline == "unknown size" and size == 6:
        # Keras gives an empty epoch when a pass of unknown length ends exactly
        # where an epoch ends; we start the next pass at once (README).
        assert want == [[0, 1, 2], [3, 4, 5], [], [0, 1, 2]]
        assert got == [[0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5]]
    else:
        assert got == want


def test_steps_per_epoch_on_an_infinite_dataset_matches_unsplit_fit(rng):
    split, twin = _twins()
    _compile(split, twin, optimizer=lambda: keras.optimizers.Adam(1e-2), metrics=["accuracy"])
    x, y = _data(40, rng)
    # 5 batches a pass, 3 an epoch: epochs start at batches 0, 3 (mid-pass), 1.
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    val = tf.data.Dataset.from_tensor_slices((x[:24], y[:24])).batch(8).repeat()
    args = dict(epochs=3, steps_per_epoch=3, validation_data=val, validation_steps=2,
                verbose=0)
    got = split.fit(train, **args)
    want = _quiet(twin.fit, train, **args)
    _assert_same_training(split, twin, got, want)
    assert got.history["bytes_up"] == [3 * 8 * 152] * 3  # 3 steps of 8 samples, each epoch


def test_steps_per_epoch_on_arrays_matches_unsplit_fit(rng):
    split, twin = _twins()
    _compile(split, twin)
    x, y = _data(40, rng)
    args = dict(batch_size=8, epochs=4, steps_per_epoch=2, shuffle=False, verbose=0)
    with pytest.warns(UserWarning, match="ran out of data"):
        got = split.fit(x, y, **args)  # the third epoch gets the fifth batch only
    want = _quiet(twin.fit, x, y, **args)
    _assert_same_training(split, twin, got, want)


@pytest.mark.parametrize("validation_freq", [2, [1, 3]])
def test_validation_freq_matches_unsplit_fit(validation_freq, rng):
    split, twin = _twins()
    _compile(split, twin)
    x, y = _data(32, rng)
    args = dict(batch_size=8, epochs=3, shuffle=False, verbose=0, validation_split=0.25,
                validation_freq=validation_freq, validation_batch_size=4)
    got = split.fit(x, y, **args)
    want = twin.fit(x, y, **args)
    _assert_same_training(split, twin, got, want)
    assert len(got.history["val_loss"]) == (1 if validation_freq == 2 else 2)


def test_validation_calls_test_callbacks_as_keras_does(rng):
    split, _ = _twins()
    split.compile(optimizer="sgd", loss=LOSS)
    x, y = _data(16, rng)
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            seen.append("begin")

        def on_test_batch_end(self, batch, logs=None):
            seen.append(batch)

        def on_test_end(self, logs=None):
            seen.append(sorted(logs))

    split.fit(x, y, batch_size=8, epochs=1, validation_data=(x, y), callbacks=[Spy()],
              verbose=0)
    assert seen == ["begin", 0, 1, ["bytes_down", "bytes_up", "loss"]]


# -- PyDataset and generators ------------------------------------------------------


class ArrayPyDataset(keras.utils.PyDataset):
    """Batches of 8 from arrays; `num_batches=None` makes it infinite."""

    def __init__(self, x, y, infinite=False, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y, self.infinite = x, y, infinite
        self.epochs = []

    @property
    def num_batches(self):
        return None if self.infinite else len(self.y) // 8

    def __getitem__(self, index):
        index %= len(self.y) // 8
        part = slice(index * 8, (index + 1) * 8)
        x = self.x if not isinstance(self.x, dict) else self.x
        if isinstance(x, dict):
            return {k: v[part] for k, v in x.items()}, self.y[part]
        return x[part], self.y[part]

    def on_epoch_begin(self):
        self.epochs.append("begin")

    def on_epoch_end(self):
        self.epochs.append("end")


@pytest.mark.parametrize("kind", ["finite", "workers", "infinite", "multi-input"])
def test_py_dataset_matches_unsplit_fit(kind, rng):
    build = models.multi_input if kind == "multi-input" else models.small_cnn
    split, twin = _twins(build)
    _compile(split, twin, optimizer=lambda: keras.optimizers.Adam(1e-2))
    if kind == "multi-input":
        x = {"image": rng.normal(size=(32, 6, 6, 1)).astype("float32"),
             "tabular": rng.normal(size=(32, 5)).astype("float32")}
        y = rng.integers(0, 3, 32)
    else:
        x, y = _data(32, rng)
    options = {"workers": 2} if kind == "workers" else {}
    data = ArrayPyDataset(x, y, infinite=kind == "infinite", **options)
    reference = ArrayPyDataset(x, y, infinite=kind == "infinite", **options)
    args = dict(epochs=2, shuffle=False, verbose=0,
                steps_per_epoch=3 if kind == "infinite" else None)
    got = split.fit(data, **args)
    want = _quiet(twin.fit, reference, **args)
    _assert_same_training(split, twin, got, want)
    assert data.epochs == ["begin", "end"] * 2
    np.testing.assert_allclose(split.predict(data, steps=2, verbose=0),
                               _quiet(twin.predict, reference, steps=2, verbose=0), atol=1e-5)


def test_py_dataset_with_class_weight_matches_unsplit_fit(rng):
    split, twin = _twins()
    _compile(split, twin)
    x, y = _data(32, rng)
    args = dict(epochs=1, shuffle=False, verbose=0, class_weight={1: 4.0})
    got = split.fit(ArrayPyDataset(x, y), **args)
    want = twin.fit(ArrayPyDataset(x, y), **args)
    _assert_same_training(split, twin, got, want)


def _generator(x, y, repeat=1):
    for _ in range(repeat):
        for i in range(0, len(y), 8):
            yield x[i : i + 8], y[i : i + 8]


def test_generators_match_unsplit_fit(rng):
    split, twin = _twins()
    _compile(split, twin)
    x, y = _data(40, rng)
    # One epoch over a finite generator, then 2 epochs of 3 steps from one that
    # repeats: the second epoch carries on where the first stopped.
    got = split.fit(_generator(x, y), epochs=1, verbose=0)
    want = _quiet(twin.fit, _generator(x, y), epochs=1, verbose=0)
    _assert_same_training(split, twin, got, want)
    # One validation only: Keras re-reads a validation generator's first two
    # batches at each validation, we read on (README).
    args = dict(epochs=2, steps_per_epoch=3, validation_steps=2, validation_freq=[2],
                verbose=0)
    got = split.fit(_generator(x, y, repeat=2), validation_data=_generator(x, y, repeat=9),
                    **args)
    want = _quiet(twin.fit, _generator(x, y, repeat=2),
                  validation_data=_generator(x, y, repeat=9), **args)
    _assert_same_training(split, twin, got, want)


def test_a_used_up_generator_ends_the_fit_with_kerass_warning(rng):
    split, _ = _twins()
    split.compile(optimizer="sgd", loss=LOSS)
    x, y = _data(16, rng)
    with pytest.warns(UserWarning, match="ran out of data"):
        history = split.fit(_generator(x, y), epochs=3, verbose=0)
    assert len(history.history["loss"]) == 1


def test_evaluate_and_predict_take_steps_like_keras(rng):
    split, twin = _twins()
    _compile(split, twin, metrics=["accuracy"])
    x, y = _data(40, rng)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    got = split.evaluate(dataset, steps=3, verbose=0, return_dict=True)
    want = twin.evaluate(dataset, steps=3, verbose=0, return_dict=True)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["accuracy"] == pytest.approx(want["accuracy"])
    assert got["bytes_up"] == 3 * 8 * 152
    np.testing.assert_allclose(split.predict(dataset, steps=2, verbose=0),
                               _quiet(twin.predict, dataset, steps=2, verbose=0), atol=1e-5)
    got = split.evaluate(_generator(x, y), verbose=0)
    want = _quiet(twin.evaluate, _generator(x, y), verbose=0)
    assert got == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(split.predict(x, steps=2, batch_size=8, verbose=0),
                               twin.predict(x, steps=2, batch_size=8, verbose=0), atol=1e-5)


# -- bad arguments: Keras-style errors, nothing changed ----------------------------------


def _infinite(x, y):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()


BAD = {
    "steps_per_epoch=0": (dict(steps_per_epoch=0), r"`steps_per_epoch=0`; expected None or a "
                                                   r"positive integer"),
    "steps_per_epoch=1.5": (dict(steps_per_epoch=1.5), r"expected None or a positive integer"),
    "validation_steps=-1": (dict(validation_steps=-1), r"`validation_steps=-1`"),
    "validation_freq=0": (dict(validation_freq=0), r"`validation_freq` must be a positive "
                                                   r"integer .* or a list"),
    "validation_freq='2'": (dict(validation_freq="2"), r"received '2'"),
    "class_weight str keys": (dict(class_weight={"0": 1.0}), r"keys must be class indices "
                                                             r".*received '0' \(str\)"),
    "class_weight list": (dict(class_weight=[1.0, 2.0]), r"must be a dict .* received list"),
    "class_weight negative": (dict(class_weight={0: -1.0}), r"`class_weight\[0\]` must be a "
                                                            r"finite number >= 0"),
    "class_weight and sample_weight": (dict(class_weight={0: 2.0}, sample_weight=np.ones(16)),
                                       r"cannot be used together"),
    "initial_epoch=-1": (dict(initial_epoch=-1), r"`initial_epoch` must be an integer >= 0"),
    "verbose=3": (dict(verbose=3), r"`verbose` must be 'auto', 0, 1 or 2; received 3"),
    "infinite validation": (dict(validation_data="infinite"),
                            r"infinite tf.data.Dataset .* no `validation_steps`"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_fit_arguments_are_refused_and_change_nothing(case, rng):
    split, _ = _twins()
    split.compile(optimizer="adam", loss=LOSS)
    x, y = _data(16, rng)
    split.fit(x, y, epochs=1, verbose=0)
    before = [w.copy() for w in split.get_weights()]
    optimizer = [v.numpy().copy() for v in split.optimizer.variables]
    step, sent, history = split._step, split.transport.bytes.up, split.history
    kwargs, message = BAD[case]
    kwargs = dict(kwargs)
    if kwargs.get("validation_data") == "infinite":
        kwargs["validation_data"] = _infinite(x, y)
    with pytest.raises((ValueError, TypeError), match=message):
        split.fit(x, y, batch_size=8, epochs=2, **kwargs)
    assert split._step == step and split.transport.bytes.up == sent
    assert split.history is history
    for a, b in zip(split.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(split.optimizer.variables, optimizer, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)


def test_bad_data_arguments_name_what_to_do(rng):
    split, _ = _twins()
    split.compile(optimizer="adam", loss=LOSS)
    x, y = _data(16, rng)
    with pytest.raises(ValueError, match=r"infinite tf.data.Dataset .* and no "
                                         r"`steps_per_epoch`.*Pass `steps_per_epoch=`"):
        split.fit(_infinite(x, y), verbose=0)
    with pytest.raises(ValueError, match=r"infinite tf.data.Dataset .* Pass `steps=`"):
        split.predict(_infinite(x, y), verbose=0)
    with pytest.raises(ValueError, match=r"infinite PyDataset"):
        split.evaluate(ArrayPyDataset(x, y, infinite=True), verbose=0)
    with pytest.raises(ValueError, match=r"received a PyDataset as `x` and also `y`"):
        split.fit(ArrayPyDataset(x, y), y, verbose=0)
    with pytest.raises(ValueError, match=r"received a Python generator as `x` and also `y`"):
        split.fit(_generator(x, y), y, verbose=0)
    with pytest.raises(ValueError, match=r"`validation_split` is only supported for arrays"):
        split.fit(_generator(x, y), validation_split=0.5, verbose=0)
    weighted = tf.data.Dataset.from_tensor_slices((x, y, np.ones(16))).batch(8)
    with pytest.raises(ValueError, match=r"`class_weight` and a dataset that yields "
                                         r"\(x, y, sample_weight\)"):
        split.fit(weighted, class_weight={0: 2.0}, verbose=0)
    multi, _ = _twins(models.multi_output)
    multi.compile(optimizer="adam", loss={"cls": LOSS, "reg": "mse"})
    xm = rng.normal(size=(8, 10)).astype("float32")
    ym = {"cls": rng.integers(0, 3, 8), "reg": rng.normal(size=(8, 1)).astype("float32")}
    with pytest.raises(ValueError, match=r"only supported for models with a single output"):
        multi.fit(xm, ym, class_weight={0: 2.0}, verbose=0)
    assert multi._step == 0


# -- plot_model ------------------------------------------------------------------------


def test_plot_model_of_a_split_points_at_the_halves():
    split, _ = _twins()
    with pytest.raises(AttributeError, match=r"split.plot_model\(...\)` to draw both halves "
                                             r"and the cut, or pass `split.client`"):
        keras.utils.plot_model(split)
    assert not hasattr(split, "built")


def test_plot_view_holds_both_halves_joined_at_the_cut(rng):
    split, _ = _twins()
    view = split.plot_view()
    assert [layer.name for layer in view.layers[1:]] == [split.client.name, split.server.name]
    x = rng.normal(size=(4, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(view(x), split.merge()(x), atol=1e-6)
    try:
        import pydot  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install pydot"):
            split.plot_model("split.png")
        return
    dot = keras.utils.model_to_dot(view, expand_nested=True, show_layer_names=True)
    assert {c.get_label() for c in dot.get_subgraphs()} == {split.client.name,
                                                            split.server.name}
    labels = {n.get_name(): n.get_label() for g in [dot, *dot.get_subgraphs()]
              for n in g.get_nodes()}
    # The edges between the two boxes: the input into the client, and the cut
    # (the client's pool1 into the server's input named after it).
    edges = [(labels[e.get_source()], labels[e.get_destination()]) for e in dot.get_edges()]
    assert any(">pool1<" in source and ">pool1<" in target and "InputLayer" in target
               for source, target in edges), edges


# -- tf.distribute ----------------------------------------------------------------------


STRATEGY_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    import keras_split
    from tests import models

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = np.zeros((16, 8, 8, 1), "float32"), np.zeros(16, "int64")
    result = {"replicas": strategy.num_replicas_in_sync}

    def attempt(name, call):
        try:
            call()
            result[name] = "ran"
        except Exception as error:
            result[name] = f"{type(error).__name__}: {error}"

    with strategy.scope():
        model, cut = models.small_cnn()
    mirrored = keras_split.split(model, cut)
    attempt("built in scope", lambda: mirrored.compile(optimizer="sgd", loss="mse"))
    result["compiled after refusal"] = mirrored.client_role is not None

    model, cut = models.small_cnn()
    plain = keras_split.split(model, cut)
    with strategy.scope():
        attempt("compiled in scope", lambda: plain.compile(
            optimizer="sgd", loss="sparse_categorical_crossentropy"))
    plain.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with strategy.scope():
        attempt("fit in scope", lambda: plain.fit(x, y, verbose=0))
    attempt("fit outside", lambda: plain.fit(x, y, verbose=0))
    print(json.dumps(result))
""")


def test_a_tf_distribute_strategy_is_refused_with_what_is_supported():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", STRATEGY_SCRIPT], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    supported = "runs each party's step on one device"
    assert result["built in scope"].startswith("ValueError: `SplitModel.compile()` cannot "
                                               "train distributed variables: 'conv1' holds "
                                               "MirroredVariables")
    assert supported in result["built in scope"]
    assert not result["compiled after refusal"]
    assert result["compiled in scope"].startswith(
        "ValueError: `SplitModel.compile()` was called inside the scope of a tf.distribute "
        "MirroredStrategy")
    assert result["fit in scope"].startswith("ValueError: `SplitModel.fit()` was called inside")
    assert result["fit outside"] == "ran"


# -- the network client shares the loop -------------------------------------------------


def test_split_client_takes_the_same_arguments(rng):
    token = "fit-args"
    split, twin = _twins()
    reference = keras_split.split(twin, "pool1")
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    server = keras_split.SplitServer(split.server, LOSS, keras.optimizers.SGD(0.1),
                                     tokens={token: "a"}, insecure=True).start()
    try:
        client = keras_split.SplitClient(split.client, server=f"127.0.0.1:{server.port}",
                                         token=token, insecure=True)
        client.compile(keras.optimizers.SGD(0.1))
        x, y = _data(40, rng)
        args = dict(epochs=2, steps_per_epoch=3, class_weight={0: 2.0}, verbose=0,
                    validation_data=ArrayPyDataset(x, y), validation_freq=[2])
        got = client.fit(_infinite(x, y), **args)
        want = reference.fit(_infinite(x, y), **args)
        for key in ("loss", "val_loss"):
            np.testing.assert_allclose(got.history[key], want.history[key], rtol=1e-5)
        for a, b in zip(split.client.get_weights() + split.server.get_weights(),
                        reference.get_weights(), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_allclose(client.predict(ArrayPyDataset(x, y), steps=1, verbose=0),
                                   reference.predict(ArrayPyDataset(x, y), steps=1, verbose=0),
                                   atol=1e-5)
    finally:
        server.stop()


class _InterruptAt(keras.callbacks.Callback):
    def __init__(self, client, epoch, batch):
        super().__init__()
        self.client, self.at, self.epoch = client, (epoch, batch), None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            self.client.interrupt()


def test_an_interrupted_fit_with_steps_per_epoch_resumes_mid_pass(tmp_path, rng):
    # 5 shuffled batches a pass, 3 an epoch: stopped after the second batch of
    # epoch 2 (the 5th of the first pass), the resumed fit must replay the same
    # order and carry on into the second pass as the uninterrupted fit does.
    token = "fit-args"
    split, twin = _twins()
    reference = keras_split.split(twin, "pool1")
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    x, y = _data(40, rng)
    args = dict(batch_size=8, epochs=3, steps_per_epoch=3, seed=3, verbose=0)
    with pytest.warns(UserWarning, match="ran out of data"):
        reference.fit(x, y, **args)
    server = keras_split.SplitServer(split.server, LOSS, keras.optimizers.SGD(0.1),
                                     tokens={token: "a"}, insecure=True,
                                     checkpoint_dir=tmp_path / "server").start()
    try:
        def client():
            c = keras_split.SplitClient(split.client, server=f"127.0.0.1:{server.port}",
                                        token=token, insecure=True,
                                        checkpoint_dir=tmp_path / "client")
            c.compile(keras.optimizers.SGD(0.1))
            return c

        first = client()
        first.fit(x, y, callbacks=[_InterruptAt(first, 1, 1)], **args)
        assert first.interrupted
        second = client()
        assert second.resume_position == {"epoch": 1, "batch": 2}
        with pytest.warns(UserWarning, match="ran out of data"):
            second.fit(x, y, **args)
        assert int(server.role.optimizer.iterations) == int(reference.server_role.optimizer
                                                            .iterations) == 3 + 2 + 3
    finally:
        server.stop()
    for a, b in zip(split.client.get_weights() + split.server.get_weights(),
                    reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
