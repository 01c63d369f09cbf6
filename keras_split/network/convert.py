"""Tensors and messages on the wire: encode, decode, and validate.

A tensor is sent as its dtype name, shape and raw C-order little-endian bytes.
Decoding checks everything before a single TensorFlow op can see the data:
the dtype is one of a fixed numeric set, the shape is non-negative and within
limits, the byte length equals the shape times the item size, the shape fits
the negotiated cut spec, a compressed tensor uses the negotiated codec and its
fields fit it (see `codecs`), and floating-point values are finite. Anything else
raises `WireError`, which names the offending field.
"""

from __future__ import annotations

import numpy as np

from keras_split import codecs
from keras_split.messages import MODES, Activations, Reply
from keras_split.partition import CutSpec
from keras_split.proto import split_pb2 as pb

PROTOCOL_VERSION = 1
# Numeric dtypes only: object, string and void dtypes could smuggle structure.
DTYPES = frozenset(
    ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"]
)
MAX_RANK = 8


class WireError(ValueError):
    """A message that does not decode to what the protocol allows."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


def encode(array, name: str = "", codec: codecs.Codec = codecs.NONE) -> pb.Tensor:
    array = np.asarray(array)
    dtype = array.dtype.name
    if dtype not in DTYPES:
        raise TypeError(f"Cannot send a {dtype} tensor; supported dtypes: {sorted(DTYPES)}.")
    tensor = pb.Tensor(name=name, dtype=dtype, shape=list(array.shape))
    codec.encode(array, tensor)
    return tensor


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
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
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


# -- messages ------------------------------------------------------------------


def _structure_to_pb(structure) -> tuple[list[pb.Tensor], bool]:
    if structure is None:
        return [], False
    if isinstance(structure, dict):
        return [encode(v, name=str(k)) for k, v in structure.items()], True
    if isinstance(structure, (list, tuple)):
        return [encode(v) for v in structure], False
    return [encode(structure)], False


def request_to_pb(session_id: str, message: Activations,
                  codec: codecs.Codec = codecs.NONE) -> pb.StepRequest:
    labels, labels_are_dict = _structure_to_pb(message.labels)
    weights = [] if message.sample_weight is None else [encode(message.sample_weight)]
    return pb.StepRequest(
        session_id=session_id, step=message.step, mode=message.mode,
        activations=[encode(a, codec=codec) for a in message.tensors], labels=labels,
        labels_are_dict=labels_are_dict, sample_weight=weights,
        reset_metrics=message.reset_metrics,
    )


def request_from_pb(request: pb.StepRequest, specs, max_batch_size: int,
                    codec: codecs.Codec = codecs.NONE) -> Activations:
    """Decode and validate a step request against the session's cut specs."""
    if request.mode not in MODES:
        raise WireError("mode", f"{request.mode!r}, expected one of {MODES}")
    if len(request.activations) != len(specs):
        raise WireError("activations", f"{len(request.activations)} tensors, the cut has "
                                       f"{len(specs)}")
    per_sample = max(1, max(int(np.prod([d or 1 for d in s.shape[1:]])) for s in specs))
    limit = max_batch_size * per_sample
    tensors = []
    batch = None
    for i, (tensor, spec) in enumerate(zip(request.activations, specs, strict=True)):
        array = decode(tensor, f"activations[{i}]", limit, codec=codec)
        check_against_spec(array, spec, f"activations[{i}]", batch)
        batch = array.shape[0]
        if batch > max_batch_size:
            raise WireError(f"activations[{i}]", f"batch size {batch} exceeds the server's "
                                                 f"limit of {max_batch_size}")
        tensors.append(array)
    labels = None
    if request.labels:
        decoded = []
        for i, tensor in enumerate(request.labels):
            array = decode(tensor, f"labels[{i}]", limit)
            if array.ndim == 0 or array.shape[0] != batch:
                raise WireError(f"labels[{i}]", f"shape {array.shape}, expected {batch} "
                                                f"samples first")
            decoded.append(array)
        if request.labels_are_dict:
            labels = {t.name: a for t, a in zip(request.labels, decoded, strict=True)}
        else:
            labels = decoded[0] if len(decoded) == 1 else decoded
    sample_weight = None
    if request.sample_weight:
        if len(request.sample_weight) != 1:
            raise WireError("sample_weight", "at most one tensor")
        sample_weight = decode(request.sample_weight[0], "sample_weight", limit)
        if sample_weight.shape[:1] != (batch,):
            raise WireError("sample_weight", f"shape {sample_weight.shape}, expected ({batch},)")
    return Activations(step=request.step, mode=request.mode, tensors=tuple(tensors),
                       labels=labels, sample_weight=sample_weight,
                       reset_metrics=request.reset_metrics)


def reply_to_pb(reply: Reply, codec: codecs.Codec = codecs.NONE) -> pb.StepReply:
    outputs, outputs_are_dict = _structure_to_pb(reply.outputs)
    gradients = [encode(g, codec=codec) for g in reply.gradients]
    return pb.StepReply(step=reply.step, gradients=gradients, logs=reply.logs,
                        log_order=list(reply.logs), outputs=outputs,
                        outputs_are_dict=outputs_are_dict)


def reply_from_pb(reply: pb.StepReply, max_elements: int,
                  codec: codecs.Codec = codecs.NONE) -> Reply:
    # Non-finite gradients pass: a diverging loss is the server's honest report,
    # and TerminateOnNaN on the client acts on it.
    gradients = tuple(decode(t, f"gradients[{i}]", max_elements, finite=False, codec=codec)
                      for i, t in enumerate(reply.gradients))
    outputs = None
    if reply.outputs:
        arrays = [decode(t, f"outputs[{i}]", max_elements, finite=False)
                  for i, t in enumerate(reply.outputs)]
        if reply.outputs_are_dict:
            outputs = {t.name: a for t, a in zip(reply.outputs, arrays, strict=True)}
        else:
            outputs = arrays[0] if len(arrays) == 1 else arrays
    # Keras reports logs in order (loss first, then the metrics as compiled);
    # a protobuf map has no order, so the reply lists it.
    if sorted(reply.log_order) != sorted(reply.logs):
        raise WireError("log_order", f"{list(reply.log_order)} does not list the log names "
                                     f"{sorted(reply.logs)}")
    logs = {name: reply.logs[name] for name in reply.log_order}
    return Reply(step=reply.step, gradients=gradients, logs=logs, outputs=outputs)
