"""Tiny models for tests, one per structure the partitioner must handle."""

import keras
from keras import layers

L2 = keras.regularizers.L2(1e-2)


def small_cnn():
    inp = keras.Input((8, 8, 1), name="image")
    x = layers.Conv2D(4, 3, activation="relu", kernel_regularizer=L2, name="conv1")(inp)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(8, activation="relu", kernel_regularizer=L2, name="dense")(x)
    out = layers.Dense(3, name="logits")(x)
    return keras.Model(inp, out, name="small_cnn"), "pool1"


def resnet_block():
    inp = keras.Input((8, 8, 2), name="image")
    a = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inp)
    b = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv2")(a)
    c = layers.Add(name="add")([a, b])
    x = layers.GlobalAveragePooling2D(name="gap")(c)
    out = layers.Dense(3, name="logits")(x)
    # The skip connection conv1 -> add crosses a cut at conv2.
    return keras.Model(inp, out, name="resnet_block"), ["conv2", "conv1"]


def multi_input():
    img = keras.Input((6, 6, 1), name="image")
    tab = keras.Input((5,), name="tabular")
    a = layers.Conv2D(3, 3, activation="tanh", name="img_conv")(img)
    a = layers.Flatten(name="img_flat")(a)
    b = layers.Dense(4, activation="tanh", name="tab_dense")(tab)
    x = layers.Concatenate(name="concat")([a, b])
    out = layers.Dense(3, name="logits")(layers.Dense(6, activation="relu", name="head")(x))
    return keras.Model([img, tab], out, name="multi_input"), ["img_flat", "tab_dense"]


def bn_dropout():
    inp = keras.Input((10,), name="features")
    x = layers.Dense(8, name="dense1")(inp)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.Activation("relu", name="relu1")(x)
    x = layers.Dropout(0.3, seed=7, name="drop1")(x)
    x = layers.Dense(8, name="dense2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.Dropout(0.3, seed=8, name="drop2")(x)
    out = layers.Dense(3, name="logits")(x)
    return keras.Model(inp, out, name="bn_dropout"), "drop1"


def sequential():
    model = keras.Sequential(
        [
            keras.Input((12,)),
            layers.Dense(8, activation="relu", name="d1"),
            layers.Dense(6, activation="relu", name="d2"),
            layers.Dense(3, name="d3"),
        ],
        name="seq",
    )
    return model, "d1"


def multi_output():
    inp = keras.Input((10,), name="features")
    x = layers.Dense(8, activation="relu", name="body")(inp)
    h = layers.Dense(8, activation="relu", name="trunk")(x)
    cls = layers.Dense(3, name="cls")(h)
    reg = layers.Dense(1, name="reg")(h)
    return keras.Model(inp, {"cls": cls, "reg": reg}, name="multi_output"), "body"


def nested():
    inner_in = keras.Input((6,))
    inner = keras.Model(inner_in, layers.Dense(5, activation="relu")(inner_in), name="encoder")
    inp = keras.Input((6,), name="features")
    x = inner(inp)
    x = layers.Dense(4, activation="relu", name="dense")(x)
    out = layers.Dense(2, name="logits")(x)
    return keras.Model(inp, out, name="nested"), "encoder"


ALL = {
    "small_cnn": small_cnn,
    "resnet_block": resnet_block,
    "multi_input": multi_input,
    "bn_dropout": bn_dropout,
    "sequential": sequential,
}


def inputs_for(model, n, rng):
    shapes = [tuple(t.shape[1:]) for t in model.inputs]
    arrays = [rng.normal(size=(n,) + s).astype("float32") for s in shapes]
    return arrays if len(arrays) > 1 else arrays[0]
