"""split(): the halves compute the original function, share its weights, and
bad cuts are refused with messages that say how to fix them."""

import dataclasses

import keras
import numpy as np
import pytest
from keras import layers

import keras_split
from tests import models


@pytest.mark.parametrize("name", list(models.ALL) + ["multi_output", "nested"])
def test_halves_compose_to_the_original(name, rng):
    build = getattr(models, name)
    model, cut = build()
    split = keras_split.split(model, cut)
    x = models.inputs_for(model, 4, rng)
    expected = model(x, training=False)
    got = split.server(split.client(x, training=False), training=False)
    for e, g in zip(keras.tree.flatten(expected), keras.tree.flatten(got), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-6)
    merged = split.merge()
    for e, g in zip(keras.tree.flatten(expected), keras.tree.flatten(merged(x)), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-6)


def test_halves_share_the_original_weights(rng):
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    conv = model.get_layer("conv1")
    assert split.client.get_layer("conv1") is conv
    assert split.server.get_layer("dense") is model.get_layer("dense")
    conv.kernel.assign(np.zeros(conv.kernel.shape, "float32"))
    assert not np.any(split.client.get_layer("conv1").get_weights()[0])


def test_cut_specs_hand_derived():
    model, _ = models.small_cnn()
    split = keras_split.split(model, "pool1")
    # Conv 3x3 valid on 8x8 -> 6x6x4, pooled 2x2 -> 3x3x4 = 36 floats = 144 bytes.
    (spec,) = split.cut_specs
    assert spec == keras_split.CutSpec("pool1", (None, 3, 3, 4), "float32", 144)
    assert split.bytes_per_sample == 144
    assert repr(split) == (
        "SplitModel(client=[image→conv1→pool1], server=[flatten→dense→logits], "
        "cut='pool1' (None, 3, 3, 4))"
    )


def test_multi_tensor_cut_specs_and_server_input_names():
    model, cut = models.resnet_block()
    split = keras_split.split(model, cut)
    assert [s.name for s in split.cut_specs] == ["conv2", "conv1"]
    assert [t.shape for t in split.server.inputs] == [(None, 8, 8, 4)] * 2
    inputs = {lay.name for lay in split.server.layers if isinstance(lay, layers.InputLayer)}
    assert inputs == {"conv1", "conv2"}


def test_nested_model_stays_whole():
    model, _ = models.nested()
    split = keras_split.split(model, "encoder")
    assert split.client.get_layer("encoder") is model.get_layer("encoder")
    assert not any(isinstance(lay, keras.Model) for lay in split.server.layers)


def test_summary_shows_both_halves_and_the_cut():
    model, cut = models.small_cnn()
    lines = []
    keras_split.split(model, cut).summary(print_fn=lambda line, **_: lines.append(line))
    text = "\n".join(lines)
    assert "Client half:" in text and "Server half:" in text
    assert "pool1: shape (None, 3, 3, 4), float32, 144 bytes" in text


# -- cut_candidates ------------------------------------------------------------


def _chain():
    inp = keras.Input((3,), name="x")
    h = layers.Dense(4, name="d1")(inp)
    h = layers.Dense(2, name="d2")(h)
    out = layers.Dense(1, name="d3")(h)
    return keras.Model(inp, out)


def test_cut_candidates_hand_derived():
    # FLOPs per sample: d1 = 2*3*4 + 4 = 28, d2 = 2*4*2 + 2 = 18, d3 = 2*2*1 + 1 = 5.
    candidates = keras_split.cut_candidates(_chain())
    assert [c.layer for c in candidates] == ["d1", "d2"]
    d1, d2 = candidates
    assert (d1.bytes_per_sample, d1.client_params) == (16, 16)
    assert (d2.bytes_per_sample, d2.client_params) == (8, 26)
    assert d1.client_flops_fraction == pytest.approx(28 / 51)
    assert d2.client_flops_fraction == pytest.approx(46 / 51)
    assert (d1.client_flops, d1.total_flops) == (28, 51)
    assert (d2.client_flops, d2.total_flops) == (46, 51)
    assert (d1.layers, d1.refused) == (("d1",), None)
    assert candidates.total_flops == 51


