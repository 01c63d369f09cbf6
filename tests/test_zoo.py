"""The models users bring: the keras.applications networks, and graphs that hold
Keras operations and tensors passed by keyword (the KerasHub patterns).

For each network, `cut_candidates` reads it, `split()` at every cut it offers
computes the unsplit model's outputs, and one SGD step at a sample of cuts
(first, middle, last, and several tensors across a skip connection) leaves the
weights where one step of the unsplit model leaves them. Cuts bypassed by a
shortcut or a parallel branch, and cuts that would send raw inputs, are refused.

Inputs are small (32x32; InceptionV3's minimum, 75x75), `weights=None`, three
classes. By default (CI) every network but DenseNet121 and the two EfficientNets is
split at every cut, and MobileNetV2, MobileNetV3Small, ResNet50 and VGG16 take the SGD
step; the rest (minutes on two CPU cores) are marked slow: `pytest -m slow tests/test_zoo.py`.
"""

import ast
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers, ops

import keras_split
from keras_split import protocol
from keras_split.flops import call_flops
from keras_split.graph import read_graph, tensor_key
from keras_split.roles import ClientRole, ServerRole
from keras_split.transport import InProcessTransport
from tests.test_step import LOSS, _restore, _snapshot

APPS = keras.applications
# Keras's default for SGD. Untrained networks have first-layer gradients of
# several hundred, which compiled graphs of different shapes (one model, or two
# halves) sum in different orders: about 1e-6 of them apart. At this rate those
# differences stay below 1e-5 in the weights, while the step itself moves them
# by up to several units.
LEARNING_RATE = 0.01


def _inception_branch(model):
    """A layer on one branch of InceptionV3's first mixed block (auto-named)."""
    (mixed0,) = [c for c in read_graph(model).calls if c.name == "mixed0"]
    return mixed0.parents[0].name


# name: (constructor, input size, extra arguments, a layer a skip connection or a
# parallel branch bypasses (None: the network has none))
ZOO = {
    "ResNet50": (APPS.ResNet50, 32, {}, "conv2_block2_2_conv"),
    "ResNet50V2": (APPS.ResNet50V2, 32, {}, "conv2_block2_2_conv"),
    "MobileNetV2": (APPS.MobileNetV2, 32, {"alpha": 0.35}, "block_2_project"),
    "MobileNetV3Small": (APPS.MobileNetV3Small, 32, {}, "expanded_conv_2_project"),
    "EfficientNetB0": (APPS.EfficientNetB0, 32, {}, "block2b_project_conv"),
    "EfficientNetV2B0": (APPS.EfficientNetV2B0, 32, {}, "block2b_project_conv"),
    "DenseNet121": (APPS.DenseNet121, 32, {}, "conv2_block1_1_conv"),
    "VGG16": (APPS.VGG16, 32, {}, None),
    "InceptionV3": (APPS.InceptionV3, 75, {}, _inception_branch),
}
# The SGD step of the others, and every cut of the heaviest, take 20-60 s each here.
DEFAULT = {"MobileNetV2", "MobileNetV3Small", "ResNet50", "VGG16"}
NETWORKS = [name if name in DEFAULT else pytest.param(name, marks=pytest.mark.slow)
            for name in ZOO]
HEAVIEST = {"DenseNet121", "EfficientNetB0", "EfficientNetV2B0"}


def _build(name):
    constructor, size, extra, _ = ZOO[name]
    # Logits out (no softmax), so the loss is the suite's from_logits one.
    return constructor(input_shape=(size, size, 3), weights=None, classes=3,
                       classifier_activation=None, **extra)


def _batch(model, rng, n=4):
    x = rng.normal(size=(n, *model.inputs[0].shape[1:])).astype("float32")
    return x, rng.integers(0, 3, size=n)


def _bypass_cut(name, model):
    """The several-tensor cut that `split()`'s refusal of a bypassed layer suggests."""
    bypassed = ZOO[name][3]
    bypassed = bypassed(model) if callable(bypassed) else bypassed
    with pytest.raises(ValueError, match=r"does not separate the graph") as info:
        keras_split.split(model, bypassed)
    suggested = str(info.value).split("pass cut=")[1].split(" to send")[0]
    return ast.literal_eval(suggested)  # a list of layer names, e.g. ['conv2', 'conv1']


