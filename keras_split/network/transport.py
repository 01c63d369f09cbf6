"""A `Transport` to a `SplitServer` over gRPC, and the network `SplitClient`."""

from __future__ import annotations

import itertools
import logging
import random
import time
from pathlib import Path

import grpc
import keras
import numpy as np

from keras_split import checkpoint, codecs, trainer, wire
from keras_split.messages import Activations, Reply
from keras_split.partition import CutSpec, spec_of
from keras_split.proto import split_pb2 as pb
from keras_split.proto import split_pb2_grpc as pb_grpc
from keras_split.roles import ClientRole
from keras_split.server import _read, message_limit
from keras_split.transport import Transport

logger = logging.getLogger("keras_split.client")


class ServerError(RuntimeError):
    """The server refused a call for a reason retrying cannot fix."""


_FAIL_FAST = {
    grpc.StatusCode.UNAUTHENTICATED: (
        PermissionError, "The server refused our credentials ({details}). Check the token "
                         "(and client certificate, with mutual TLS)."),
    grpc.StatusCode.PERMISSION_DENIED: (PermissionError, "The server denied the call: {details}."),
    grpc.StatusCode.INVALID_ARGUMENT: (ValueError, "The server rejected the message: {details}."),
    grpc.StatusCode.FAILED_PRECONDITION: (ServerError, "The server refused: {details}."),
    grpc.StatusCode.NOT_FOUND: (ServerError, "The server does not know this session: {details}."),
}


def _is_tls_failure(details: str) -> bool:
    # gRPC reports a failed handshake as UNAVAILABLE, like a server that is
    # down; retrying a certificate problem only delays the error.
    text = details.lower()
    return any(word in text for word in ("ssl", "tls", "handshake", "certificate"))


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

    Byte counters count the serialized request and reply messages: what is sent.
    """

    def __init__(self, address: str, token: str | None, root_certificates=None, certificate=None,
                 private_key=None, insecure: bool = False, compression=None,
                 timeout: float = 30.0, retry_for: float = 60.0, backoff: float = 0.1,
                 max_backoff: float = 2.0):
        super().__init__()
        self.address = address
        self.codec = codecs.get(compression)
        self._metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        self._insecure = insecure
        self._credentials = None if insecure else grpc.ssl_channel_credentials(
            root_certificates=_read(root_certificates), private_key=_read(private_key),
            certificate_chain=_read(certificate))
        self.timeout, self.retry_for = timeout, retry_for
        self.backoff, self.max_backoff = backoff, max_backoff
        self._channel = None
        self._stub = None
        self.session_id: str | None = None
        self._specs: list[CutSpec] = []
        self._max_elements = 0

    def open(self, specs, resume: tuple[str, int] | None = None) -> int:
        """Connect and agree on the protocol version, the cut and the codec.

        `resume=(session_id, step)` reopens a session after this client
        restarted from a checkpoint taken at `step`. Returns the last step the
        server holds for the session (0 for a new one).
        """
        self._specs = list(specs)
        limit = message_limit(self._specs, 1 << 16)
        options = [("grpc.max_receive_message_length", limit),
                   ("grpc.max_send_message_length", limit),
                   # gRPC's own reconnect backoff grows to two minutes by
                   # default; a restarted server should be found within seconds.
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", int(self.max_backoff * 1000))]
        if self._insecure:
            self._channel = grpc.insecure_channel(self.address, options=options)
        else:
            self._channel = grpc.secure_channel(self.address, self._credentials, options=options)
        self._stub = pb_grpc.SplitLearningStub(self._channel)
        request = pb.OpenRequest(protocol_version=wire.PROTOCOL_VERSION, codec=self.codec.spec,
                                 cut=[wire.spec_to_pb(s) for s in self._specs])
        if resume is not None:
            request.resume_session, request.client_step = resume
        reply = self._call(self._stub.Open, request)
        self.session_id = reply.session_id
        per_sample = max(1, max(s.bytes_per_sample or 1 for s in self._specs))
        self._max_elements = reply.max_batch_size * per_sample
        return reply.last_step

    def _call(self, method, request):
        delay = self.backoff
        give_up = time.monotonic() + self.retry_for
        for attempt in itertools.count():
            try:
                return method(request, metadata=self._metadata, timeout=self.timeout)
            except grpc.RpcError as error:
                code = error.code()
                if code in _FAIL_FAST:
                    kind, text = _FAIL_FAST[code]
                    raise kind(text.format(details=error.details())) from None
                details = error.details() or ""
                if code == grpc.StatusCode.UNAVAILABLE and _is_tls_failure(details):
                    raise ConnectionError(
                        f"TLS handshake with {self.address} failed ({details}). Check that "
                        "root_certificates is the CA that signed the server's certificate, "
                        "and the client certificate if the server requires one."
                    ) from None
                if code != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= give_up:
                    raise ConnectionError(
                        f"Call to the split server at {self.address} failed: {code.name} "
                        f"({error.details()}) after {attempt + 1} attempt(s) in "
                        f"{self.retry_for:g} s of retrying."
                    ) from None
                # Jitter spreads the retries of many clients after a restart.
                time.sleep(random.uniform(0, delay))  # noqa: S311 - not cryptographic
                delay = min(delay * 2, self.max_backoff)

    def _exchange(self, message: Activations) -> tuple[Reply, int, int]:
        if self.session_id is None:
            raise RuntimeError("The transport is not open: call open(cut_specs) first.")
        request = wire.request_to_pb(self.session_id, message, self.codec)
        reply = self._call(self._stub.Step, request)
        decoded = wire.reply_from_pb(reply, self._max_elements, self.codec)
        return decoded, request.ByteSize(), reply.ByteSize()

    def turn(self, ready_for: int):
        """Ask the server's coordinator to train (see `keras_split.rounds`);
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

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


