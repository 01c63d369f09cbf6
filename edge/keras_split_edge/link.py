"""The device's link to a keras_split server: the same gRPC protocol as the
TensorFlow client (`keras_split/proto/split.proto`, version 1).

Security as on the TensorFlow client: TLS unless `insecure=True`, a bearer
token and/or a client certificate, a deadline on every call, retries only for
UNAVAILABLE (with jittered exponential backoff, for up to `retry_for` seconds),
and every tensor in a reply checked before use.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import grpc
import numpy as np

from keras_split_edge import codecs
from keras_split_edge.proto import split_pb2 as pb

PROTOCOL_VERSION = 1
_SERVICE = "/keras_split.v1.SplitLearning/"


class LinkError(RuntimeError):
    """The server refused a call, or its reply does not fit the protocol."""


def _read(value):
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def encode(array, codec=codecs.NONE, name="") -> pb.Tensor:
    array = np.asarray(array)
    tensor = pb.Tensor(name=name, dtype=array.dtype.name, shape=list(array.shape))
    codec.encode(array, tensor)
    return tensor


def decode_gradient(tensor: pb.Tensor, like: np.ndarray, codec, field: str) -> np.ndarray:
    """A cut gradient must have its activation's shape and a float dtype."""
    if tensor.codec not in ("", "none", codec.name):
        raise LinkError(f"{field}: codec {tensor.codec!r} was not negotiated")
    if tensor.dtype not in codecs.FLOAT_DTYPES:
        raise LinkError(f"{field}: dtype {tensor.dtype!r}, expected a float dtype")
    shape = tuple(int(d) for d in tensor.shape)
    if shape != like.shape:
        raise LinkError(f"{field}: shape {shape}, expected {like.shape}")
    try:
        return codecs.decoder(tensor.codec).decode(tensor, shape, np.dtype(tensor.dtype))
    except codecs.CodecError as error:
        raise LinkError(f"{field}: {error}") from None


class ServerLink:
    """One session with a split server.

    Args:
        address: "host:port". token: bearer token (None with mutual TLS alone).
        root_certificates, certificate, private_key: PEM bytes or paths.
        insecure: no TLS (only against a server started insecure).
        compression: "float16", "bfloat16", "int8", "topk[:F]" or None.
        timeout: deadline per call (s); retry_for: retry budget for UNAVAILABLE (s).
    """

    def __init__(self, address, token=None, root_certificates=None, certificate=None,
                 private_key=None, insecure=False, compression=None, timeout=30.0,
                 retry_for=60.0):
        self.address = address
        self.codec = codecs.get(compression)
        self.metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        self.timeout, self.retry_for = timeout, retry_for
        options = [("grpc.max_receive_message_length", 256 << 20),
                   ("grpc.max_send_message_length", 256 << 20),
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 2000)]
        if insecure:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                _read(root_certificates), _read(private_key), _read(certificate))
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._open = self._method("Open", pb.OpenReply)
        self._step = self._method("Step", pb.StepReply)
        self.session_id = None
        self.step = 0
        self.bytes_up = self.bytes_down = 0

    def _method(self, name, reply_type):
        return self._channel.unary_unary(_SERVICE + name,
                                         request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=reply_type.FromString)

    def _call(self, method, request):
        delay, give_up = 0.1, time.monotonic() + self.retry_for
        while True:
            try:
                return method(request, metadata=self.metadata, timeout=self.timeout)
            except grpc.RpcError as error:
                details = error.details() or ""
                retry = (error.code() == grpc.StatusCode.UNAVAILABLE
                         and not any(w in details.lower() for w in ("ssl", "tls", "handshake"))
                         and time.monotonic() < give_up)
                if not retry:
                    raise LinkError(f"{error.code().name}: {details}") from None
                time.sleep(random.uniform(0, delay))  # noqa: S311 - jitter, not crypto
                delay = min(delay * 2, 2.0)

    def open(self, cut_specs) -> None:
        """Start a session: protocol version, the cut (dtype, shape) and the codec."""
        request = pb.OpenRequest(protocol_version=PROTOCOL_VERSION, codec=self.codec.spec,
                                 cut=[pb.CutTensorSpec(name=f"cut_{i}", dtype=d, shape=s)
                                      for i, (d, s) in enumerate(cut_specs)])
        reply = self._call(self._open, request)
        self.session_id, self.step = reply.session_id, reply.last_step

    def exchange(self, mode, activations, labels=None, reset_metrics=False):
        """Send one step; returns (gradients, logs)."""
        self.step += 1
        request = pb.StepRequest(
            session_id=self.session_id, step=self.step, mode=mode,
            activations=[encode(a, self.codec) for a in activations],
            labels=[] if labels is None else [encode(labels)], reset_metrics=reset_metrics)
        reply = self._call(self._step, request)
        if reply.step != self.step:
            raise LinkError(f"the server answered step {reply.step} to step {self.step}")
        self.bytes_up += request.ByteSize()
        self.bytes_down += reply.ByteSize()
        if mode == "train" and len(reply.gradients) != len(activations):
            raise LinkError(f"{len(reply.gradients)} gradients for {len(activations)} cut "
                            "tensors")
        gradients = [] if mode != "train" else [
            decode_gradient(t, a, self.codec, f"gradients[{i}]")
            for i, (t, a) in enumerate(zip(reply.gradients, activations, strict=True))]
        logs = {name: reply.logs[name] for name in reply.log_order if name in reply.logs}
        return gradients, logs

    def close(self):
        self._channel.close()