def _assert_same_function(model, split, x):
    expected = np.asarray(model(x, training=False))
    got = np.asarray(split.server(split.client(x, training=False), training=False))
    # Untrained networks in inference mode can put out tiny logits (1e-11 for
    # MobileNetV2 with fresh BatchNorm statistics): compare relative to their size.
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


def _reference_step(model, x, y):
    """One SGD step of the unsplit model; returns every variable after it.

    Compiled, as the split step is: eager and compiled kernels round
    differently (1e-3 on a first-layer gradient of 60, summed over 1,024
    positions), while compiled against compiled agree to about 1e-6."""
    optimizer = keras.optimizers.SGD(learning_rate=LEARNING_RATE)
    optimizer.build(model.trainable_variables)
    x, y = keras.tree.map_structure(tf.constant, (x, y))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
            if model.losses:
                loss += tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)

    step()
    return [v.numpy().copy() for v in model.variables]


def _assert_one_step_like_unsplit(model, cuts, x, y):
    start = _snapshot(model)  # weights, BatchNorm statistics and dropout seed states
    expected = _reference_step(model, x, y)
    moved = max(np.abs(a - b).max() for a, b in zip(expected, start, strict=True))
    assert moved > 1e-3  # the step is large enough for atol=1e-5 to mean something
    trainable = {id(v) for v in model.trainable_variables}
    for cut in cuts:
        _restore(model, start)
        split = keras_split.split(model, cut)
        client = ClientRole(split.client, keras.optimizers.SGD(learning_rate=LEARNING_RATE))
        client.build()
        server = ServerRole(split.server, keras.optimizers.SGD(learning_rate=LEARNING_RATE),
                            loss=LOSS)
        # The message path: with both halves in one compiled call (the fused
        # default), oneDNN may fuse ops across the cut and round differently
        # (EfficientNet: 4e-5 relative on the cut gradient; bit for bit the
        # message path with TF_ENABLE_ONEDNN_OPTS=0). tests/test_fused.py
        # holds the fused step to the message path.
        protocol.train_step(client, InProcessTransport(server, fused=False), 1, x, y)
        for v, want in zip(model.variables, expected, strict=True):
            np.testing.assert_allclose(v.numpy(), want, atol=1e-5 if id(v) in trainable else 1e-6,
                                       err_msg=f"cut={cut!r}: {v.path}")
    _restore(model, start)


# -- the zoo ---------------------------------------------------------------------


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVIEST
                                  else n for n in ZOO])
def test_splits_at_every_candidate_cut(name, rng):
    model = _build(name)
    table = keras_split.cut_candidates(model, collapse=False)
    collapsed = keras_split.cut_candidates(model)
    assert len(table) > 5 and len(collapsed) < len(table) == collapsed.cuts
    assert [cut for row in collapsed for cut in row.layers] == [row.layer for row in table]
    assert all(row.refused is None and row.client_flops <= row.total_flops for row in table)
    assert table.total_flops > 0
    x, _ = _batch(model, rng, n=2)
    for row in table:
        _assert_same_function(model, keras_split.split(model, row.layer), x)


