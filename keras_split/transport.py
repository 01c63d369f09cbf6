"""How messages travel between client and server.

A transport carries one `Activations` message to the server and brings its
`Reply` back. `InProcessTransport` hands the message to a `ServerRole` in the
same process; a network transport implements the same interface. Every
transport counts the payload bytes it carries in each direction.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass

from keras_split.messages import Activations, Reply, payload_bytes
from keras_split_wire import codecs


@dataclass
class ByteCounter:
    """Payload bytes carried so far, client to server (`up`) and back (`down`)."""

    up: int = 0
    down: int = 0

    def snapshot(self) -> tuple[int, int]:
        return self.up, self.down


class Transport(abc.ABC):
    """One client's link to the server.

    A transport implements one method, `_exchange`: deliver a message, return
    the reply and the bytes sent and received. `exchange` (what callers use)
    adds the byte counts and checks that the reply answers the message. A
    transport that wraps another (to keep labels back, record, or fail on
    purpose) shares the inner one's `bytes` and returns 0 bytes of its own.
    """

    def __init__(self):
        self.bytes = ByteCounter()

    def exchange(self, message: Activations) -> Reply:
        """Send `message` and return the server's reply, counting both directions."""
        reply, sent, received = self._exchange(message)
        self.bytes.up += sent
        self.bytes.down += received
        if reply.step != message.step:
            raise RuntimeError(
                f"The server answered step {reply.step} to step {message.step}; the "
                "transport lost track of the conversation."
            )
        return reply

    @abc.abstractmethod
    def _exchange(self, message: Activations) -> tuple[Reply, int, int]:
        """Deliver one message; return the reply and the bytes sent and received.

        Each transport counts what it really carries: the tensor payload in
        process, the serialized messages over a network.
        """

    def submit(self, message: Activations) -> Pending:
        """Send `message` without waiting for its reply; `result()` of what it
        returns gives the reply (what pipelined training uses, `fit(pipeline=D)`).

        Replies come back in the order their messages were submitted: a
        caller reads them oldest first. Bytes are counted as by `exchange`.
        This default runs `exchange` at once (a synchronous transport: the
        server has handled the message when `submit` returns, and a refusal
        raises here); a network transport overrides it to keep several
        messages on the wire (see `GrpcTransport.submit`).
        """
        return Pending(self.exchange(message))

    def abandon(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Forget the messages submitted and not yet read (a fit stopped by an
        error or an interrupt with steps in flight); the next message goes on
        a fresh link. A synchronous transport has none."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the link. The in-process transport holds nothing."""


class Pending:
    """A submitted message's reply, to be read once with `result()`.

    This one holds a reply already received; transports that keep messages
    in flight return their own kind, whose `result()` waits for the reply
    (and raises the transport's error when the step was refused or lost).
    """

    def __init__(self, reply: Reply):
        self._reply = reply

    def result(self) -> Reply:
        return self._reply


class InProcessTransport(Transport):
    """Delivers messages to a `ServerRole` living in this process.

    The server receives the arrays of the message only: never the client's
    model, graph or inputs.

    With a compression codec, the cut tensors go through the same encode and
    decode as on the network, and the byte counters count the encoded payload:
    a quick way to measure what a codec costs in accuracy and saves in bytes.

    Without one, and with a `ServerRole` at the other end, a training step runs
    the server's step inside the client's compiled call (`fused=True`, the
    default): the tensors go from one half to the other without leaving the
    graph, with the same checks, refusals and byte counts as a message.
    `fused=False` sends every step as a message. The two compute the same
    arithmetic; where TensorFlow's oneDNN rewrites fuse operations across the
    cut inside the one graph, the last bits can differ (EfficientNetB0 at its
    stem: 4e-5 relative on the cut gradient). With `TF_ENABLE_ONEDNN_OPTS=0`,
    or `fused=False`, each half rounds exactly as on its own.
    """

    def __init__(self, server, compression=None, fused: bool = True):
        super().__init__()
        self.server = server
        self.codec = codecs.get(compression)
        self.fused = fused

    @property
    def fuses(self) -> bool:
        """Whether a training step may run the server's step inside the client's
        compiled call (`protocol.train_step`): asked for, no codec on the way,
        and a plain `ServerRole` at the other end (a wrapper that rewrites
        messages or replies gets them one by one)."""
        from keras_split.roles import ServerRole

        return self.fused and self.codec is codecs.NONE and type(self.server) is ServerRole

    def _exchange(self, message: Activations) -> tuple[Reply, int, int]:
        if self.codec is codecs.NONE:
            reply = self.server.handle(message)
            return reply, message.nbytes, reply.nbytes
        tensors, sent = self._squeeze(message.tensors)
        message = dataclasses.replace(message, tensors=tensors)
        reply = self.server.handle(message)
        gradients, received = self._squeeze(reply.gradients)
        sent += payload_bytes(message.labels, message.sample_weight)
        received += payload_bytes(reply.outputs)
        return dataclasses.replace(reply, gradients=gradients), sent, received

    def _squeeze(self, arrays) -> tuple[tuple, int]:
        pairs = [codecs.roundtrip(self.codec, a) for a in arrays]
        return tuple(p[0] for p in pairs), sum(p[1] for p in pairs)
