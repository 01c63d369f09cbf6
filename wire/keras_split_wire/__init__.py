"""keras_split_wire: the wire contract of keras_split, without TensorFlow.

What crosses between a client (the TensorFlow library or a device) and a
split server is defined here once: the protobuf messages (`proto`), the
compression codecs (`codecs`), how a tensor is encoded and what every received
tensor is checked against (`tensors`), the RPC policy (`rpc`: PEM files,
channel options, the message-size rule, retries, errors with a fix), and the
names an exported client half uses (`device_names`).

It depends on numpy, protobuf and grpcio only.
"""

PROTOCOL_VERSION = 1
"""The protocol version a client proposes at `Open`; the server refuses others."""

SERVICE = "keras_split.v1.SplitLearning"
"""The gRPC service's full name (methods are `/SERVICE/Open`, `/SERVICE/Step`, ...)."""

__version__ = "0.1.0"

__all__ = ["PROTOCOL_VERSION", "SERVICE"]