@pytest.mark.parametrize("name", NETWORKS)
def test_one_sgd_step_equals_the_unsplit_step(name, rng):
    model = _build(name)
    table = keras_split.cut_candidates(model, collapse=False)
    cuts = [table[0].layer, table[len(table) // 2].layer, table[-1].layer]
    if ZOO[name][3] is not None:
        cuts.append(_bypass_cut(name, model))
        _assert_same_function(model, keras_split.split(model, cuts[-1]), _batch(model, rng)[0])
    x, y = _batch(model, rng)
    _assert_one_step_like_unsplit(model, cuts, x, y)


# -- refusals on real networks ------------------------------------------------------


def test_resnet_cuts_inside_a_block_name_the_bypass():
    model = _build("ResNet50")
    # An identity shortcut: the block's Add reads the block input.
    with pytest.raises(ValueError) as info:
        keras_split.split(model, "conv2_block2_2_conv")
    assert str(info.value) == (
        "Cut at 'conv2_block2_2_conv' does not separate the graph: layer 'conv2_block2_add' "
        "(after the cut) also reads 'conv2_block1_out' (before the cut) through a skip "
        "connection. Cut after 'conv2_block2_add' instead, or pass "
        "cut=['conv2_block2_2_conv', 'conv2_block1_out'] to send all of these tensors."
    )
    # A projection shortcut: the shortcut's own convolution is a parallel branch.
    with pytest.raises(ValueError) as info:
        keras_split.split(model, "conv2_block1_1_conv")
    assert str(info.value) == (
        "Cut at 'conv2_block1_1_conv' does not separate the graph: layer "
        "'conv2_block1_0_conv', on a branch parallel to the cut, reads 'pool1_pool' (before "
        "the cut), so its branch bypasses the cut. Cut after 'conv2_block1_add' instead, or "
        "pass cut=['conv2_block1_1_conv', 'pool1_pool'] to send all of these tensors."
    )
    for cut in ["conv2_block2_add", ["conv2_block2_2_conv", "conv2_block1_out"],
                "conv2_block1_add", ["conv2_block1_1_conv", "pool1_pool"]]:
        keras_split.split(model, cut)  # each suggestion is a valid cut
    names = [row.layer for row in keras_split.cut_candidates(model, collapse=False)]
    assert "conv2_block1_add" in names
    assert not {"conv2_block2_2_conv", "conv2_block1_1_conv", "conv2_block1_0_conv"} & {*names}
    # ResNet50 pads the image before its first convolution: that cut is no cut.
    assert names[0] == "conv1_conv"
    with pytest.raises(ValueError, match=r"Cut at 'conv1_pad' would send raw inputs: the client "
                                         r"half up to 'conv1_pad' \(\w+ → conv1_pad\) has no "
                                         r"trainable weights.* e.g. cut='conv1_conv'"):
        keras_split.split(model, "conv1_pad")


def test_inception_branches_name_the_parallel_branch():
    model = _build("InceptionV3")
    graph = read_graph(model)
    (mixed0,) = [c for c in graph.calls if c.name == "mixed0"]
    # What all four branches of mixed0 read: the last single cut before it.
    names = [row.layer for row in keras_split.cut_candidates(model, collapse=False)]
    block_input = names[names.index("mixed0") - 1]
    assert isinstance(model.get_layer(block_input), layers.MaxPooling2D)
    readers = {c.name for c in graph.consumers[tensor_key(model.get_layer(block_input).output)]}
    assert len(readers) == 4 and len(mixed0.parents) == 4
    for branch in mixed0.parents:
        with pytest.raises(ValueError, match=(
            rf"Cut at '{branch.name}' does not separate the graph: layer '(\w+)', on a branch "
            rf"parallel to the cut, reads '{block_input}' \(before the cut\), so its branch "
            rf"bypasses the cut. Cut after 'mixed0' instead, or pass "
            rf"cut=\['{branch.name}', '{block_input}'\]"
        )) as info:
            keras_split.split(model, branch.name)
        assert re.search(r"layer '(\w+)'", str(info.value)).group(1) in readers
        keras_split.split(model, [branch.name, block_input])
    assert "mixed0" in [row.layer for row in keras_split.cut_candidates(model)]


@pytest.mark.parametrize("name, raw, first", [
    ("MobileNetV3Small", [layers.Rescaling], "conv"),
    ("ResNet50", [layers.ZeroPadding2D], "conv1_conv"),
    ("EfficientNetB0", [layers.Rescaling, layers.Normalization, layers.ZeroPadding2D],
     "stem_conv"),
])
def test_preprocessing_cuts_would_send_raw_images(name, raw, first):
    model = _build(name)
    marked = keras_split.cut_candidates(model, collapse=False, include_raw=True)
    prefix = [row.layer for row in marked[: len(raw)]]
    assert [type(model.get_layer(n)) for n in prefix] == raw
    assert all(row.refused for row in marked[: len(raw)])
    assert marked[len(raw)].layer == first and marked[len(raw)].refused is None
    assert keras_split.cut_candidates(model, collapse=False)[0].layer == first
    for layer in prefix:
        with pytest.raises(ValueError, match=rf"Cut at '{layer}' would send raw inputs: .* has "
                                             rf"no trainable weights.* e.g. cut='{first}', the "
                                             "first cut whose client half has some"):
            keras_split.split(model, layer)


# -- Keras operations and keyword tensors (the KerasHub patterns) ------------------------


def _hub_like():
    """A tiny transformer shaped like a KerasHub backbone.

    Token ids and a padding mask come in as inputs (as in GemmaBackbone); the
    embedding is scaled with `keras.ops` (an Operation node, not a layer); the
    attention mask, built with `keras.ops`, reaches MultiHeadAttention as a
    keyword argument, and so do its query and value; pooling takes `mask=`;
    the head gates with `ops.multiply`. Returns the model and the gating op."""
    ids = keras.Input((6,), dtype="int32", name="token_ids")
    padding = keras.Input((6,), dtype="bool", name="padding_mask")
    x = layers.Embedding(20, 8, name="embed")(ids)
    x = ops.multiply(x, ops.sqrt(8.0))
    x = layers.Dense(8, name="proj")(x)
    attention = ops.logical_and(ops.expand_dims(padding, 1), ops.expand_dims(padding, 2))
    h = layers.MultiHeadAttention(2, 4, name="mha")(query=x, value=x, attention_mask=attention)
    x = layers.LayerNormalization(name="norm")(layers.Add(name="residual")([x, h]))
    x = layers.GlobalAveragePooling1D(name="pool")(x, mask=padding)
    x = layers.Dense(8, name="ffn")(x)
    gated = ops.multiply(x, ops.sigmoid(layers.Dense(8, name="gate")(x)))
    out = layers.Dense(3, name="logits")(gated)
    return keras.Model([ids, padding], out, name="hub_like"), gated._keras_history.operation


def _hub_batch(rng, n=4):
    ids = rng.integers(1, 20, size=(n, 6)).astype("int32")
    padding = np.arange(6)[None, :] < rng.integers(2, 7, size=(n, 1))
    return [np.where(padding, ids, 0).astype("int32"), padding], rng.integers(0, 3, size=n)


def test_keras_operations_and_keyword_tensors_split(rng):
    model, gate = _hub_like()
    table = keras_split.cut_candidates(model)
    # The padding mask (a model input) is read up to the pooling: cuts before
    # it would hand the server that raw input, so none is offered.
    assert [row.layer for row in table] == ["pool", "ffn", gate.name]
    assert table[0].client_params == sum(
        int(np.prod(w.shape)) for name in ["embed", "proj", "mha", "norm"]
        for w in model.get_layer(name).weights
    )
    with pytest.raises(ValueError, match=r"Cut at 'proj' does not separate the graph: model "
                                         r"input 'padding_mask' does not reach the cut"):
        keras_split.split(model, "proj")
    x, y = _hub_batch(rng)
    for cut in ["pool", gate.name]:  # a layer, and a keras.ops node
        split = keras_split.split(model, cut)
        np.testing.assert_allclose(split.server(split.client(x)), model(x), atol=1e-6)
    _assert_one_step_like_unsplit(model, ["pool", gate.name], x, y)


def test_flops_count_keyword_tensors_and_operations():
    model, _ = _hub_like()
    table = keras_split.cut_candidates(model)
    # The reference: TensorFlow's profiler over the whole model at batch 1. The
    # table sums the calls one by one; a call re-traced without its keyword
    # tensors (attention_mask=, mask=) or an operation node skipped would miss
    # their FLOPs.
    specs = [tf.TensorSpec((1, 6), tf.int32), tf.TensorSpec((1, 6), tf.bool)]
    graph = tf.function(lambda ids, mask: model([ids, mask], training=False))
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    whole = tf.compat.v1.profiler.profile(
        graph=graph.get_concrete_function(*specs).graph, options=options
    ).total_float_ops
    assert table.total_flops == whole
    calls = {c.name: c for c in read_graph(model).calls}
    assert call_flops(calls["mha"]) > 0 and call_flops(calls["pool"]) > 0
    # The gating multiply of two (1, 8) tensors: 8 FLOPs; the last Dense 2*8*3 + 3 = 51.
    assert table[-1].total_flops - table[-1].client_flops == 51
    assert table[-1].client_flops - table[-2].client_flops == 2 * 8 * 8 + 8 + 8
