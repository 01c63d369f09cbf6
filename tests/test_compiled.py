"""keras_split.compiled: a tf.function called through its concrete functions gives
what the tf.function gives, traces once per signature, and falls back where it
cannot key the arguments."""

import keras
import numpy as np
import tensorflow as tf

from keras_split.compiled import Compiled


def _model_step():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(3)])
    optimizer = keras.optimizers.Adam(1e-2)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def step(x, y, weight=None):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True), sample_weight=weight)
        optimizer.apply(tape.gradient(loss, model.trainable_variables),
                        model.trainable_variables)
        return {"loss": loss, "logits": model(x, training=False)}

    return model, step


def test_training_through_concrete_functions_equals_the_tf_function_bit_for_bit(rng):
    batches = [(rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n))
               for n in (16, 16, 16, 5, 16, 5)]  # a last partial batch, twice
    results = []
    for wrap in (lambda f: tf.function(f, reduce_retracing=True),
                 lambda f: Compiled(f, reduce_retracing=True)):
        model, step = _model_step()
        compiled = wrap(step)
        outputs = [compiled(x, y) for x, y in batches]
        if isinstance(compiled, Compiled):  # the tensors went in straight (the fast path)
            assert compiled.signatures == 2
            assert all(positions == [0, 1] for _, positions in compiled._concrete.values())
        results.append(([o["loss"].numpy() for o in outputs],
                        [o["logits"].numpy() for o in outputs],
                        [v.numpy() for v in model.variables]))
    for reference, ours in zip(*results, strict=True):
        for a, b in zip(reference, ours, strict=True):
            np.testing.assert_array_equal(a, b)


def test_one_concrete_function_per_signature_and_defaults_applied(rng):
    traces = []

    def add(x, scale=2.0):
        traces.append(x.shape)
        return x * scale

    compiled = Compiled(add)
    x = np.ones((4, 3), "float32")
    np.testing.assert_array_equal(compiled(x).numpy(), 2 * x)  # the default, as tf.function
    np.testing.assert_array_equal(compiled(x, 3.0).numpy(), 3 * x)
    for _ in range(3):
        compiled(x)
        compiled(tf.constant(x))  # a tensor of the same type: the same trace
    assert compiled.signatures == 3 and len(traces) == 2
    compiled(np.ones((2, 3), "float32"))  # a new shape: traced like tf.function would
    assert compiled.signatures == 4
    np.testing.assert_array_equal(compiled(x, scale=5.0).numpy(), 5 * x)  # keywords: tf.function


def test_structures_key_by_shape_and_dtype_and_unknown_arguments_fall_back():
    compiled = Compiled(lambda batch: {k: tf.reduce_sum(v) for k, v in batch.items()})
    first = {"a": np.ones((2, 2), "float32"), "b": np.ones(3, "int32")}
    assert compiled(first)["a"].numpy() == 4
    assert compiled({"b": np.ones(3, "int32"), "a": np.ones((2, 2), "float32")})["b"] == 3
    assert compiled.signatures == 1
    assert compiled({"a": np.ones((2, 2), "float64"), "b": np.ones(3, "int32")})["a"] == 4
    assert compiled.signatures == 2

    # A ragged tensor is not among the keyed types: the tf.function takes it, uncached.
    ragged = Compiled(lambda r: tf.reduce_sum(r, axis=1))
    values = tf.ragged.constant([[1.0, 2.0], [3.0]])
    np.testing.assert_array_equal(ragged(values).numpy(), [3.0, 3.0])
    assert ragged.signatures == 0


def test_the_cache_starts_again_past_its_bound():
    compiled = Compiled(lambda x: x * 2, max_signatures=3)
    for n in range(1, 8):
        assert compiled(np.ones(n, "float32")).shape == (n,)
        assert compiled.signatures <= 3
