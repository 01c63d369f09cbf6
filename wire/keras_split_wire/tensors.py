"""Tensors on the wire: the cut spec, encode, decode, and validation.

A tensor is sent as its dtype name, shape and raw C-order little-endian bytes
(or a codec's fields, see `codecs`). Decoding checks everything before a
single TensorFlow op (or device kernel) can see the data: the dtype is one of
a fixed numeric set, the shape is non-negative and within limits, the byte
length equals the shape times the item size, the shape fits the negotiated
cut spec, a compressed tensor uses the negotiated codec and its fields fit it,
and floating-point values are finite. Anything else raises `WireError`, which
names the offending field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from keras_split_wire import codecs
from keras_split_wire.proto import split_pb2 as pb

# Numeric dtypes only: object, string and void dtypes could smuggle structure.
DTYPES = frozenset(
    ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"]
)
MAX_RANK = 8


@dataclass(frozen=True)
class CutSpec:
    """One tensor that crosses the cut.

    Attributes:
        name: the name the server half gives this input (the cut layer's name,
            with `:i` appended when the layer has several outputs).
        shape: the tensor's shape, batch dimension first (`None`).
        dtype: its dtype name, e.g. `"float32"`.
        bytes_per_sample: payload bytes one sample adds on the wire, or `None`
            when a non-batch dimension is unknown.
    """

    name: str
    shape: tuple
    dtype: str
    bytes_per_sample: int | None

    @classmethod
    def of(cls, name: str, dtype: str, shape) -> CutSpec:
        """A spec from a dtype name and a shape (`None` or -1 for unknown axes)."""
        shape = tuple(None if d is None or d < 0 else int(d) for d in shape)
        tail = shape[1:]
        nbytes = (None if any(d is None for d in tail)
                  else math.prod(tail) * np.dtype(dtype).itemsize)
        return cls(name=name, shape=shape, dtype=np.dtype(dtype).name, bytes_per_sample=nbytes)


class WireError(ValueError):
    """A message that does not decode to what the protocol allows."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


def encode(array, name: str = "", codec: codecs.Codec = codecs.NONE,
           into: pb.Tensor | None = None) -> pb.Tensor:
    """One array as a `Tensor` message; refuses dtypes the protocol does not carry.

    `into`, an empty `Tensor` inside a message (`request.activations.add()`),
    is filled in place: adding a finished `Tensor` to a message copies its
    bytes again (and costs more than the encoding, for a batch of activations).
    """
    array = np.asarray(array)
    dtype = array.dtype.name
    if dtype not in DTYPES:
        raise TypeError(f"Cannot send a {dtype} tensor; supported dtypes: {sorted(DTYPES)}. "
                        "Cast it first (e.g. `x.astype('float32')`).")
    tensor = pb.Tensor() if into is None else into
    tensor.name, tensor.dtype = name, dtype
    tensor.shape.extend(array.shape)
    codec.encode(array, tensor)
    return tensor


def element_count(shape) -> int:
    """The number of elements of `shape`, exact for any size (no int64 overflow)."""
    return math.prod(int(d) for d in shape)


def decode(tensor: pb.Tensor, field: str, max_elements: int, finite: bool = True,
           codec: codecs.Codec = codecs.NONE) -> np.ndarray:
    """Validate and decode one tensor; it may use `codec` or travel uncompressed."""
    if tensor.codec not in ("", "none", codec.name):
        raise WireError(field, f"codec {tensor.codec!r} was not negotiated; expected "
                               f"{sorted({'none', codec.name})}")
    if tensor.dtype not in DTYPES:
        raise WireError(field, f"dtype {tensor.dtype!r} is not allowed; expected one of "
                               f"{sorted(DTYPES)}")
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise WireError(field, f"invalid shape {shape}")
    count = element_count(shape)
    if count > max_elements:
        raise WireError(field, f"{count} elements exceed the limit of {max_elements}")
    if tensor.codec not in ("", "none") and tensor.dtype not in codecs.FLOAT_DTYPES:
        raise WireError(field, f"codec {tensor.codec!r} applies to floating-point tensors, "
                               f"not {tensor.dtype}")
    try:
        array = codecs.decoder(tensor.codec).decode(tensor, shape, np.dtype(tensor.dtype))
    except codecs.CodecError as error:
        raise WireError(field, str(error)) from None
    if finite and array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise WireError(field, "contains NaN or Inf")
    return array


def spec_to_pb(spec: CutSpec) -> pb.CutTensorSpec:
    return pb.CutTensorSpec(name=spec.name, dtype=spec.dtype,
                            shape=[-1 if d is None else d for d in spec.shape])


def spec_from_pb(spec: pb.CutTensorSpec) -> tuple[str, tuple]:
    return spec.dtype, tuple(None if d < 0 else d for d in spec.shape)


def check_against_spec(array: np.ndarray, spec: CutSpec, field: str, batch: int | None) -> None:
    """`array` must have the spec's dtype and shape (and `batch` samples, if given)."""
    if array.dtype.name != spec.dtype:
        raise WireError(field, f"dtype {array.dtype.name}, expected {spec.dtype} (cut "
                               f"tensor {spec.name!r})")
    if array.ndim != len(spec.shape):
        raise WireError(field, f"rank {array.ndim} (shape {array.shape}), expected rank "
                               f"{len(spec.shape)} {spec.shape}")
    for axis, (got, want) in enumerate(zip(array.shape[1:], spec.shape[1:], strict=True)):
        if want is not None and got != want:
            raise WireError(field, f"shape {array.shape}, expected {spec.shape} (axis "
                                   f"{axis + 1})")
    if batch is not None and array.shape[0] != batch:
        raise WireError(field, f"batch size {array.shape[0]}, but the activations have {batch}")


def check_outgoing(arrays, specs, what: str = "activations") -> None:
    """What a client is about to send must fit the cut it opened the session with.

    The server would refuse it anyway; checking first gives the error on the
    client's side, naming the tensor and both shapes, before any bytes travel.
    """
    arrays = [np.asarray(a) for a in arrays]
    if len(arrays) != len(specs):
        raise ValueError(f"{what}: {len(arrays)} tensors, but the cut has {len(specs)} "
                         f"({[s.name for s in specs]}).")
    batch = None
    for i, (array, spec) in enumerate(zip(arrays, specs, strict=True)):
        try:
            check_against_spec(array, spec, f"{what}[{i}]", batch)
        except WireError as error:
            raise ValueError(f"Cannot send {error}. The client half must produce what the "
                             "session was opened with.") from None
        batch = array.shape[0] if array.ndim else None
