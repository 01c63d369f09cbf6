"""A `Transport` to a `SplitServer` over gRPC: the client end of the link.

Connection, limits, retries and errors follow `keras_split_wire.rpc`, the
same policy the device runtime uses; tensors are encoded and checked by
`keras_split_wire.tensors` (through `keras_split.network.convert`).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any

import grpc
import numpy as np

from keras_split.messages import Activations, Reply
from keras_split.network import convert as wire
from keras_split.transport import Pending, Transport
from keras_split_wire import PROTOCOL_VERSION, codecs, rpc
from keras_split_wire.proto import split_pb2 as pb
from keras_split_wire.proto import split_pb2_grpc as pb_grpc
from keras_split_wire.rpc import ServerError
from keras_split_wire.tensors import CutSpec, check_outgoing

__all__ = ["GrpcTransport", "ServerError"]


class GrpcTransport(Transport):
    """Client end of the gRPC link.

    Args:
        address: the server's "host:port".
        token: this client's bearer token; None with mutual TLS alone.
        root_certificates: PEM (bytes or path) of the CA that signed the server's
            certificate; None uses the system's roots.
        certificate, private_key: this client's PEM certificate and key, for
            servers that require mutual TLS.
        insecure: connect without TLS (only to a server started with insecure=True).
        compression: codec for the cut tensors both ways: None, "float16",
            "bfloat16", "int8", "topk", "topk:FRACTION" or a `codecs.Codec`.
            Agreed with the server when the session opens.
        timeout: deadline of each call, seconds.
        retry_for: how long to keep retrying a call that fails with UNAVAILABLE
            (the server restarting, a network blip), seconds; 0 never retries.
            Waits between attempts grow exponentially from `backoff` seconds
            up to `max_backoff`, with random jitter so that many clients do
            not return at the same instant.
        tls_hint: how the user names the CA, for the TLS error: the Python
            argument ("root_certificates", the default) or a command-line flag
            ("--ca").
        stream: send the steps on one long-lived `Steps` stream (the default;
            less cost per step than a call each) rather than one `Step` call
            per step. Either way, the same checks, retries and errors; a
            dropped stream is replaced by a fresh one, and a server without
            `Steps` (an older one) is sent `Step` calls.

    Byte counters count the serialized request and reply messages: what is sent.
    """

    def __init__(self, address: str, token: str | None, root_certificates=None, certificate=None,
                 private_key=None, insecure: bool = False, compression=None,
                 timeout: float = 30.0, retry_for: float = 60.0, backoff: float = 0.1,
                 max_backoff: float = 2.0, tls_hint: str = "root_certificates",
                 stream: bool = True):
        super().__init__()
        self.address = address
        self.codec = codecs.get(compression)
        self._metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        self._credentials = None if insecure else rpc.credentials(
            root_certificates, certificate, private_key)
        self.tls_hint = tls_hint
        self.policy = rpc.Retry(timeout=timeout, retry_for=retry_for, backoff=backoff,
                                max_backoff=max_backoff)
        self._channel: grpc.Channel | None = None
        self._stub: Any = None  # generated, untyped
        self.stream = stream
        self._steps: rpc.Stream | None = None
        self.session_id: str | None = None
        self._specs: list[CutSpec] = []
        self._max_elements = 0
        self._flight: collections.deque[_InFlight] = collections.deque()
        self._last_reply = 0.0  # when the stream last answered (monotonic)

    # The retry policy's fields, readable and settable one by one.
    timeout = property(lambda self: self.policy.timeout,
                       lambda self, v: self._set_policy(timeout=v))
    retry_for = property(lambda self: self.policy.retry_for,
                         lambda self, v: self._set_policy(retry_for=v))

    def _set_policy(self, **changes) -> None:
        self.policy = dataclasses.replace(self.policy, **changes)
        if self._steps is not None:
            self._steps.policy = self.policy

    def open(self, specs, resume: tuple[str, int] | None = None) -> int:
        """Connect and agree on the protocol version, the cut and the codec.

        `resume=(session_id, step)` reopens a session after this client
        restarted from a checkpoint taken at `step`. Returns the last step the
        server holds for the session (0 for a new one).
        """
        self._specs = list(specs)
        self.close()
        limit = rpc.message_limit([s.bytes_per_sample for s in self._specs], rpc.CLIENT_MAX_BATCH)
        self._channel = rpc.channel(self.address, limit, self._credentials,
                                    self.policy.max_backoff)
        self._stub = pb_grpc.SplitLearningStub(self._channel)
        request = pb.OpenRequest(protocol_version=PROTOCOL_VERSION, codec=self.codec.spec,
                                 cut=[wire.spec_to_pb(s) for s in self._specs])
        if resume is not None:
            request.resume_session, request.client_step = resume
        reply = self._call(self._stub.Open, request)
        self.session_id = reply.session_id
        if self.stream:
            self._steps = rpc.Stream(self._stub.Steps, self._metadata, self.policy,
                                     self.address, tls_hint=self.tls_hint)
        per_sample = max(1, max(s.bytes_per_sample or 1 for s in self._specs))
        self._max_elements = reply.max_batch_size * per_sample
        return reply.last_step

    def _call(self, method, request):
        return rpc.call(method, request, self._metadata, self.policy, self.address,
                        tls_hint=self.tls_hint)

    def _request(self, message: Activations):
        if self.session_id is None:
            raise RuntimeError("The transport is not open: call open(cut_specs) first.")
        if message.tensors:
            check_outgoing(message.tensors, self._specs)
        return wire.request_to_pb(self.session_id, message, self.codec)

    def _exchange(self, message: Activations) -> tuple[Reply, int, int]:
        if self._flight:
            raise RuntimeError(f"exchange() with {len(self._flight)} submitted step(s) still "
                               "in flight: read their results first")
        request = self._request(message)
        reply = None
        if self._steps is not None:
            try:
                reply = self._steps.exchange(request)
                self._last_reply = time.monotonic()
            except rpc.StreamUnsupported:  # an older server: one call per step
                self._steps.close()
                self._steps = None
        if reply is None:
            reply = self._call(self._stub.Step, request)
        decoded = wire.reply_from_pb(reply, self._max_elements, self.codec)
        return decoded, request.ByteSize(), reply.ByteSize()

    # A stream quiet for longer than this may have died while idle: the first
    # step after such a pause goes as one exchange (retried on a fresh stream),
    # and only the steps after it are sent ahead.
    _QUIET = 1.0

    def submit(self, message: Activations) -> Pending:
        """Write the step on the stream and return at once; `result()` reads its
        reply (replies come in order; read the oldest first).

        The server reads a stream's messages one at a time, in order, so the
        steps sent ahead wait in the link and the server's receive buffer
        while it works: the round trip of one step overlaps the next steps.
        The first step after a pause (or on a new stream, or with no stream:
        an older server) goes as a plain `exchange`, with its retries.

        When the stream fails with steps in flight, they are sent again, in
        order, on a fresh stream (with the usual retries): a server whose
        `replay_window` covers them answers the ones it had applied from its
        cache and applies the others, so nothing is applied twice. A server
        with a smaller window (the default keeps one reply) refuses a step it
        can no longer answer, changing nothing, and that step's `result()`
        raises `LinkDownError` naming the steps lost. A refused step raises
        its error from its `result()` and loses the steps sent after it (the
        server ended the stream at the refusal and never read them). Either
        way the transport is left ready for new steps.
        """
        quiet = time.monotonic() - self._last_reply > self._QUIET
        if self._steps is None or (not self._flight and (quiet or not self._steps_open())):
            return super().submit(message)
        request = self._request(message)
        self._steps.send(request)
        pending = _InFlight(self, message.step, request)
        self._flight.append(pending)
        return pending

    def _steps_open(self) -> bool:
        return self._steps is not None and self._steps._call is not None

    def _receive(self, pending: _InFlight) -> Reply:
        """The reply of the oldest step in flight (see `submit`)."""
        if not self._flight or self._flight[0] is not pending:
            raise RuntimeError("Read the results of submitted steps in the order they were "
                               "submitted.")
        assert self._steps is not None  # noqa: S101 - set while steps are in flight
        if pending.raw is None and pending.error is None:
            try:
                pending.raw = self._steps.receive()
            except rpc.LinkDownError as error:
                self._resend(error)
            except ServerError:
                self._flight.clear()
                raise
        if pending.error is not None:
            self._flight.clear()
            raise pending.error
        raw = pending.raw
        assert raw is not None  # noqa: S101 - set by receive() or _resend()
        self._flight.popleft()
        self._last_reply = time.monotonic()
        decoded = wire.reply_from_pb(raw, self._max_elements, self.codec)
        self.bytes.up += pending.sent
        self.bytes.down += raw.ByteSize()
        if decoded.step != pending.step:
            raise RuntimeError(
                f"The server answered step {decoded.step} to step {pending.step}; the "
                "transport lost track of the conversation.")
        return decoded

    def _resend(self, error: rpc.LinkDownError) -> None:
        """After the stream failed with steps in flight: send those steps again,
        in order, one exchange each on a fresh stream (with the usual retries).
        A server whose `replay_window` holds them answers the ones it applied
        from its cache and applies the rest; a step it can no longer answer
        (or refuses) fails with that error, and the steps after it are lost."""
        assert self._steps is not None  # noqa: S101
        for index, pending in enumerate(self._flight):
            if pending.raw is not None:
                continue
            try:
                pending.raw = self._steps.exchange(pending.request)
            except ServerError as again:
                lost = [p.step for p in list(self._flight)[index:]]
                if isinstance(again, rpc.RejectedError):
                    pending.error = again
                else:
                    pending.error = rpc.LinkDownError(
                        f"{error} Steps {lost} were in flight and sending them again "
                        f"failed: {again} (a server keeps replies to resend for "
                        "`replay_window` steps; give it at least the pipeline's depth). "
                        "Restart the fit.")
                return

    def turn(self, ready_for: int):
        """Ask the server's coordinator to train (see `keras_split.configurations.rounds`);
        waits, asking again, until told to go or that no rounds are left.
        Returns (round, weights) or None when finished."""
        while True:
            reply = self._call(self._stub.Turn, pb.TurnRequest(session_id=self.session_id,
                                                               round=ready_for))
            if reply.finished:
                return None
            if reply.go:
                limit = sum(int(np.prod(t.shape)) for t in reply.weights) or 1
                return reply.round, [wire.decode(t, f"weights[{i}]", limit)
                                     for i, t in enumerate(reply.weights)]

    def report(self, round_: int, weights, samples: int) -> int:
        """Hand the trained client half back for `round_`."""
        request = pb.ReportRequest(session_id=self.session_id, round=round_, samples=samples,
                                   weights=[wire.encode(np.asarray(w)) for w in weights])
        return self._call(self._stub.Report, request).round

    def abandon(self) -> None:
        """Drop the stream with the steps in flight (their replies are never
        read; the server may have applied some). The next step opens a new one."""
        if self._flight:
            self._flight.clear()
            if self._steps is not None:
                self._steps._drop()

    def close(self) -> None:
        self._flight.clear()
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class _InFlight(Pending):
    """A step written on the stream, its reply not yet read."""

    def __init__(self, transport: GrpcTransport, step: int, request: Any):
        self._transport, self.step, self.request = transport, step, request
        self.sent = request.ByteSize()
        self.raw: Any = None                  # the reply message, once read
        self.error: BaseException | None = None
        self._received: Reply | None = None

    def result(self) -> Reply:
        if self._received is None:
            self._received = self._transport._receive(self)
        return self._received
