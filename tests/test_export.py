"""Export of client halves for devices: gradient rules against TensorFlow's own
gradients, whole programs against Keras, export-time errors, quantized variants."""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_split
from keras_split.apps.demo import build_demo_cnn
from keras_split.export import (
    UnsupportedLayerError,
    UnsupportedOptimizerError,
    export_client,
    export_inference,
    ops,
)
from keras_split.export.onnx_export import session
from keras_split.export.program import ClientProgram
from keras_split.export.tflite import interpreter
from keras_split_wire import device_names as names


def _gradients(function, inputs, seed):
    inputs = [tf.constant(v) for v in inputs]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        y = function(*inputs)
    g = tf.constant(np.random.default_rng(seed).normal(size=y.shape).astype("float32"))
    return tape.gradient(y, inputs, output_gradients=g)


@pytest.mark.parametrize("runtime", ["tflite", "onnx"])
@pytest.mark.parametrize(("size", "kernel", "strides", "padding", "channels"), [
    (8, 3, (1, 1), "VALID", 2), (8, 3, (1, 1), "SAME", 2), (9, 3, (2, 2), "SAME", 2),
    (9, 2, (2, 1), "VALID", 2), (7, 5, (2, 2), "VALID", 2), (10, 4, (3, 3), "SAME", 2),
    # Eight channels and more: patches gathered by slices (space_to_depth in LiteRT).
    (8, 3, (1, 1), "VALID", 8), (9, 3, (2, 2), "SAME", 8), (10, 3, (2, 2), "VALID", 9),
    (11, 5, (3, 3), "SAME", 8), (6, 1, (1, 1), "VALID", 8), (7, 1, (2, 2), "SAME", 3),
    # One channel (a grayscale image): patches as rows in onnxruntime.
    (8, 3, (1, 1), "VALID", 1), (9, 3, (2, 2), "SAME", 1),
])
def test_conv2d_gradients_match_tensorflow(rng, runtime, size, kernel, strides, padding,
                                           channels):
    x = rng.normal(size=(3, size, size + 1, channels)).astype("float32")
    k = rng.normal(size=(kernel, kernel, channels, 4)).astype("float32")
    with ops.runtime(runtime):  # each runtime's way of writing it, run in TensorFlow
        mine = _gradients(lambda a, b: ops.conv2d(a, b, strides, padding), [x, k], 1)
    theirs = _gradients(lambda a, b: tf.nn.conv2d(a, b, strides, padding), [x, k], 1)
    for a, b in zip(mine, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("runtime", ["tflite", "onnx"])
@pytest.mark.parametrize(("channels", "strides", "padding"), [
    (1, (1, 1), "VALID"), (3, (2, 2), "SAME"), (8, (1, 1), "SAME"), (8, (2, 2), "VALID"),
])
def test_conv2d_with_its_bias_in_the_product_matches_tensorflow(rng, runtime, channels,
                                                                 strides, padding):
    x = rng.normal(size=(3, 9, 10, channels)).astype("float32")
    k = rng.normal(size=(3, 3, channels, 4)).astype("float32")
    b = rng.normal(size=(4,)).astype("float32")
    with ops.runtime(runtime):
        mine = _gradients(lambda a, c, d: ops.conv2d(a, c, strides, padding, bias=d), [x, k, b],
                          12)
    theirs = _gradients(lambda a, c, d: tf.nn.conv2d(a, c, strides, padding) + d, [x, k, b], 12)
    for a, c in zip(mine, theirs, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("runtime", ["tflite", "onnx"])
@pytest.mark.parametrize("pool", [(2, 2), (3, 3), (2, 3)])
def test_max_pool_gradient_goes_to_the_first_maximum_like_tensorflow(rng, runtime, pool):
    # Small integers make many ties inside windows.
    x = rng.integers(0, 3, size=(2, 7, 8, 3)).astype("float32")
    with ops.runtime(runtime):
        mine = _gradients(lambda a: ops.max_pool(a, pool), [x], 2)
    theirs = _gradients(lambda a: tf.nn.max_pool2d(a, pool, pool, "VALID"), [x], 2)
    np.testing.assert_array_equal(mine[0], theirs[0])
    # A ReLU before the pool, moved after it: the same values and gradient,
    # ties of zeros (windows the ReLU zeroed) included.
    x = rng.integers(-2, 2, size=(2, 7, 8, 3)).astype("float32")
    with ops.runtime(runtime):
        mine = _gradients(lambda a: ops.max_pool(a, pool, relu=True), [x], 3)
    theirs = _gradients(lambda a: tf.nn.max_pool2d(tf.nn.relu(a), pool, pool, "VALID"), [x], 3)
    np.testing.assert_array_equal(mine[0], theirs[0])
    with ops.runtime(runtime):
        np.testing.assert_array_equal(ops.max_pool(x, pool, relu=True),
                                      tf.nn.max_pool2d(tf.nn.relu(x), pool, pool, "VALID"))


@pytest.mark.parametrize(("name", "function", "reference"), [
    ("relu", ops.relu, tf.nn.relu), ("sigmoid", ops.sigmoid, tf.math.sigmoid),
    ("tanh", ops.tanh, tf.math.tanh), ("softmax", ops.softmax, tf.nn.softmax),
    ("flatten", ops.flatten,
                                       lambda a: tf.reshape(a, [-1, 60])),
    ("average_pool", lambda a: ops.average_pool(a, (2, 2)),
     lambda a: tf.nn.avg_pool2d(a, 2, 2, "VALID")),
])
def test_elementwise_and_shape_gradients(rng, name, function, reference):
    x = rng.normal(size=(2, 4, 5, 3)).astype("float32")
    x[0, 0, 0, 0] = 0.0  # ReLU's kink: TensorFlow gives it gradient 0
    np.testing.assert_allclose(_gradients(function, [x], 3)[0], _gradients(reference, [x], 3)[0],
                               rtol=1e-5, atol=1e-6)


def test_dense_bias_and_batch_norm_gradients(rng):
    x = rng.normal(size=(6, 5)).astype("float32")
    k = rng.normal(size=(5, 3)).astype("float32")
    b = rng.normal(size=(3,)).astype("float32")
    mine = _gradients(lambda a, c, d: ops.bias_add(ops.matmul(a, c), d), [x, k, b], 4)
    theirs = _gradients(lambda a, c, d: tf.matmul(a, c) + d, [x, k, b], 4)
    for a, c in zip(mine, theirs, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    gamma, beta = rng.normal(size=3).astype("float32"), rng.normal(size=3).astype("float32")
    x4 = rng.normal(size=(4, 3, 3, 3)).astype("float32")

    def reference(a, g, c):
        mean, variance = tf.nn.moments(a, [0, 1, 2])
        return tf.nn.batch_normalization(a, mean, variance, c, g, 1e-3)

    mine = _gradients(lambda a, g, c: ops.batch_norm_train(a, g, c, 1e-3)[0],
                      [x4, gamma, beta], 5)
    for a, c in zip(mine, _gradients(reference, [x4, gamma, beta], 5), strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)


def _bn_client():
    # No bias before BatchNorm: its true gradient is zero, and Adam would turn
    # the rounding noise in it into full-size steps (different noise, different
    # steps, in any two implementations).
    inputs = keras.Input((12, 12, 2))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.AveragePooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(6, activation="tanh")(x)
    return keras.Model(inputs, outputs)


def _two_input_client():
    image = keras.Input((8, 8, 1), name="image")
    table = keras.Input((5,), name="table")
    a = keras.layers.Flatten()(keras.layers.MaxPooling2D()(
        keras.layers.Conv2D(3, 3, activation="relu")(image)))
    b = keras.layers.Dense(4, activation="sigmoid")(table)
    c = keras.layers.Dense(4)(table)
    return keras.Model([image, table], keras.layers.Concatenate()([a, keras.layers.Add()([b, c])]))


def _demo_client():
    return keras_split.split(build_demo_cnn(), "pool2").client


@pytest.mark.parametrize("build", [_demo_client, _bn_client, _two_input_client])
def test_program_matches_keras_forward_and_gradients(rng, build):
    model = build()
    program = ClientProgram(model)
    x = [rng.integers(0, 256, (4, *t.shape[1:])).astype(t.dtype) if "int" in str(t.dtype)
         else rng.normal(size=(4, *t.shape[1:])).astype("float32") for t in model.inputs]
    params = [tf.convert_to_tensor(v.value) for v in program.trainable]
    state = [tf.convert_to_tensor(v.value) for v in program.state]
    for training in (False, True):
        with tf.GradientTape() as tape:
            tape.watch(params)
            (mine,), _ = program.run(params, state, [tf.constant(v) for v in x], training)
        g = rng.normal(size=mine.shape).astype("float32")
        grads = tape.gradient(mine, params, output_gradients=g)
        with tf.GradientTape() as tape:
            theirs = model(x if len(x) > 1 else x[0], training=training)
        want = tape.gradient(theirs, model.trainable_variables, output_gradients=g)
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_unsupported_layers_are_refused_at_export_naming_the_layer(tmp_path):
    inputs = keras.Input((10, 3))
    model = keras.Model(inputs, keras.layers.Conv1D(2, 3, name="wave")(inputs))
    with pytest.raises(UnsupportedLayerError, match=r"Layer 'wave' \(Conv1D\) cannot be "
                                                    r"exported .* no device rule for Conv1D"):
        export_client(model, tmp_path / "c.tflite")

    class Custom(keras.layers.Layer):
        def call(self, x):
            return x * 2

    inputs = keras.Input((4,))
    model = keras.Model(inputs, Custom(name="mine")(keras.layers.Dense(3)(inputs)))
    with pytest.raises(UnsupportedLayerError, match=r"'mine' \(Custom\).*no device rule"):
        export_client(model, tmp_path / "c.onnx")
    inputs = keras.Input((8, 8, 1))
    dilated = keras.Model(inputs, keras.layers.Conv2D(2, 3, dilation_rate=2, name="d")(inputs))
    with pytest.raises(UnsupportedLayerError, match="'d'.*dilated"):
        export_client(dilated, tmp_path / "c.tflite")
    dropout = keras.Model(inputs, keras.layers.Dropout(0.5, name="drop")(
        keras.layers.Flatten()(inputs)))
    with pytest.raises(UnsupportedLayerError, match="'drop'.*random mask"):
        export_client(dropout, tmp_path / "c.tflite")


def test_bad_paths_and_optimizers_are_refused(tmp_path):
    model = _bn_client()
    with pytest.raises(ValueError, match=r"expected a path ending in .tflite or .onnx"):
        export_client(model, tmp_path / "client.h5")
    with pytest.raises(ValueError, match=r"must be written to a path ending in '.onnx'"):
        export_client(model, tmp_path / "client.tflite", format="onnx")
    with pytest.raises(UnsupportedOptimizerError, match="RMSprop is not supported"):
        export_client(model, tmp_path / "client.tflite", optimizer=keras.optimizers.RMSprop())
    with pytest.raises(UnsupportedOptimizerError, match="weight_decay"):
        export_client(model, tmp_path / "client.tflite",
                      optimizer=keras.optimizers.Adam(weight_decay=0.1))
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)
    with pytest.raises(UnsupportedOptimizerError, match="schedule"):
        export_client(model, tmp_path / "client.tflite",
                      optimizer=keras.optimizers.SGD(schedule))
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("quantize", [None, "float16", "int8"])
def test_quantized_inference_variants(tmp_path, quantize):
    model = _demo_client()
    report = export_inference(model, tmp_path / f"client.{quantize}.tflite", quantize=quantize)
    assert report.signatures == ["infer"]
    bound = {None: 1e-5, "float16": 1e-2, "int8": 0.5}[quantize]
    assert report.inference_error < bound
    assert (tmp_path / f"client.{quantize}.tflite").stat().st_size == report.bytes


def test_split_model_exports_its_client_with_its_optimizer(tmp_path):
    split = keras_split.split(build_demo_cnn(), "pool2")
    with pytest.raises(ValueError, match="Pass `optimizer=`"):
        split.export_client(tmp_path / "client.tflite")
    split.compile(optimizer=keras.optimizers.Adam(2e-3), loss="mse")
    report = split.export_client(tmp_path / "client.tflite")
    assert report.train_step_error < 1e-5 and report.signatures[:3] == ["infer", "forward",
                                                                        "train"]


def test_exports_use_the_names_the_device_runtime_reads(tmp_path):
    """Every name the exporter writes comes from `keras_split_wire.device_names`."""
    model = _bn_client()  # with BatchNorm: moving statistics are weights but not trainable
    optimizer = keras.optimizers.Adam(1e-3)
    export_client(model, tmp_path / "client.tflite", optimizer=optimizer)
    runtime = interpreter((tmp_path / "client.tflite").read_bytes())
    signatures = runtime.get_signature_list()
    assert set(signatures) == set(names.TRAIN_SIGNATURES)
    weights = [names.weight(i) for i in range(len(model.get_weights()))]
    slots = [names.slot(i) for i in range(2 * len(model.trainable_weights))]  # Adam: m and v
    x, cut, grad = [names.model_input(0)], [names.cut(0)], [names.cut_gradient(0)]
    expected = {
        names.INFER: (x, cut), names.FORWARD: (x, cut), names.TRAIN: (x + grad, [names.STEP]),
        names.GET_WEIGHTS: ([], weights), names.SET_WEIGHTS: (weights, [names.STEP]),
        names.GET_OPTIMIZER: ([], slots + [names.STEP]),
        names.SET_OPTIMIZER: (slots + [names.STEP], [names.STEP]),
    }
    for key, (inputs, outputs) in expected.items():
        assert sorted(signatures[key]["inputs"]) == sorted(inputs), key
        assert sorted(signatures[key]["outputs"]) == sorted(outputs), key

    export_client(model, tmp_path / "client.onnx", optimizer=optimizer)
    files = names.onnx_files(str(tmp_path / "client"))
    assert sorted(p.name for p in tmp_path.glob("client*") if p.suffix != ".tflite") == \
        sorted(Path(f).name for f in files.values())
    program = ClientProgram(model)
    p = [names.onnx_parameter(0, i) for i in range(len(program.trainable))]
    b = [names.onnx_parameter(1, i) for i in range(len(program.state))]
    o = [names.onnx_slot(i) for i in range(2 * len(program.trainable))]
    state = x + p + b
    train = x + grad + p + b + o + [names.STEP]
    for key, inputs, outputs in [
            (names.INFER, state, cut), (names.FORWARD, state, cut),
            (names.TRAIN, train, [names.new(n) for n in p + b + o + [names.STEP]])]:
        graph = session(files[key])
        assert sorted(i.name for i in graph.get_inputs()) == sorted(inputs), key
        assert sorted(i.name for i in graph.get_outputs()) == sorted(outputs), key
    with np.load(files[names.ONNX_STATE]) as data:
        assert sorted(data.files) == sorted(p + b + o + [names.STEP, names.WEIGHT_ORDER])


@pytest.mark.parametrize(("size", "kernel", "strides", "padding", "multiplier"), [
    (8, 3, (1, 1), "VALID", 1), (8, 3, (1, 1), "SAME", 1), (9, 3, (2, 2), "SAME", 1),
    (9, 3, (2, 2), "VALID", 1), (10, 5, (2, 2), "SAME", 1), (7, 2, (2, 1), "VALID", 2),
    (8, 3, (2, 2), "SAME", 3),
])
@pytest.mark.parametrize("runtime", ["tflite", "onnx"])
def test_depthwise_conv2d_gradients_match_tensorflow(rng, size, kernel, strides, padding,
                                                     multiplier, runtime):
    x = rng.normal(size=(3, size, size + 1, 4)).astype("float32")
    k = rng.normal(size=(kernel, kernel, 4, multiplier)).astype("float32")
    with ops.runtime(runtime):
        mine = _gradients(lambda a, b: ops.depthwise_conv2d(a, b, strides, padding), [x, k], 6)
    theirs = _gradients(lambda a, b: tf.nn.depthwise_conv2d(a, b, (1, *strides, 1), padding),
                        [x, k], 6)
    for a, b in zip(mine, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("pool", "strides", "padding"), [
    ((3, 3), (2, 2), "VALID"), ((3, 3), (2, 2), "SAME"), ((2, 2), (2, 2), "SAME"),
    ((3, 2), (1, 1), "SAME"), ((2, 2), (1, 1), "VALID"),
])
def test_overlapping_and_same_pooling_gradients_match_tensorflow(rng, pool, strides, padding):
    # Small integers make many ties, also across overlapping windows.
    x = rng.integers(0, 3, size=(2, 7, 8, 3)).astype("float32")
    mine = _gradients(lambda a: ops.max_pool(a, pool, strides, padding), [x], 7)
    theirs = _gradients(lambda a: tf.nn.max_pool2d(a, pool, strides, padding), [x], 7)
    # Where windows overlap, a position that is the maximum of several windows
    # sums their gradients in another order than MaxPoolGrad: equal to float32
    # rounding (a gradient sent to the wrong position would be off by ~1).
    np.testing.assert_allclose(mine[0], theirs[0], rtol=1e-5, atol=1e-6)
    x = rng.normal(size=(2, 7, 8, 3)).astype("float32")
    mine = _gradients(lambda a: ops.average_pool(a, pool, strides, padding), [x], 8)
    theirs = _gradients(lambda a: tf.nn.avg_pool2d(a, pool, strides, padding), [x], 8)
    np.testing.assert_allclose(mine[0], theirs[0], rtol=1e-5, atol=1e-6)


def _keras_activation(name):
    return lambda a: keras.activations.get(name)(a)


@pytest.mark.parametrize(("function", "reference"), [
    (ops.relu6, tf.nn.relu6),
    (ops.hard_sigmoid, _keras_activation("hard_sigmoid")),
    (ops.hard_silu, _keras_activation("hard_swish")),
    (ops.silu, _keras_activation("swish")),
    *[(lambda a, o=o: ops.keras_relu(a, **o),
       lambda a, o=o: keras.activations.relu(a, **o))
      for o in [{"max_value": 6.0}, {"max_value": 2.5}, {"negative_slope": 0.1},
                {"threshold": 0.5}, {"negative_slope": 0.2, "max_value": 3.0, "threshold": -1.0},
                {"negative_slope": 0.3, "max_value": 1.5}]],
], ids=["relu6", "hard_sigmoid", "hard_swish", "swish", "relu_max6", "relu_max2.5",
        "leaky", "threshold", "all_three", "slope_and_max"])
def test_activation_gradients_match_tensorflow_at_every_kink(rng, function, reference):
    x = rng.normal(size=(4, 3, 5, 6)).astype("float32") * 4
    # The kinks themselves: TensorFlow's gradient there is what Keras users get.
    x.flat[:9] = [0.0, 6.0, -3.0, 3.0, 2.5, 0.5, -1.0, 1.5, 3.0]
    mine, theirs = _gradients(function, [x], 9)[0], _gradients(reference, [x], 9)[0]
    np.testing.assert_allclose(function(x), reference(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "function", "reference"), [
    ("global_average_pool", lambda a: ops.global_average_pool(a),
     lambda a: tf.reduce_mean(a, axis=[1, 2])),
    ("global_average_pool_keepdims", lambda a: ops.global_average_pool(a, keepdims=True),
     lambda a: tf.reduce_mean(a, axis=[1, 2], keepdims=True)),
    ("zero_pad", lambda a: ops.zero_pad(a, ((0, 1), (2, 1))),
     lambda a: tf.pad(a, [[0, 0], [0, 1], [2, 1], [0, 0]])),
    ("reshape", lambda a: ops.reshape(a, (5, 12)), lambda a: tf.reshape(a, [-1, 5, 12])),
    ("scalar_arithmetic", lambda a: ops.scalar(ops.scalar(a, "add", 3.0), "multiply", 1 / 6),
     lambda a: (a + 3.0) * (1 / 6)),
    ("constant_first", lambda a: ops.scalar(ops.scalar(a, "subtract", 2.0, True), "divide",
                                            1.5, True),
     lambda a: 1.5 / (2.0 - a)),
])
def test_shape_and_arithmetic_gradients_match_tensorflow(rng, name, function, reference):
    x = rng.normal(size=(2, 4, 5, 3)).astype("float32")
    np.testing.assert_allclose(function(x), reference(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_gradients(function, [x], 10)[0], _gradients(reference, [x], 10)[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("shapes", "op", "reference"), [
    ([(2, 4, 5, 3), (2, 1, 1, 3)], ops.multiply, lambda a, b: a * b),
    ([(2, 4, 5, 3), (2, 4, 5, 3), (2, 1, 5, 1)], ops.multiply, lambda a, b, c: a * b * c),
    ([(2, 4, 5, 3), (2, 1, 1, 3)], ops.add, lambda a, b: a + b),
])
def test_broadcasting_multiply_and_add_gradients_match_tensorflow(rng, shapes, op, reference):
    # A squeeze-and-excitation block scales [B, H, W, C] by [B, 1, 1, C].
    x = [rng.normal(size=s).astype("float32") for s in shapes]
    mine = _gradients(lambda *a: op(list(a)), x, 11)
    for a, b in zip(mine, _gradients(reference, x, 11), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