def _conv_bn_relu():
    inp = keras.Input((8, 8, 1), name="image")
    x = layers.Conv2D(4, 3, padding="same", name="conv1")(inp)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.Conv2D(4, 3, padding="same", name="conv2")(x)  # same shape, has a kernel
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(5, name="dense")(x)
    return keras.Model(inp, layers.Dense(2, name="logits")(x), name="conv_bn_relu")


def test_cut_table_collapses_layers_that_follow_up_on_a_cut():
    model = _conv_bn_relu()
    every = keras_split.cut_candidates(model, collapse=False)
    assert [c.layer for c in every] == [
        "conv1", "bn1", "relu1", "conv2", "pool", "flatten", "dense"
    ]
    table = keras_split.cut_candidates(model)
    # conv1, bn1 and relu1 each send 8*8*4 = 256 floats = 1,024 bytes, and so does
    # conv2, but conv2 has a kernel: it starts a row. pool -> flatten keep 4*4*4
    # floats (256 bytes); dense sends 5 (20 bytes).
    assert [c.layers for c in table] == [
        ("conv1", "bn1", "relu1"), ("conv2",), ("pool", "flatten"), ("dense",)
    ]
    assert [c.bytes_per_sample for c in table] == [1024, 1024, 256, 20]
    # A row carries the numbers of the cut it names: the first of its layers.
    by_name = {c.layer: c for c in every}
    for row in table:
        assert row == dataclasses.replace(by_name[row.layer], layers=row.layers)
    assert table.cuts == 7 and every.cuts == 7
    # Conv 3x3 'same' on 8x8x1 to 4 channels: 2*9*1*4*64 + 4*64 = 4,864 FLOPs, 40 params;
    # BatchNormalization adds 4*4 params (gamma, beta, moving mean and variance).
    conv1, bn1 = every[0], every[1]
    assert (conv1.client_params, bn1.client_params) == (40, 56)
    assert conv1.client_flops == 4864


def test_cut_table_prints_compactly():
    model = _conv_bn_relu()
    table = keras_split.cut_candidates(model)
    assert repr(table) == (
        "CutTable('conv_bn_relu': 4 rows for 7 cuts [conv1, conv2, pool, dense]; "
        ".summary() prints them)"
    )
    lines = []
    table.summary(print_fn=lambda line, **_: lines.append(line))
    assert str(table) == "\n".join(lines)
    assert lines[0].startswith("Cut candidates of 'conv_bn_relu': 7 cuts in 4 rows")
    assert lines[1] == f"Forward FLOPs per sample: {table.total_flops / 1e3:.2f}K"
    assert lines[3].split() == ["Cut", "Bytes/sample", "Client", "params", "Client", "FLOPs",
                                "Share", "Device"]
    assert lines[5].split()[:5] == ["conv1", "…", "relu1", "(3", "cuts)"]
    assert lines[5].split()[5:7] == ["1,024", "40"]
    assert lines[5].split()[-1] == "yes"
    # A big table keeps a one-line repr: the first and last rows' names only.
    big = keras_split.partition.CutTable(list(table) * 10, model_name="big", cuts=70)
    assert repr(big) == (
        "CutTable('big': 40 rows for 70 cuts [conv1, conv2, pool, …, pool, dense]; "
        ".summary() prints them)"
    )
    assert len(str(big).splitlines()) == 40 + 6


def test_cut_candidates_checks_its_options():
    with pytest.raises(TypeError, match=r"`collapse` and `include_raw` must be True or False, "
                                        r"received collapse='no'"):
        keras_split.cut_candidates(_chain(), collapse="no")


def _dropout_cnn():
    inp = keras.Input((8, 8, 1), name="image")
    x = layers.Conv2D(4, 3, name="conv1")(inp)
    x = layers.Dropout(0.2, name="drop")(x)
    x = layers.Conv2D(4, 3, name="conv2")(x)
    x = layers.Flatten(name="flatten")(x)
    return keras.Model(inp, layers.Dense(2, name="logits")(x), name="dropout_cnn")


