"""Compression of the cut tensors on the wire.

A codec encodes one floating-point tensor into the fields of a `Tensor`
message and decodes it back, validating every field it reads. Codecs apply to
the cut activations (client to server) and the cut gradients (back); labels,
sample weights and predictions always travel exactly.

- `"float16"`: half precision after scaling by a power of two chosen per
  tensor, carried as `scale_exponent`. Cut gradients are tiny (often below
  1e-5), and plain float16 would flush most of them into its subnormal range;
  the scale puts the tensor's largest magnitude just under 2**15, so every
  value within 2**-29 of it keeps 11 significant bits. Scaling by a power of
  two is exact, so the only error is float16's rounding.
- `"bfloat16"`: the top 16 bits of float32 (round to nearest even): float32's
  range, 8 significant bits, no scale needed.
- `"int8"`: affine per tensor, 8 bits per value with a float scale and an
  integer zero point chosen so that 0 stays exact (ReLU activations are
  mostly zeros). Error at most half a step, `(max - min) / 510`.
- `TopK(fraction)`, `"topk"` or `"topk:0.05"`: only the largest `fraction` of
  the values by magnitude, as sorted uint32 positions and their values; the
  rest decode as 0.

A tensor holding NaN or Inf is sent uncompressed ("none"), so a diverging
loss reaches the client exactly as the server saw it.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from .proto import split_pb2 as pb

FLOAT_DTYPES = ("float16", "float32", "float64")
# float16's largest finite value is 65504 < 2**16: scaling the largest
# magnitude into [2**14, 2**15) leaves a bit of headroom for rounding.
_FLOAT16_TOP = 15
# Bound on decoded scale exponents: anything outside cannot come from a finite
# float32 or float64 tensor and would only overflow.
_MAX_EXPONENT = 1100


class CodecError(ValueError):
    """A compressed tensor whose fields do not fit its codec."""


class Codec:
    """Base class: `encode` fills a `Tensor` message, `decode` reads one back."""

    name = "none"

    @property
    def spec(self) -> str:
        """What the client proposes at `Open`; `get(spec)` rebuilds the codec."""
        return self.name

    def encode(self, array: np.ndarray, tensor: pb.Tensor) -> None:
        tensor.codec = "none"
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        tensor.data = np.ascontiguousarray(little).tobytes()

    def decode(self, tensor: pb.Tensor, shape: tuple, dtype: np.dtype) -> np.ndarray:
        count = math.prod(shape)
        dtype = dtype.newbyteorder("<")
        _expect_bytes(tensor.data, count * dtype.itemsize, f"shape {shape} of {dtype.name}")
        # A read-only view of the message's bytes: no copy (on a little-endian host).
        return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(dtype.name,
                                                                              copy=False)

    def __repr__(self):
        return f"{type(self).__name__}()"

    def __eq__(self, other):
        return isinstance(other, Codec) and other.spec == self.spec

    def __hash__(self):
        return hash(self.spec)


def _expect_bytes(data: bytes, expected: int, what: str) -> None:
    if len(data) != expected:
        raise CodecError(f"{len(data)} bytes of data, but {what} needs {expected}")


def _compressible(array: np.ndarray) -> bool:
    return array.dtype.name in FLOAT_DTYPES and array.size > 0 and bool(
        np.all(np.isfinite(array)))


def _finite_range(array: np.ndarray) -> tuple[float, float] | None:
    """(min, max) of a non-empty floating-point array whose values are all
    finite, else None: np.min and np.max propagate NaN and keep infinities,
    so one pass for each answers both questions."""
    if array.dtype.name not in FLOAT_DTYPES or array.size == 0:
        return None
    low, high = float(array.min()), float(array.max())
    return (low, high) if math.isfinite(low) and math.isfinite(high) else None


def _scaled_cast(array: np.ndarray, exponent: int, dtype: str) -> np.ndarray:
    """`(array * 2**exponent).astype(dtype)`, vectorized.

    numpy converts to and from float16 one value at a time, with branches that
    depend on the data: 0.3 ms for a 64x800 batch, most of a loopback step's
    wire cost. To float16, TensorFlow's cast (when TensorFlow is loaded) uses
    the CPU's conversion instructions and rounds the same way (IEEE round to
    nearest even; a test checks bit equality). From float16, a table of all
    65,536 values, looked up in one gather, is as fast and needs no
    TensorFlow. Multiplying by a power of two is exact, so the scale is applied
    on the wider side (before narrowing, after widening), in numpy, where no
    intermediate under- or overflows: one TensorFlow op per conversion, not
    two. The module itself stays free of TensorFlow, for device runtimes.
    """
    exact = -126 <= exponent <= 127  # 2**exponent is a normal float32
    narrowing = np.dtype(dtype).itemsize < array.dtype.itemsize
    pair = (array.dtype, np.dtype(dtype))
    if not exact or array.size < 4096 or pair not in _FAST_PAIRS:
        if narrowing:
            return np.ldexp(array, exponent).astype(dtype)
        return np.ldexp(array.astype(dtype), exponent)
    factor = np.float32(2.0**exponent)
    if narrowing:
        tf = sys.modules.get("tensorflow")
        scaled = array * factor if exponent else array
        if tf is None:
            return scaled.astype(dtype)
        return tf.cast(scaled, dtype).numpy()
    # float16 to float32: every value from the table (exact), then the scale.
    wide = _float16_table().take(np.ascontiguousarray(array).view(np.uint16))
    if exponent:
        wide *= factor
    return wide


_FAST_PAIRS = frozenset([(np.dtype(np.float32), np.dtype(np.float16)),
                         (np.dtype(np.float16), np.dtype(np.float32))])
_FLOAT16_TABLE: list[np.ndarray] = []


def _float16_table() -> np.ndarray:
    """All 65,536 float16 values as float32, by their bits (256 kB, built once)."""
    if not _FLOAT16_TABLE:
        _FLOAT16_TABLE.append(np.arange(65536, dtype=np.uint16).view(np.float16)
                              .astype(np.float32))
    return _FLOAT16_TABLE[0]


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    return _scaled_cast(array, 0, dtype)


class Float16(Codec):
    """Half precision after an exact power-of-two scale (see the module doc)."""

    name = "float16"

    def encode(self, array, tensor):
        bounds = _finite_range(array)
        if bounds is None:
            return Codec.encode(self, array, tensor)
        largest = max(bounds[1], -bounds[0])
        exponent = 0 if largest == 0.0 else _FLOAT16_TOP - math.frexp(largest)[1]
        # Every scaled magnitude is at most 2**15: no dtype overflows here.
        half = _scaled_cast(array, exponent, "float16")
        tensor.codec = self.name
        tensor.scale_exponent = exponent
        tensor.data = half.astype("<f2", copy=False).tobytes()

    def decode(self, tensor, shape, dtype):
        if abs(tensor.scale_exponent) > _MAX_EXPONENT:
            raise CodecError(f"scale_exponent {tensor.scale_exponent} is out of range")
        count = math.prod(shape)
        _expect_bytes(tensor.data, 2 * count, f"{count} float16 values")
        wide = "float64" if dtype.name == "float64" else "float32"
        half = np.frombuffer(tensor.data, dtype="<f2").astype("float16", copy=False)
        values = _scaled_cast(half, -tensor.scale_exponent, wide)
        return values.reshape(shape).astype(dtype.name, copy=False)


class BFloat16(Codec):
    """The upper half of each float32, rounded to nearest even."""

    name = "bfloat16"

    def encode(self, array, tensor):
        if not _compressible(array):
            return Codec.encode(self, array, tensor)
        tensor.codec = self.name
        tf = sys.modules.get("tensorflow")
        if tf is not None and array.size >= 4096:  # vectorized, same rounding
            top = tf.cast(array, tf.bfloat16).numpy().view(np.uint16)
        else:
            bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
            rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
            # Finite values cannot carry past the top bit: no overflow in uint32.
            top = ((bits + rounding) >> 16).astype(np.uint16)
        tensor.data = top.astype("<u2", copy=False).tobytes()

    def decode(self, tensor, shape, dtype):
        count = math.prod(shape)
        _expect_bytes(tensor.data, 2 * count, f"{count} bfloat16 values")
        top = np.frombuffer(tensor.data, dtype="<u2").astype(np.uint32)
        return (top << 16).view(np.float32).reshape(shape).astype(dtype.name)


class Int8(Codec):
    """Affine 8-bit quantization per tensor, with 0 represented exactly."""

    name = "int8"

    def encode(self, array, tensor):
        bounds = _finite_range(array)
        if bounds is None:
            return Codec.encode(self, array, tensor)
        low, high = min(bounds[0], 0.0), max(bounds[1], 0.0)
        # The message carries a float32 scale: quantize with exactly that value.
        scale = float(np.float32((high - low) / 255.0)) or 1.0
        zero_point = int(np.clip(round(-128 - low / scale), -128, 127))
        wide = np.float64 if array.dtype == np.float64 else np.float32
        quantized = np.rint(array.astype(wide, copy=False) / wide(scale))
        quantized += zero_point
        np.clip(quantized, -128, 127, out=quantized)
        tensor.codec = self.name
        tensor.scale = scale
        tensor.zero_point = zero_point
        tensor.data = quantized.astype(np.int8).tobytes()

    def decode(self, tensor, shape, dtype):
        if not (math.isfinite(tensor.scale) and tensor.scale > 0):
            raise CodecError(f"scale {tensor.scale} must be finite and positive")
        if not -128 <= tensor.zero_point <= 127:
            raise CodecError(f"zero_point {tensor.zero_point} is outside [-128, 127]")
        count = math.prod(shape)
        _expect_bytes(tensor.data, count, f"{count} int8 values")
        wide = np.float64 if dtype.name == "float64" else np.float32
        values = np.frombuffer(tensor.data, dtype=np.int8).astype(wide)
        values = (values - tensor.zero_point) * wide(tensor.scale)
        return values.reshape(shape).astype(dtype.name, copy=False)


class TopK(Codec):
    """Keep the `fraction` of values largest in magnitude; the rest decode as 0.

    Args:
        fraction: share of each tensor's values to send, in (0, 1]. At least
            one value is always sent.
    """

    name = "topk"

    def __init__(self, fraction: float = 0.1):
        if not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"`fraction` must be in (0, 1], received {fraction!r}.")
        self.fraction = float(fraction)

    @property
    def spec(self):
        return f"topk:{self.fraction:g}"

    def __repr__(self):
        return f"TopK(fraction={self.fraction:g})"

    def encode(self, array, tensor):
        if not _compressible(array) or array.size >= 2**32:
            return Codec.encode(self, array, tensor)
        flat = array.reshape(-1)
        k = max(1, math.ceil(self.fraction * flat.size))
        keep = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
        keep.sort()
        tensor.codec = self.name
        tensor.indices = keep.astype("<u4").tobytes()
        tensor.data = flat[keep].astype(array.dtype.newbyteorder("<")).tobytes()

    def decode(self, tensor, shape, dtype):
        count = math.prod(shape)
        if len(tensor.indices) % 4:
            raise CodecError(f"{len(tensor.indices)} bytes of indices, not a whole number of "
                             "uint32 values")
        indices = np.frombuffer(tensor.indices, dtype="<u4").astype(np.int64)
        if indices.size > count:
            raise CodecError(f"{indices.size} indices for a tensor of {count} values")
        if indices.size and (indices[-1] >= count or np.any(np.diff(indices) <= 0)):
            raise CodecError(f"indices must be strictly increasing and below {count}")
        little = dtype.newbyteorder("<")
        _expect_bytes(tensor.data, indices.size * little.itemsize,
                      f"{indices.size} {dtype.name} values")
        flat = np.zeros(count, dtype=dtype.name)
        flat[indices] = np.frombuffer(tensor.data, dtype=little)
        return flat.reshape(shape)


NONE = Codec()
_NAMED = {"none": Codec, "float16": Float16, "bfloat16": BFloat16, "int8": Int8, "topk": TopK}
NAMES = tuple(_NAMED)


def get(compression) -> Codec:
    """A codec from `None`, a name ("float16", "topk:0.05", ...) or a `Codec`."""
    if compression is None:
        return NONE
    if isinstance(compression, Codec):
        return compression
    if isinstance(compression, str):
        name, _, argument = compression.partition(":")
        if name in _NAMED:
            if not argument:
                return _NAMED[name]()
            if name == "topk":
                try:
                    return TopK(float(argument))
                except ValueError:
                    pass
    raise ValueError(
        f"Unknown compression {compression!r}. Expected None, one of {list(NAMES)}, "
        "'topk:FRACTION' (e.g. 'topk:0.05') or a keras_split.codecs.Codec."
    )


def decoder(name: str) -> Codec:
    """The codec that decodes tensors marked `name` (an empty name means "none")."""
    name = name or "none"
    if name not in _NAMED:
        raise CodecError(f"unknown codec {name!r}; known: {list(NAMES)}")
    return _NAMED[name]()


def roundtrip(codec: Codec, array) -> tuple[np.ndarray, int]:
    """Encode and decode `array`; return the result and the payload bytes sent.

    The in-process transport uses it so that a compiled codec has the same
    effect (and byte count) in one process as over the network.
    """
    array = np.asarray(array)
    tensor = pb.Tensor()
    codec.encode(array, tensor)
    used = decoder(tensor.codec)
    return used.decode(tensor, array.shape, array.dtype), len(tensor.data) + len(tensor.indices)
