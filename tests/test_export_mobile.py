"""Mobile architectures on the device: MobileNetV2 and MobileNetV3Small client
halves export to LiteRT (builtin ops) and ONNX, and five device steps give the
TensorFlow client's weights; `exportable` answers for a whole network quickly.

Two things every comparison of a deep ReLU network between two float32
implementations meets, and how these tests handle them:

- A kink. A pre-activation within rounding of 0 (or of 6, for ReLU6) can fall
  on different sides in TensorFlow and in the runtime, which round the
  convolutions differently (about 1e-6 here); the gradient then differs by that
  element's share, and later steps amplify it (our program in TensorFlow
  against Keras does the same). MobileNetV2 at 96x96 carries about 300,000
  ReLU6 inputs per image to `block_2_add`, so this happens in roughly one step
  in ten. One image a step; and when a step differs, the test looks at
  TensorFlow's pre-activations: if one lies within 1e-5 of a kink, both sides
  go back to before the step and take another image (a difference with no
  kink near fails). The kink gradients themselves are compared exactly in
  tests/test_export.py.
- A zero gradient. MobileNetV2's projection BatchNorm offsets feed a 1x1
  convolution and another BatchNorm, which removes any per-channel shift: the
  true gradient is exactly zero and both sides compute rounding noise. Adam
  with Keras's epsilon (1e-7) turns noise into full steps of the learning rate,
  different in any two implementations, so MobileNetV2's Adam runs with
  epsilon 1e-3 (MobileNetV3Small's first block has no such offset: default Adam).
"""

import time

import keras
import numpy as np
import pytest

import keras_split
from keras_split.export import UnsupportedLayerError, export_client, exportable
from keras_split.export.program import ClientProgram
from keras_split.roles import ClientRole
from keras_split_edge import load


def _mobilenet_v2():
    return keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None)


def _mobilenet_v3_small():
    return keras.applications.MobileNetV3Small(input_shape=(96, 96, 3), weights=None)


# name: (network, cut, input range, optimizers)
CLIENTS = {
    # Stem, the first bottleneck, and stage 2 (stride-2 block 1 with its
    # ZeroPadding2D, block 2 with the first residual Add).
    "mobilenet_v2": (_mobilenet_v2, "block_2_add", (-1.0, 1.0),
                     {"sgd": lambda: keras.optimizers.SGD(0.1),
                      "adam": lambda: keras.optimizers.Adam(1e-3, epsilon=1e-3)}),
    # Stem with hard swish, and the first bottleneck with its squeeze-and-
    # excitation block (GlobalAveragePooling2D, hard sigmoid as keras.ops
    # arithmetic around ReLU(6), broadcasting Multiply).
    "mobilenet_v3_small": (_mobilenet_v3_small, "expanded_conv_project_bn", (0.0, 255.0),
                           {"sgd": lambda: keras.optimizers.SGD(0.1),
                            "adam": lambda: keras.optimizers.Adam(1e-3)}),
}


def _client(name):
    keras.utils.set_random_seed(0)
    build, cut, _, _ = CLIENTS[name]
    return keras_split.split(build(), cut).client


def _images(name, rng, n):
    low, high = CLIENTS[name][2]
    return rng.uniform(low, high, size=(n, 96, 96, 3)).astype("float32")


def _kinks(model):
    """A function of an input batch: how close any kinked activation's input
    (ReLU, ReLU6, hard swish and sigmoid) comes to its kink, in TensorFlow."""
    layers, distances = [], []
    for layer in model.layers:
        if isinstance(layer, keras.layers.ReLU):
            points = [0.0, layer.threshold] + ([layer.max_value] if layer.max_value else [])
        elif isinstance(layer, keras.layers.Activation):
            name = keras.activations.serialize(layer.activation)
            points = {"relu": [0.0], "relu6": [0.0, 6.0], "hard_silu": [-3.0, 3.0],
                      "hard_sigmoid": [-3.0, 3.0]}.get(name, [])
        else:
            continue
        if points:
            layers.append(layer)
            distances.append(points)
    probe = keras.Model(model.input, [layer.input for layer in layers])

    def nearest(x):
        # Training mode, as the step's forward; BatchNorm's moving statistics,
        # which a training call updates, are put back.
        statistics = [v.numpy() for v in model.non_trainable_variables]
        values = probe(x, training=True)
        for variable, value in zip(model.non_trainable_variables, statistics, strict=True):
            variable.assign(value)
        values = values if isinstance(values, (list, tuple)) else [values]
        return min(float(np.min(np.abs(np.asarray(v)[..., None] - np.asarray(points))))
                   for v, points in zip(values, distances, strict=True))

    return nearest