def test_cut_table_says_which_client_halves_export_to_a_device():
    model = _dropout_cnn()
    table = keras_split.cut_candidates(model)
    # Dropout with a rate has no training rule on the device unless the export
    # is told to train with it off: every cut from it on is marked with it.
    assert [(c.layers, c.exportable, c.export_blocker) for c in table] == [
        (("conv1",), True, None), (("drop",), False, "drop"),
        (("conv2", "flatten"), False, "drop"),
    ]
    lines = str(table).splitlines()
    assert lines[5].split()[-1] == "yes" and lines[6].split()[-2:] == ["no:", "drop"]
    inference = keras_split.cut_candidates(model, dropout="inference")
    # conv1 and drop send the same bytes but only one of them exports: two rows
    # above, one row here.
    assert [(c.layers, c.exportable) for c in inference] == [
        (("conv1", "drop"), True), (("conv2", "flatten"), True)]
    # The core's table knows no export rules: no column unless given the check.
    core = keras_split.partition.cut_candidates(model)
    assert {c.exportable for c in core} == {None} and "Device" not in str(core)
    with pytest.raises(ValueError, match="`dropout` must be None or 'inference'; "
                                         "received 'training'"):
        keras_split.cut_candidates(model, dropout="training")


@pytest.mark.parametrize("app", ["MobileNetV3Small", "EfficientNetB0"])
def test_device_column_agrees_with_exporting_each_client_half(app):
    from keras_split.export import ClientProgram, UnsupportedLayerError, exportable

    model = getattr(keras.applications, app)(input_shape=(32, 32, 3), weights=None)
    table = keras_split.cut_candidates(model)
    assert any(c.exportable for c in table) and not all(c.exportable for c in table)
    for row in table[:: max(1, len(table) // 8)] + [next(c for c in table if not c.exportable)]:
        client = keras_split.split(model, row.layer).client
        assert exportable(client) == (row.exportable, row.export_blocker), row.layer
        if row.exportable:
            ClientProgram(client)  # builds every rule: no layer refused
        else:
            with pytest.raises(UnsupportedLayerError, match=row.export_blocker):
                ClientProgram(client)


# -- no raw inputs over the wire ---------------------------------------------------


def _preprocessed_cnn(frozen=False):
    inp = keras.Input((6, 6, 1), name="image")
    x = layers.Rescaling(1 / 255, name="rescale")(inp)
    normalize = layers.Normalization(name="normalize")
    normalize.adapt(np.linspace(0, 1, 72, dtype="float32").reshape(2, 6, 6, 1))
    x = normalize(x)
    x = layers.ZeroPadding2D(1, name="pad")(x)
    conv = layers.Conv2D(3, 3, name="conv")
    x = layers.Flatten(name="flatten")(conv(x))
    model = keras.Model(inp, layers.Dense(2, name="logits")(x), name="preprocessed")
    conv.trainable = not frozen
    return model


@pytest.mark.parametrize("cut", ["rescale", "normalize", "pad"])
def test_cuts_without_trainable_weights_are_refused(cut):
    model = _preprocessed_cnn()
    path = " → ".join(["image", "rescale", "normalize", "pad"][: ["rescale", "normalize",
                                                                  "pad"].index(cut) + 2])
    with pytest.raises(ValueError) as info:
        keras_split.split(model, cut)
    assert str(info.value) == (
        f"Cut at {cut!r} would send raw inputs: the client half up to {cut!r} ({path}) has "
        "no trainable weights, so the server would receive the model inputs merely "
        "rescaled, padded or normalized. Cut after a layer with trainable weights, e.g. "
        "cut='conv', the first cut whose client half has some."
    )
    keras_split.split(model, "conv")  # the suggestion is a valid cut


def test_cut_candidates_leave_out_raw_cuts_or_mark_them():
    model = _preprocessed_cnn()
    assert [c.layer for c in keras_split.cut_candidates(model, collapse=False)] == [
        "conv", "flatten"
    ]
    marked = keras_split.cut_candidates(model, collapse=False, include_raw=True)
    assert [(c.layer, c.refused) for c in marked] == [
        ("rescale", "sends raw inputs: the client half has no trainable weights"),
        ("normalize", "sends raw inputs: the client half has no trainable weights"),
        ("pad", "sends raw inputs: the client half has no trainable weights"),
        ("conv", None),
        ("flatten", None),
    ]
    # The Normalization statistics (mean, variance, count) are weights, but not
    # trainable ones.
    assert marked[1].client_params == 3
    # Raw and accepted cuts never share a row; the raw ones share theirs.
    collapsed = keras_split.cut_candidates(model, include_raw=True)
    assert [c.layers for c in collapsed] == [("rescale", "normalize"), ("pad",),
                                             ("conv", "flatten")]
    assert "refused: sends raw inputs" in str(collapsed).splitlines()[5]


def test_a_frozen_client_half_still_transforms_the_data():
    # Freezing marks the convolution's weights non-trainable, yet it still
    # computes features: the cut is not raw data (a frozen pretrained backbone on
    # the client is a common setup).
    model = _preprocessed_cnn(frozen=True)
    assert not model.get_layer("conv").trainable_weights
    keras_split.split(model, "conv")
    assert [c.layers for c in keras_split.cut_candidates(model)] == [("conv", "flatten")]


def test_raw_branch_of_a_multi_tensor_cut_is_refused():
    img = keras.Input((4, 4, 1), name="image")
    tab = keras.Input((3,), name="tabular")
    a = layers.Flatten(name="img_flat")(layers.Conv2D(2, 3, name="img_conv")(img))
    b = layers.Rescaling(2.0, name="tab_scale")(tab)
    x = layers.Concatenate(name="concat")([a, b])
    model = keras.Model([img, tab], layers.Dense(1, name="out")(x))
    with pytest.raises(ValueError, match=r"Cut at \['img_flat', 'tab_scale'\] would send raw "
                                         r"inputs: the client half up to 'tab_scale' \(tabular "
                                         r"→ tab_scale\) has no trainable weights.* Add a layer "
                                         r"with trainable weights"):
        keras_split.split(model, ["img_flat", "tab_scale"])


def test_later_hops_of_a_chain_start_from_activations():
    # The middle party of this chain only pools: it has no weights, but what it
    # receives is the first party's activations, not raw inputs.
    model, _ = models.small_cnn()
    chain = keras_split.split_chain(model, ["conv1", "pool1"])
    assert [s.name for s in chain.cut_specs[1]] == ["pool1"]


def test_cut_candidates_skip_cuts_bypassed_by_a_skip_connection():
    model, _ = models.resnet_block()
    names = [c.layer for c in keras_split.cut_candidates(model)]
    assert "conv2" not in names  # conv1 -> add bypasses it
    assert names == ["conv1", "add", "gap"]


# -- errors ----------------------------------------------------------------------


def test_subclassed_model_is_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = layers.Dense(2)

        def call(self, x):
            return self.d(x)

    net = Net()
    net(np.zeros((1, 3), "float32"))
    with pytest.raises(TypeError, match=r"subclassed model of type Net.*SplitModel\(client="):
        keras_split.split(net, "d")


def test_unbuilt_sequential_is_refused():
    model = keras.Sequential([layers.Dense(2, name="a"), layers.Dense(1, name="b")])
    with pytest.raises(ValueError, match=r"no input shape yet.*keras.Input"):
        keras_split.split(model, "a")


def test_unknown_layer_lists_existing_ones():
    model, _ = models.small_cnn()
    with pytest.raises(
        ValueError,
        match=r"No such layer: 'pool9'. Existing layers are: \['image', 'conv1', 'pool1', "
        r"'flatten', 'dense', 'logits'\]",
    ):
        keras_split.split(model, "pool9")


def test_skip_connection_names_the_bypass_and_suggests_fixes():
    model, _ = models.resnet_block()
    with pytest.raises(ValueError) as info:
        keras_split.split(model, "conv2")
    assert str(info.value) == (
        "Cut at 'conv2' does not separate the graph: layer 'add' (after the cut) also reads "
        "'conv1' (before the cut) through a skip connection. Cut after 'add' instead, or pass "
        "cut=['conv2', 'conv1'] to send all of these tensors."
    )
    # Both suggestions are valid cuts.
    keras_split.split(model, "add")
    keras_split.split(model, ["conv2", "conv1"])


def test_cut_at_input_layer():
    model, _ = models.small_cnn()
    with pytest.raises(ValueError, match=r"'image': it is an input layer.*e.g. cut='conv1'"):
        keras_split.split(model, "image")


def test_cut_at_output_layer():
    model, _ = models.small_cnn()
    with pytest.raises(ValueError, match=r"'logits': it is an output layer, and every model"):
        keras_split.split(model, "logits")


def test_incomplete_multi_branch_cut_names_the_missing_input():
    model, _ = models.multi_input()
    with pytest.raises(ValueError) as info:
        keras_split.split(model, ["img_flat"])
    assert "model input 'tabular' does not reach the cut" in str(info.value)
    assert "cut=['img_flat', 'tab_dense']" in str(info.value)


def test_cut_list_with_redundant_layer():
    model, _ = models.small_cnn()
    with pytest.raises(ValueError, match=r"not minimal.*Remove 'conv1' from the cut"):
        keras_split.split(model, ["conv1", "pool1"])


def test_bad_cut_type():
    model, _ = models.small_cnn()
    with pytest.raises(TypeError, match=r"`cut` must be a layer name or a non-empty list"):
        keras_split.split(model, 3)
    with pytest.raises(TypeError, match=r"non-empty list"):
        keras_split.split(model, [])


def test_output_left_on_client_side():
    inp = keras.Input((4,), name="x")
    early = layers.Dense(2, name="early_out")(inp)
    h = layers.Dense(3, name="h")(inp)
    late = layers.Dense(1, name="late_out")(layers.Dense(3, name="h2")(h))
    model = keras.Model(inp, [early, late])
    with pytest.raises(ValueError, match=r"'early_out' \(after the cut\) reads the model input "
                                         r"'x' directly, so the server would receive raw"):
        keras_split.split(model, ["h"])

    # An output that feeds the cut itself ends up on the client side.
    inp = keras.Input((4,), name="x")
    early = layers.Dense(2, name="early_out")(inp)
    h = layers.Dense(3, name="h")(early)
    model = keras.Model(inp, [early, layers.Dense(1, name="late_out")(h)])
    with pytest.raises(ValueError, match=r"output of layer 'early_out' on the client side"):
        keras_split.split(model, "h")


def test_shared_layer_across_the_cut():
    inp = keras.Input((4,), name="x")
    shared = layers.Dense(4, name="shared")
    h = layers.Dense(4, name="first")(shared(inp))
    out = layers.Dense(1, name="out")(shared(h))
    model = keras.Model(inp, out)
    with pytest.raises(ValueError, match=r"'shared' is called on both sides of the cut"):
        keras_split.split(model, "first")
    with pytest.raises(ValueError, match=r"'shared': the layer is called 2 times"):
        keras_split.split(model, "shared")


def test_hand_written_halves_must_fit():
    client = keras.Sequential([keras.Input((4,)), layers.Dense(3)])
    server = keras.Sequential([keras.Input((5,)), layers.Dense(1)])
    with pytest.raises(ValueError, match=r"client sends shape \(None, 3\) float32, the server "
                                         r"expects \(None, 5\) float32"):
        keras_split.SplitModel(client=client, server=server)
    with pytest.raises(TypeError, match=r"`server` must be a keras.Model, received str"):
        keras_split.SplitModel(client=client, server="server.keras")


def test_hand_written_halves():
    client = keras.Sequential([keras.Input((4,)), layers.Dense(3, name="enc")])
    server = keras.Sequential([keras.Input((3,)), layers.Dense(1, name="head")])
    split = keras_split.SplitModel(client=client, server=server)
    assert split.bytes_per_sample == 12
    x = np.ones((2, 4), "float32")
    np.testing.assert_allclose(split.merge()(x), server(client(x)), atol=1e-6)


def test_parallel_branches_do_not_send_the_partitioner_into_recursion():
    # Six layers reproduce a ResNet block with a projection shortcut: two
    # branches from one stem, joined by Add. Each branch bypasses the other, and
    # the error hint's search for a later cut used to ask about the other
    # branch, which asked about the first, forever (RecursionError).
    x = keras.Input((4,), name="x")
    stem = keras.layers.Dense(4, name="stem")(x)
    a = keras.layers.Dense(4, name="a")(stem)
    b = keras.layers.Dense(4, name="b")(stem)
    out = keras.layers.Dense(2, name="out")(keras.layers.Add(name="add")([a, b]))
    model = keras.Model(x, out)
    assert [c.layer for c in keras_split.cut_candidates(model)] == ["stem", "add"]
    for cut, other in [("a", "b"), ("b", "a")]:
        with pytest.raises(ValueError, match=rf"layer '{other}', on a branch parallel to the "
                                             rf"cut, reads 'stem' .* Cut after 'add' instead, "
                                             rf"or pass cut=\['{cut}', 'stem'\]"):
            keras_split.split(model, cut)
        # Both suggestions are valid cuts.
        keras_split.split(model, "add")
        keras_split.split(model, [cut, "stem"])