class SplitClient(trainer.LoopOwner):
    """The client half, training against a remote `SplitServer`.

    Same `compile`/`fit`/`evaluate`/`predict`, progress bar, `History` and byte
    counters as `SplitModel`; the loss and metrics live on the server.

    Args:
        model: the client half (`split.client`).
        server: the server's "host:port".
        token: this client's bearer token; None when the server identifies
            clients by their certificates (mutual TLS).
        checkpoint_dir: a folder for `client.ckpt`, rewritten after every
            training step: weights, optimizer state, step counter, session and
            the position in the data. A client compiled on a folder that holds
            a checkpoint restores it and rejoins its session; calling `fit`
            with the same data and arguments then carries on from the next
            batch, in the same shuffled order. Delete the folder to start over.
        durable_checkpoints: also flush each checkpoint to disk (survives power
            loss, not only a killed process; costs an fsync per step).
        root_certificates, certificate, private_key, insecure, compression,
            timeout, retry_for: as in `GrpcTransport`.
    """

    def __init__(self, model: keras.Model, server: str, token: str | None = None,
                 checkpoint_dir=None, durable_checkpoints: bool = False,
                 **transport_options):
        super().__init__()
        self.client = model
        self.cut_specs = tuple(spec_of(f"cut_{i}", t) for i, t in enumerate(model.outputs))
        self._transport_options = dict(server=server, token=token, **transport_options)
        self.checkpoint_path = None
        self._durable = durable_checkpoints
        if checkpoint_dir is not None:
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            self.checkpoint_path = Path(checkpoint_dir) / "client.ckpt"
        self._position = None

    @property
    def layers(self):
        return list(self.client.layers)

    def compile(self, optimizer="rmsprop", compression=None):
        """Set the client's optimizer and open the session with the server.

        `compression` chooses the codec of the cut tensors (see `GrpcTransport`);
        it overrides one given to the constructor. With a checkpoint in
        `checkpoint_dir`, the weights, optimizer state and session are restored
        from it first.
        """
        options = dict(self._transport_options)
        if compression is not None:
            options["compression"] = compression
        transport = GrpcTransport(options.pop("server"), options.pop("token"), **options)
        role = ClientRole(self.client, optimizer)
        role.build()
        resume = None
        if self.checkpoint_path is not None and self.checkpoint_path.exists():
            header = self._restore(role, transport.codec)
            resume = (header["session_id"], header["step"])
        last_step = transport.open(self.cut_specs, resume)
        self.client_role, self.transport = role, transport
        if resume is not None:
            # The server lined its session up with our step, or is one training
            # step ahead: we resend that step (same batch) and get its cached reply.
            if last_step not in (resume[1], resume[1] + 1):
                raise ServerError(f"The server resumed the session at step {last_step}, "
                                  f"this client's checkpoint is at step {resume[1]}.")
            self._step = resume[1]
        else:
            self._step = 0
            self._position = None
            self._save()

    def _restore(self, role: ClientRole, codec) -> dict:
        path = self.checkpoint_path
        header, arrays = checkpoint.read_for(path, "client", self.cut_specs)
        if header["codec"] != codec.spec:
            raise ValueError(
                f"{path} belongs to a session with compression {header['codec']!r}; compile "
                f"with the same compression (received {codec.spec!r}) or start over in a new "
                "checkpoint directory.")
        role.restore(arrays, path)
        self._position = header.get("position")
        return header

    def _save(self) -> None:
        if self.checkpoint_path is None:
            return
        header = {"party": "client", "cut": checkpoint.cut_of(self.cut_specs),
                  "step": self._step, "session_id": self.transport.session_id,
                  "codec": self.transport.codec.spec, "position": self._position}
        checkpoint.write(self.checkpoint_path, header, self.client_role.state(),
                         durable=self._durable)

    def _resume_position(self, fingerprint):
        position, self._position = self._position, None
        if position is None:
            return None
        if position["fingerprint"] != fingerprint:
            raise ValueError(
                f"This client's checkpoint ({self.checkpoint_path}) stopped in a fit with "
                f"{position['fingerprint']}, but this fit has {fingerprint}. Call fit with "
                "the same data and arguments to resume, or start over in a new checkpoint "
                "directory."
            )
        logger.info("Resuming fit at epoch %d, batch %d from %s.", position["epoch"] + 1,
                    position["batch"] + 1, self.checkpoint_path)
        return position

    def _after_train_step(self, position):
        self._position = position
        self._save()

    def _after_fit(self, finished):
        if finished:
            self._position = None
        self._save()

    def get_weights(self):
        return self.client.get_weights()

    def set_weights(self, weights):
        self.client.set_weights(weights)

    def train_rounds(self, x, y, batch_size=32, epochs_per_turn=1, seed=None, verbose=0,
                     on_turn=None):
        """Take part in the server's rounds (round-robin or SplitFed, see
        `keras_split.rounds`): for each turn, start from the client half the
        server hands out, train `epochs_per_turn` on (x, y), hand it back.
        `on_turn(round)` is called as each turn starts. Returns the rounds this
        client trained in."""
        self.require_compiled("train_rounds")
        trained, ready_for = [], 1
        while (turn := self.transport.turn(ready_for)) is not None:
            round_, weights = turn
            if on_turn is not None:
                on_turn(round_)
            self.set_weights(weights)
            self.fit(x, y, batch_size=batch_size, epochs=epochs_per_turn, seed=seed,
                     verbose=verbose)
            self.transport.report(round_, self.get_weights(), len(x))
            trained.append(round_)
            ready_for = round_ + 1
        return trained

    def save(self, filepath, overwrite=True):
        self.client.save(filepath, overwrite=overwrite)

    def save_weights(self, filepath, overwrite=True):
        self.client.save_weights(filepath, overwrite=overwrite)