def _device_steps_match(tmp_path, rng, name, fmt, optimizer):
    model = _client(name)
    make = CLIENTS[name][3][optimizer]
    export_client(model, tmp_path / f"client.{fmt}", optimizer=make())
    device = load(tmp_path / f"client.{fmt}")
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    reference = ClientRole(clone, make())
    reference.build()
    nearest_kink = _kinks(clone)
    steps = skipped = 0
    while steps < 5:  # the same images and server gradients for both
        x = _images(name, rng, 1)
        before = (reference.state(), device.get_weights(), device.get_optimizer())
        context = reference.forward(x)
        # Activations of order 10 after twenty layers: float32 rounding, relative.
        np.testing.assert_allclose(device.forward([x])[0], context.activations[0],
                                   rtol=1e-5, atol=1e-5)
        gradient = (rng.normal(size=context.activations[0].shape) * 1e-3).astype("float32")
        distance = nearest_kink(x)  # before the step: the weights the step starts from
        reference.backward(context, (gradient,))
        device.train([x], [gradient])
        error = max(float(np.abs(a - b).max())
                    for a, b in zip(device.get_weights(), clone.get_weights(), strict=True))
        if error > 1e-5 and distance < 1e-5 and skipped < 5:
            reference.restore(before[0], "before the step")
            device.set_weights(before[1])
            device.set_optimizer(*before[2])
            skipped += 1
            continue
        steps += 1
        for got, want in zip(device.get_weights(), clone.get_weights(), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)  # BatchNorm statistics included


@pytest.mark.parametrize(("name", "fmt", "optimizer"), [
    (network, fmt, optimizer) for network in ("mobilenet_v2", "mobilenet_v3_small")
    for fmt in ("tflite", "onnx") for optimizer in ("sgd", "adam")
])
def test_mobile_client_halves_train_on_the_device_like_tensorflow(tmp_path, rng, name, fmt,
                                                                   optimizer):
    _device_steps_match(tmp_path, rng, name, fmt, optimizer)


@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_mobile_programs_match_keras_forward_and_gradients(rng, name):
    import tensorflow as tf

    model = _client(name)
    program = ClientProgram(model)
    x = _images(name, rng, 2)
    params = [tf.convert_to_tensor(v.value) for v in program.trainable]
    state = [tf.convert_to_tensor(v.value) for v in program.state]
    for training in (False, True):
        with tf.GradientTape() as tape:
            tape.watch(params)
            (mine,), _ = program.run(params, state, [tf.constant(x)], training)
        g = rng.normal(size=mine.shape).astype("float32")
        grads = tape.gradient(mine, params, output_gradients=g)
        with tf.GradientTape() as tape:
            theirs = model(x, training=training)
        want = tape.gradient(theirs, model.trainable_variables, output_gradients=g)
        # The same arithmetic forward (Keras's BatchNorm included): equal values.
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-6)
        # Gradients are float32 sums over 2 x 48 x 48 positions, and those of
        # BatchNorm scales and offsets cancel terms of the size of the largest
        # kernel gradient (about 700 here): rounding is relative to that.
        scale = max(float(np.abs(b).max()) for b in want)
        for a, b in zip(grads, want, strict=True):
            np.testing.assert_allclose(a, b, atol=3e-6 * scale)


def test_exportable_answers_for_every_cut_of_a_network_quickly():
    model = _mobilenet_v2()
    start = time.perf_counter()
    assert exportable(model) == (True, None)  # the whole network, classifier included
    assert time.perf_counter() - start < 1.0  # reads configurations, builds nothing
    # EfficientNet's stochastic depth is a Dropout with a rate in training.
    efficient = keras.applications.EfficientNetB0(input_shape=(64, 64, 3), weights=None)
    assert exportable(efficient) == (False, "block2b_drop")
    assert exportable(efficient, dropout="inference") == (True, None)
    with pytest.raises(UnsupportedLayerError, match=r"'block2b_drop' \(Dropout\).*random "
                                                    r"mask.*dropout='inference'"):
        ClientProgram(efficient)


