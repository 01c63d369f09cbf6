"""Split-step messages as protobuf: `Activations` and `Reply` to and from the wire.

Every tensor goes through `keras_split_wire.tensors` (encode, and on receipt
the checks against the cut spec and the limits); this module adds what the
TensorFlow library's messages need beside the tensors: labels as a structure,
sample weights, logs in Keras's order, and outputs.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from keras_split.messages import MAX_TRACE, MODES, Activations, Mode, Reply
from keras_split_wire import PROTOCOL_VERSION, codecs
from keras_split_wire.proto import split_pb2 as pb
from keras_split_wire.tensors import (
    CutSpec,
    WireError,
    check_against_spec,
    decode,
    encode,
    spec_from_pb,
    spec_to_pb,
)

__all__ = ["PROTOCOL_VERSION", "CutSpec", "WireError", "check_against_spec", "decode", "encode",
           "request_from_pb", "request_to_pb", "reply_from_pb", "reply_to_pb", "spec_from_pb",
           "spec_to_pb"]


# -- messages ------------------------------------------------------------------


def _structure_to_pb(structure, field) -> bool:
    """Encode a label or output structure into the repeated `field`; True for a dict."""
    if structure is None:
        return False
    if isinstance(structure, dict):
        for k, v in structure.items():
            encode(v, name=str(k), into=field.add())
        return True
    for value in structure if isinstance(structure, (list, tuple)) else [structure]:
        encode(value, into=field.add())
    return False


def request_to_pb(session_id: str, message: Activations,
                  codec: codecs.Codec = codecs.NONE) -> pb.StepRequest:
    # Every tensor is encoded straight into its place in the message: one copy
    # of its bytes (numpy's), none more.
    request = pb.StepRequest(session_id=session_id, step=message.step, mode=message.mode,
                             reset_metrics=message.reset_metrics, trace=message.trace)
    for array in message.tensors:
        encode(array, codec=codec, into=request.activations.add())
    request.labels_are_dict = _structure_to_pb(message.labels, request.labels)
    if message.sample_weight is not None:
        encode(message.sample_weight, into=request.sample_weight.add())
    return request


def request_from_pb(request: pb.StepRequest, specs, max_batch_size: int,
                    codec: codecs.Codec = codecs.NONE) -> Activations:
    """Decode and validate a step request against the session's cut specs."""
    if request.mode not in MODES:
        raise WireError("mode", f"{request.mode!r}, expected one of {MODES}")
    if len(request.trace) > MAX_TRACE or not request.trace.isascii():
        raise WireError("trace", f"expected at most {MAX_TRACE} ASCII characters, received "
                                 f"{len(request.trace)} characters")
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
        if batch == 0:
            # An empty batch computes nothing useful and makes batch statistics
            # (BatchNormalization's mean and variance) NaN for every later step.
            raise WireError(f"activations[{i}]", "an empty batch (0 samples); send at least "
                                                 "one sample")
        if batch > max_batch_size:
            raise WireError(f"activations[{i}]", f"batch size {batch} exceeds the server's "
                                                 f"limit of {max_batch_size}")
        tensors.append(array)
    labels: Any = None
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
        if sample_weight.dtype.kind not in "fiu" or np.any(sample_weight < 0):
            # A negative weight turns the step into gradient ascent on the shared model.
            lowest = sample_weight.min() if sample_weight.size else None
            raise WireError("sample_weight", f"expected non-negative numbers, received dtype "
                                             f"{sample_weight.dtype.name} with minimum {lowest}")
    return Activations(step=request.step, mode=cast(Mode, request.mode), tensors=tuple(tensors),
                       labels=labels, sample_weight=sample_weight,
                       reset_metrics=request.reset_metrics, trace=request.trace)


def reply_to_pb(reply: Reply, codec: codecs.Codec = codecs.NONE) -> pb.StepReply:
    message = pb.StepReply(step=reply.step, logs=reply.logs, log_order=list(reply.logs))
    for gradient in reply.gradients:
        encode(gradient, codec=codec, into=message.gradients.add())
    message.outputs_are_dict = _structure_to_pb(reply.outputs, message.outputs)
    return message


def reply_from_pb(reply: pb.StepReply, max_elements: int,
                  codec: codecs.Codec = codecs.NONE) -> Reply:
    # Non-finite gradients pass: a diverging loss is the server's honest report,
    # and TerminateOnNaN on the client acts on it.
    gradients = tuple(decode(t, f"gradients[{i}]", max_elements, finite=False, codec=codec)
                      for i, t in enumerate(reply.gradients))
    outputs: Any = None
    if reply.outputs:
        # Predictions go to the user: writable arrays, not views of the message.
        arrays = [np.array(decode(t, f"outputs[{i}]", max_elements, finite=False))
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
