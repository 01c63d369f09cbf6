"""Compression codecs: error bounds derived by hand, TensorFlow's bfloat16 cast
as an independent reference, strict validation of every compressed field, and
the in-process transport's byte counts."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_split
from keras_split.network import convert as wire
from keras_split_wire import codecs
from keras_split_wire.proto import split_pb2 as pb
from tests import models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def gradient_like(rng, shape=(16, 5, 5, 8)):
    """Values spread over six decades, 1e-10 to 1e-4, like cut gradients."""
    magnitude = 10.0 ** rng.uniform(-10, -4, shape)
    return (rng.choice([-1.0, 1.0], shape) * magnitude).astype("float32")


def encoded(codec, array):
    tensor = pb.Tensor(dtype=array.dtype.name, shape=list(array.shape))
    codecs.get(codec).encode(array, tensor)
    return tensor


def test_float16_scaled_keeps_tiny_gradients(rng):
    g = gradient_like(rng)
    out, sent = codecs.roundtrip(codecs.get("float16"), g)
    assert sent == g.size * 2
    # float16 rounds to 11 significant bits: relative error <= 2**-11 for values
    # in its normal range. The scale puts the largest magnitude (2**k times a
    # mantissa in [0.5, 1)) just under 2**15, so everything above 2**(k-30) is
    # normal; below, the absolute error is at most half float16's smallest
    # step, 2**-25, unscaled: 2**(k-15-25).
    k = math.frexp(float(np.abs(g).max()))[1]
    bound = 2.0**-11 * np.abs(g) + 2.0 ** (k - 40)
    assert np.all(np.abs(out - g) <= bound)
    # Unscaled float16 would flush most of them to zero or subnormals.
    plain = g.astype(np.float16).astype(np.float32)
    assert np.mean(np.abs(plain - g) > 2.0**-11 * np.abs(g)) > 0.5
    assert np.mean(np.abs(out - g) > 2.0**-11 * np.abs(g)) == 0.0


def test_bfloat16_matches_tensorflow_cast(rng):
    x = np.concatenate([gradient_like(rng).ravel(), rng.normal(size=1000).astype("float32"),
                        np.array([0.0, -0.0, 1e38, -3e-39], "float32")])
    out, sent = codecs.roundtrip(codecs.get("bfloat16"), x)
    want = tf.cast(tf.cast(x, tf.bfloat16), tf.float32).numpy()
    np.testing.assert_array_equal(out, want)
    assert sent == x.size * 2


def test_int8_error_is_at_most_half_a_step_and_zero_is_exact(rng):
    x = np.maximum(rng.normal(size=(32, 40)), 0).astype("float32")  # ReLU-like
    tensor = encoded("int8", x)
    out, sent = codecs.roundtrip(codecs.get("int8"), x)
    assert sent == x.size
    step = (x.max() - 0.0) / 255
    assert tensor.scale == pytest.approx(step, rel=1e-6)
    assert np.all(np.abs(out - x) <= tensor.scale / 2 * (1 + 1e-5))
    np.testing.assert_array_equal(out[x == 0], 0.0)
    negative = rng.normal(size=100).astype("float32") - 5  # all below zero
    out, _ = codecs.roundtrip(codecs.get("int8"), negative)
    assert np.max(np.abs(out - negative)) <= (0 - negative.min()) / 510 * (1 + 1e-5)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_topk_keeps_exactly_the_largest(rng, fraction):
    x = rng.normal(size=(8, 7, 3)).astype("float32")
    out, sent = codecs.roundtrip(codecs.TopK(fraction), x)
    k = max(1, math.ceil(fraction * x.size))
    largest = np.sort(np.abs(x).ravel())[-k:]
    kept = out != 0
    assert kept.sum() == k
    np.testing.assert_array_equal(np.sort(np.abs(out[kept])), largest)
    np.testing.assert_array_equal(out[kept], x[kept])
    assert sent == k * (4 + 4)


@pytest.mark.parametrize("name", ["float16", "bfloat16", "int8", "topk"])
def test_non_finite_tensors_travel_exactly(name):
    x = np.array([[1.0, np.nan], [np.inf, -2.0]], "float32")
    tensor = encoded(name, x)
    assert tensor.codec == "none"
    out = wire.decode(tensor, "gradients[0]", 100, finite=False, codec=codecs.get(name))
    np.testing.assert_array_equal(out, x)


def test_integer_tensors_are_not_compressed():
    tensor = wire.encode(np.arange(6, dtype="int32"), codec=codecs.get("int8"))
    assert tensor.codec == "none"


@pytest.mark.parametrize("dtype", ["float16", "float64"])
@pytest.mark.parametrize("name", ["float16", "bfloat16", "int8", "topk"])
def test_other_float_dtypes_decode_to_their_own_dtype(rng, name, dtype):
    x = rng.normal(size=(4, 5)).astype(dtype)
    out, _ = codecs.roundtrip(codecs.get(name), x)
    assert out.dtype == x.dtype and out.shape == x.shape


def _malformed(kind):
    x = np.linspace(-1, 1, 12, dtype="float32").reshape(3, 4)
    name = kind.split(".")[0]
    tensor = encoded("topk:0.5" if name == "topk" else name, x)
    problem = kind.split(".")[1]
    if problem == "length":
        tensor.data = tensor.data[:-1]
    elif problem == "exponent":
        tensor.scale_exponent = 5000
    elif problem == "scale":
        tensor.scale = float("nan")
    elif problem == "zero_scale":
        tensor.scale = 0.0
    elif problem == "zero_point":
        tensor.zero_point = 300
    elif problem == "ragged_indices":
        tensor.indices = tensor.indices[:-1]
    elif problem == "unsorted":
        values = np.frombuffer(tensor.indices, "<u4")[::-1].copy()
        tensor.indices = values.tobytes()
    elif problem == "duplicate":
        values = np.frombuffer(tensor.indices, "<u4").copy()
        values[1] = values[0]
        tensor.indices = values.tobytes()
    elif problem == "out_of_range":
        values = np.frombuffer(tensor.indices, "<u4").copy()
        values[-1] = 12
        tensor.indices = values.tobytes()
    elif problem == "too_many":
        tensor.indices = np.arange(13, dtype="<u4").tobytes()
        tensor.data = np.zeros(13, "<f4").tobytes()
    return tensor, codecs.get(name)


@pytest.mark.parametrize("kind", [
    "float16.length", "float16.exponent", "bfloat16.length", "int8.length", "int8.scale",
    "int8.zero_scale", "int8.zero_point", "topk.length", "topk.ragged_indices",
    "topk.unsorted", "topk.duplicate", "topk.out_of_range", "topk.too_many",
])
def test_malformed_compressed_tensors_are_rejected(kind):
    tensor, codec = _malformed(kind)
    with pytest.raises(wire.WireError, match=r"^activations\[0\]: "):
        wire.decode(tensor, "activations[0]", 100, codec=codec)


def test_codec_must_be_the_negotiated_one():
    tensor = encoded("int8", np.ones((2, 2), "float32"))
    with pytest.raises(wire.WireError, match="codec 'int8' was not negotiated"):
        wire.decode(tensor, "activations[0]", 100, codec=codecs.get("float16"))
    integer = wire.encode(np.ones(4, "int32"))
    integer.codec = "float16"
    with pytest.raises(wire.WireError, match="applies to floating-point tensors, not int32"):
        wire.decode(integer, "labels[0]", 100, codec=codecs.get("float16"))


def test_get_names_and_errors():
    assert codecs.get(None) is codecs.NONE
    assert codecs.get("topk:0.05") == codecs.TopK(0.05)
    assert codecs.get("topk").fraction == 0.1
    assert codecs.get(codecs.get("topk:0.05").spec) == codecs.TopK(0.05)
    for bad in ("gzip", "topk:lots", "topk:2", "float16:3", 16):
        with pytest.raises(ValueError, match="compression"):
            codecs.get(bad)
    with pytest.raises(ValueError, match=r"`fraction` must be in \(0, 1\], received 0"):
        codecs.TopK(0)


@pytest.mark.parametrize("name", ["float16", "int8", "topk:0.25"])
def test_in_process_compression_trains_and_counts_encoded_bytes(rng, name):
    model, cut = models.small_cnn()
    x, y = models.inputs_for(model, 64, rng), rng.integers(0, 3, 64)
    split = keras_split.split(model, cut)
    split.compile(optimizer=keras.optimizers.SGD(0.05), loss=LOSS, compression=name)
    history = split.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    values = int(np.prod(split.cut_specs[0].shape[1:])) * 64
    per_value = {"float16": 2, "int8": 1, "topk:0.25": 0.25 * 8}[name]
    label_bytes = y.nbytes
    assert history.history["bytes_up"][0] == pytest.approx(values * per_value + label_bytes)
    assert history.history["bytes_down"][0] == pytest.approx(values * per_value)


def test_compression_with_a_custom_transport_is_refused():
    model, cut = models.small_cnn()
    split = keras_split.split(model, cut)
    with pytest.raises(ValueError, match="Unknown compression 'zstd'"):
        split.compile("sgd", loss=LOSS, compression="zstd")
    with pytest.raises(ValueError, match="give the codec to the transport"):
        split.compile("sgd", loss=LOSS, compression="int8",
                      transport=keras_split.InProcessTransport(None))
    assert split.client_role is None  # nothing was half-configured


def test_fast_float16_cast_rounds_exactly_like_numpy(rng):
    # Every finite float32 bit pattern class: normals, float16 subnormals,
    # overflow to inf, exact ties; compared bit for bit with numpy's cast.
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    ties = (np.arange(-2048, 2048, dtype=np.float32) + 0.5) * 2.0**-10  # halfway points
    x = np.concatenate([x, ties, np.float32([6.1e-5, 5.96e-8, 65504, 65520, -0.0])])
    fast = codecs._cast(x, "float16")
    with np.errstate(over="ignore"):
        slow = x.astype(np.float16)
    np.testing.assert_array_equal(fast.view(np.uint16), slow.view(np.uint16))
    back = codecs._cast(fast, "float32")
    np.testing.assert_array_equal(back.view(np.uint32),
                                  fast.astype(np.float32).view(np.uint32))