def test_exportable_names_the_first_layer_that_blocks_the_export():
    inputs = keras.Input((10, 3))
    x = keras.layers.Rescaling(0.5, name="ok")(inputs)
    x = keras.layers.Conv1D(2, 3, name="wave")(x)
    model = keras.Model(inputs, keras.layers.Conv1D(2, 3, name="later")(x))
    assert exportable(model) == (False, "wave")
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.Conv2D(4, 3, dilation_rate=2, name="dilated")(x)
    assert exportable(keras.Model(inputs, x)) == (False, "dilated")
    x = keras.layers.Conv2D(4, 3, kernel_regularizer="l2", name="decayed")(inputs)
    assert exportable(keras.Model(inputs, x)) == (False, "decayed")
    x = keras.ops.sin(keras.layers.Conv2D(4, 3, name="conv")(inputs))
    model = keras.Model(inputs, x)
    ok, layer = exportable(model)
    assert not ok and layer.startswith("sin")
    with pytest.raises(UnsupportedLayerError, match=r"Operation 'sin\w*' \(keras.ops Sin\) "
                                                    r"cannot be exported.*no device rule"):
        ClientProgram(model)


def _separable_client():
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.SeparableConv2D(8, 3, strides=2, padding="same", depth_multiplier=2,
                                     activation="relu6", name="separable")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="valid", activation="hard_swish")(x)
    x = keras.layers.AveragePooling2D(3, strides=1, padding="same")(x)
    x = keras.layers.MaxPooling2D(3, strides=2)(x)
    x = keras.layers.Dropout(0.5)(x)
    squeeze = keras.layers.GlobalAveragePooling2D()(x)
    squeeze = keras.layers.Reshape((1, 1, 8))(keras.layers.Dense(8, activation="hard_sigmoid")(
        squeeze))
    x = keras.layers.Multiply()([x, squeeze])
    x = keras.layers.ReLU(max_value=4.0, negative_slope=0.1)(x)
    return keras.Model(inputs, keras.layers.Flatten()(x))


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_separable_pooling_and_inference_dropout_train_on_the_device(tmp_path, rng, fmt):
    model = _separable_client()
    with pytest.raises(UnsupportedLayerError, match="random mask"):
        export_client(model, tmp_path / f"client.{fmt}")
    report = export_client(model, tmp_path / f"client.{fmt}", dropout="inference",
                           optimizer=keras.optimizers.Adam(1e-2))
    assert report.train_step_error < 1e-5
    device = load(tmp_path / f"client.{fmt}")
    # The reference: TensorFlow's client with Dropout off, as on the device.
    clone = keras.models.clone_model(
        model, clone_function=lambda layer: keras.layers.Dropout(0.0, name=layer.name)
        if isinstance(layer, keras.layers.Dropout) else layer.__class__.from_config(
            layer.get_config()))
    clone.set_weights(model.get_weights())
    reference = ClientRole(clone, keras.optimizers.Adam(1e-2))
    reference.build()
    for _ in range(5):
        x = rng.normal(size=(4, 12, 12, 3)).astype("float32")
        context = reference.forward(x)
        np.testing.assert_allclose(device.forward([x])[0], context.activations[0], atol=1e-5)
        gradient = (rng.normal(size=context.activations[0].shape) * 1e-2).astype("float32")
        reference.backward(context, (gradient,))
        device.train([x], [gradient])
    for got, want in zip(device.get_weights(), clone.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_split_passes_export_options_through(tmp_path):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Dropout(0.2, name="drop")(x)
    x = keras.layers.Flatten(name="flat")(x)
    outputs = keras.layers.Dense(2, name="logits")(x)
    split = keras_split.split(keras.Model(inputs, outputs), "flat")
    split.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="dropout"):
        split.export_client(tmp_path / "refused.onnx")
    report = split.export_client(tmp_path / "client.onnx", dropout="inference")
    assert (tmp_path / "client.onnx").exists() and report is not None
