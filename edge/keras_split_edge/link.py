"""The device's link to a keras_split server: the protocol of `keras_split_wire`.

Everything that crosses is defined once in `keras_split_wire`, shared with the
TensorFlow client: the messages, the codecs, the checks on every tensor sent
and received, the message limit derived from the cut, the retry policy, and
errors that say how to fix them. Security as on the TensorFlow client: TLS
unless `insecure=True`, a bearer token and/or a client certificate, a deadline
on every call, retries only for UNAVAILABLE.
"""

from __future__ import annotations

import random
import time

import grpc
import numpy as np

from keras_split_wire import PROTOCOL_VERSION, codecs, device_names, rpc
from keras_split_wire.proto import split_pb2 as pb
from keras_split_wire.proto import split_pb2_grpc as pb_grpc
from keras_split_wire.rpc import ServerError
from keras_split_wire.tensors import (
    CutSpec,
    WireError,
    check_against_spec,
    check_outgoing,
    decode,
    encode,
    spec_to_pb,
)


class LinkError(ServerError):
    """The server's reply does not fit the protocol (a refusal by the server raises
    the `keras_split_wire.rpc.ServerError` subclass for its status)."""


class ServerLink:
    """One session with a split server.

    Args:
        address: "host:port". token: bearer token (None with mutual TLS alone).
        root_certificates, certificate, private_key: PEM bytes or paths.
        insecure: no TLS (only against a server started insecure).
        compression: "float16", "bfloat16", "int8", "topk[:F]" or None.
        timeout: deadline per call (s); retry_for: retry budget for UNAVAILABLE (s).
        tls_hint: how the user names the CA, for the TLS error (a flag on the
            command line, an argument in Python).

    After `open`, `message_limit` is the largest message either way, derived
    from the cut (`keras_split_wire.rpc.message_limit`).

    Byte counters count serialized messages: `bytes_up`/`bytes_down` the steps
    (`exchange`), `round_bytes_up`/`round_bytes_down` the rounds' calls (`turn`,
    `report`: the client half handed out and handed back, and every "ask
    again"), `open_bytes` the `Open` calls (both ways).
    """

    def __init__(self, address, token=None, root_certificates=None, certificate=None,
                 private_key=None, insecure=False, compression=None, timeout=30.0,
                 retry_for=60.0, tls_hint="root_certificates"):
        self.address = address
        self.codec = codecs.get(compression)
        self.metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        self.policy = rpc.Retry(timeout=timeout, retry_for=retry_for)
        self.tls_hint = tls_hint
        self._credentials = None if insecure else rpc.credentials(
            root_certificates, certificate, private_key)
        self._channel = None
        self._stub = None
        self.specs: list[CutSpec] = []
        self.session_id = None
        self.step = 0
        self.max_batch_size = 0
        self.message_limit = 0
        self.bytes_up = self.bytes_down = 0
        self.round_bytes_up = self.round_bytes_down = 0
        self.open_bytes = 0

    def _call(self, method, request):
        return rpc.call(method, request, self.metadata, self.policy, self.address,
                        tls_hint=self.tls_hint)

    def open(self, cut_specs, resume: tuple[str, int] | None = None) -> int:
        """Start a session: protocol version, the cut (dtype, shape) and the codec.

        `cut_specs` are `(dtype, shape)` pairs with -1 for the batch axis.
        `resume=(session_id, step)` reopens a session this device held before,
        at the step it saved: the next step it sends is `step + 1`, either a new
        one or, when the server returns `step + 1` (it applied a step the device
        crashed before saving), the same batch again, answered from the
        server's cache and applied once.
        Returns the last step the server holds for the session.
        """
        self.specs = [CutSpec.of(device_names.cut(i), dtype, shape)
                      for i, (dtype, shape) in enumerate(cut_specs)]
        if self._channel is None:
            # The largest message both ways, from the cut (never a fixed default).
            self.message_limit = rpc.message_limit([s.bytes_per_sample for s in self.specs],
                                                   rpc.CLIENT_MAX_BATCH)
            self._channel = rpc.channel(self.address, self.message_limit, self._credentials,
                                        self.policy.max_backoff)
            self._stub = pb_grpc.SplitLearningStub(self._channel)
        request = pb.OpenRequest(protocol_version=PROTOCOL_VERSION, codec=self.codec.spec,
                                 cut=[spec_to_pb(s) for s in self.specs])
        if resume is not None:
            request.resume_session, request.client_step = resume
        reply = self._call(self._stub.Open, request)
        self.open_bytes += request.ByteSize() + reply.ByteSize()
        self.session_id = reply.session_id
        self.step = reply.last_step if resume is None else resume[1]
        self.max_batch_size = reply.max_batch_size
        return reply.last_step

    def exchange(self, mode, activations, labels=None, reset_metrics=False):
        """Send one step; returns (gradients, logs)."""
        if self.session_id is None:
            raise RuntimeError("The link is not open: call open(cut_specs) first.")
        activations = [np.asarray(a) for a in activations]
        check_outgoing(activations, self.specs)
        self.step += 1
        request = pb.StepRequest(
            session_id=self.session_id, step=self.step, mode=mode,
            activations=[encode(a, codec=self.codec) for a in activations],
            labels=[] if labels is None else [encode(labels)], reset_metrics=reset_metrics)
        try:
            reply = self._call(self._stub.Step, request)
        except ServerError:
            self.step -= 1  # nothing was applied: the next step reuses the number
            raise
        if reply.step != self.step:
            raise LinkError(f"the server answered step {reply.step} to step {self.step}")
        self.bytes_up += request.ByteSize()
        self.bytes_down += reply.ByteSize()
        gradients = []
        if mode == "train":
            if len(reply.gradients) != len(activations):
                raise LinkError(f"{len(reply.gradients)} gradients for {len(activations)} cut "
                                "tensors")
            for i, (tensor, sent) in enumerate(zip(reply.gradients, activations, strict=True)):
                field = f"gradients[{i}]"
                try:
                    # Non-finite gradients pass, as on the TensorFlow client: a
                    # diverging loss is the server's honest report.
                    gradient = decode(tensor, field, sent.size, finite=False, codec=self.codec)
                    if gradient.dtype.kind != "f":
                        raise WireError(field, f"dtype {gradient.dtype.name}, expected a float "
                                               "dtype")
                    if gradient.shape != sent.shape:
                        raise WireError(field, f"shape {gradient.shape}, expected {sent.shape}")
                except WireError as error:
                    raise LinkError(str(error)) from None
                gradients.append(gradient)
        if sorted(reply.log_order) != sorted(reply.logs):
            raise LinkError(f"log_order {list(reply.log_order)} does not list the log names "
                            f"{sorted(reply.logs)}")
        logs = {name: reply.logs[name] for name in reply.log_order}
        return gradients, logs

    def turn(self, ready_for: int, max_elements: int, timeout: float | None = None):
        """One `Turn` call: ask the server's coordinator to train in round
        `ready_for` or later. The server answers at once when this client goes
        or the rounds are over, else after its long poll ("ask again").

        `max_elements`: the most elements the handed-out weights may hold (the
        device's client half's size). `timeout`: a deadline for this call
        alone; when it passes, the call is cancelled and counts as "ask again"
        (the server has still taken this client as a member: a short probe
        joins without waiting for the long poll). A server at its limit of
        calls (RESOURCE_EXHAUSTED) refused the call before reading it: it is
        asked again after a jittered backoff, for up to `retry_for` seconds.

        Returns:
            `(go, round, weights, finished)`; `weights` (numpy arrays, in
            `get_weights()` order) only when `go`.
        """
        if self.session_id is None:
            raise RuntimeError("The link is not open: call open(cut_specs) first.")
        request = pb.TurnRequest(session_id=self.session_id, round=ready_for)
        reply = self._round_call(self._stub.Turn, request, timeout)
        if reply is None:  # the probe's deadline passed
            return False, 0, [], False
        weights = []
        if reply.go:
            try:
                weights = [decode(t, f"weights[{i}]", max_elements)
                           for i, t in enumerate(reply.weights)]
            except WireError as error:
                raise LinkError(str(error)) from None
        return reply.go, reply.round, weights, reply.finished

    def report(self, round_: int, weights, samples: int) -> int:
        """Hand the trained client half back for `round_` (`Report`), with the
        number of samples it trained on (its FedAvg weight). Returns the round
        the server is in now."""
        if self.session_id is None:
            raise RuntimeError("The link is not open: call open(cut_specs) first.")
        request = pb.ReportRequest(session_id=self.session_id, round=round_, samples=samples,
                                   weights=[encode(np.asarray(w)) for w in weights])
        return self._round_call(self._stub.Report, request).round

    def _round_call(self, method, request, timeout=None):
        """`rpc.call` with the rounds' two additions: a probe's deadline, and
        RESOURCE_EXHAUSTED (many clients waiting at once) retried."""
        policy = self.policy if timeout is None else rpc.Retry(
            timeout=timeout, retry_for=self.policy.retry_for, backoff=self.policy.backoff,
            max_backoff=self.policy.max_backoff)

        def attempt(message, metadata, timeout):
            try:
                return method(message, metadata=metadata, timeout=timeout)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise _Busy(error.details() or "") from None
                if probe and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise _Unanswered from None
                raise

        probe = timeout is not None
        delay, give_up = self.policy.backoff, time.monotonic() + self.policy.retry_for
        while True:
            try:
                reply = rpc.call(attempt, request, self.metadata, policy, self.address,
                                 tls_hint=self.tls_hint)
                break
            except _Unanswered:
                self.round_bytes_up += request.ByteSize()
                return None
            except _Busy as busy:
                if time.monotonic() >= give_up:
                    raise ServerError(f"The server is at a limit: {busy} (for "
                                      f"{self.policy.retry_for:g} s of retrying).") from None
                time.sleep(random.uniform(0, delay))  # noqa: S311 - jitter
                delay = min(delay * 2, self.policy.max_backoff)
        self.round_bytes_up += request.ByteSize()
        self.round_bytes_down += reply.ByteSize()
        return reply

    def close(self):
        if self._channel is not None:
            self._channel.close()


class _Busy(Exception):
    """The server refused a call at its limit of calls (RESOURCE_EXHAUSTED)."""


class _Unanswered(Exception):
    """A probe's deadline passed before the server answered."""


def evaluate_batches(model, link: ServerLink, x, y, batch_size: int) -> dict:
    """The server's loss and metrics on (x, y): `model`'s inference-mode cut
    activations, batch by batch, sent in "evaluate" mode (nothing trains); the
    first batch resets the server's metrics. Returns the last reply's logs."""
    logs: dict = {}
    x, y = np.asarray(x), np.asarray(y)
    for index, start in enumerate(range(0, len(x), batch_size)):
        activations = model.infer([x[start:start + batch_size]])
        _, logs = link.exchange("evaluate", activations, y[start:start + batch_size],
                                reset_metrics=index == 0)
    return logs


__all__ = ["LinkError", "ServerLink", "check_against_spec", "evaluate_batches"]
