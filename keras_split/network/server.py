"""The split-learning server over gRPC.

Protocol, per client:

1. The client calls `Open` with the protocol version and its cut spec (name,
   dtype and shape of each tensor it will send). The server checks both against
   its own half and opens a session that belongs to that client.
2. For each step the client calls `Step` with the session id, a step number and
   the cut tensors (and labels). The server authenticates the caller before any
   handler runs, checks the session is the caller's, decodes and validates every
   tensor against the cut spec, and only then runs its `ServerRole`.
3. Step numbers make retries safe: a step equal to the last applied one gets
   the cached reply (the optimizer moves exactly once); an older or skipped one
   is refused with FAILED_PRECONDITION.

TLS is on unless `insecure=True`. Clients authenticate with a bearer token
(`authorization: Bearer <token>` metadata); with `client_ca`, the server also
requires a client certificate signed by that CA (mutual TLS).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import secrets
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc
import numpy as np
import tensorflow as tf

from keras_split import checkpoint
from keras_split.network import convert as wire
from keras_split.partition import CutSpec, spec_of
from keras_split.roles import GatheringRole, MessageHandler, PartyHandler, ServerRole
from keras_split_wire import codecs, rpc
from keras_split_wire.proto import split_pb2 as pb
from keras_split_wire.proto import split_pb2_grpc as pb_grpc

logger = logging.getLogger("keras_split.network.server")

def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """Refuse the call with `code` (`context.abort` raises; this says so to readers
    and type checkers)."""
    context.abort(code, details)
    raise AssertionError("grpc's context.abort returned")  # pragma: no cover


def message_limit(specs, max_batch_size: int) -> int:
    """Largest request the server accepts: derived from the cut, not a default."""
    return rpc.message_limit([s.bytes_per_sample for s in specs], max_batch_size)


class _TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a known bearer token before any handler work.

    With mutual TLS, the handshake has already refused clients without a
    certificate from the client CA, so a call may come without a token; a token
    that is presented must still be a known one.
    """

    def __init__(self, tokens: dict[str, str], certificates_suffice: bool):
        self._tokens = tokens
        self._certificates_suffice = certificates_suffice

    def presented(self, metadata) -> str | None:
        for key, value in metadata or ():
            if key == "authorization":
                return value
        return None

    def identify(self, metadata) -> str | None:
        value = self.presented(metadata)
        if value is not None and value.startswith("Bearer "):
            presented = value[len("Bearer "):].encode()
            for token, client_id in self._tokens.items():
                if hmac.compare_digest(presented, token.encode()):
                    return client_id
        return None

    def intercept_service(self, continuation, handler_call_details):
        metadata = handler_call_details.invocation_metadata
        allowed = (self.identify(metadata) is not None
                   or (self._certificates_suffice and self.presented(metadata) is None))
        if not allowed:
            def refuse(request, context):
                _abort(context, grpc.StatusCode.UNAUTHENTICATED,
                              "missing or unknown bearer token")
            return grpc.unary_unary_rpc_method_handler(refuse)
        return continuation(handler_call_details)


@dataclass
class _Session:
    client_id: str
    codec: codecs.Codec = codecs.NONE
    last_step: int = 0
    last_train_step: int = 0  # the last step that changed weights
    cached: pb.StepReply | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def header(self) -> dict:
        return {"client_id": self.client_id, "codec": self.codec.spec,
                "last_step": self.last_step, "last_train_step": self.last_train_step}

    def resume_at(self, client_step: int) -> str | None:
        """Line this session up with a client that restarted from its checkpoint.

        The client checkpoints after applying each training step. It may be
        one training step behind (it crashed before saving the reply's
        result): it resends that step and gets the cached reply. Steps after
        its checkpoint that changed no weights (evaluation, prediction) are
        simply forgotten. Anything else cannot be reconciled; returns why.
        """
        if self.last_train_step <= client_step <= self.last_step:
            if client_step != self.last_step:
                self.last_step, self.cached = client_step, None
            return None
        if client_step + 1 == self.last_train_step == self.last_step and self.cached:
            return None
        return (f"the server applied training step {self.last_train_step} (last step "
                f"{self.last_step}) but the client's checkpoint is at step {client_step}; "
                "the two checkpoints do not belong together")


class _Servicer(pb_grpc.SplitLearningServicer):
    def __init__(self, server: SplitServer):
        self.server = server

    def Open(self, request, context):  # noqa: N802 - gRPC method name
        client_id = self.server._client_id(context)
        if request.protocol_version != wire.PROTOCOL_VERSION:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                          f"protocol version {request.protocol_version} is not supported; "
                          f"the server speaks version {wire.PROTOCOL_VERSION}")
        try:
            codec = codecs.get(request.codec or None)
            accepted = codec.name in self.server.codecs
        except ValueError:
            accepted = False
        if not accepted:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                          f"compression {request.codec!r} is not accepted; this server accepts "
                          f"{sorted(self.server.codecs)}")
        mine = [(s.dtype, s.shape) for s in self.server._specs_for(client_id)]
        theirs = [wire.spec_from_pb(s) for s in request.cut]
        if mine != theirs:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                          f"cut mismatch: the client sends {theirs}, the server's half takes "
                          f"{mine}")
        if request.resume_session:
            return self._resume(request, codec, client_id, context)
        session_id = secrets.token_hex(16)
        with self.server._lock:
            self.server._sessions[session_id] = _Session(client_id=client_id, codec=codec)
        return pb.OpenReply(session_id=session_id, protocol_version=wire.PROTOCOL_VERSION,
                            last_step=0, max_batch_size=self.server.max_batch_size)

    def _resume(self, request, codec, client_id, context):
        with self.server._lock:
            session = self.server._sessions.get(request.resume_session)
        if session is None:
            _abort(context, grpc.StatusCode.NOT_FOUND,
                          "no such session to resume (was the server restarted without its "
                          "checkpoint directory?)")
        if session.client_id != client_id:
            _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                          "this session belongs to another client")
        if session.codec != codec:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                          f"the session was opened with compression {session.codec.spec!r}, "
                          f"not {codec.spec!r}")
        with session.lock, self.server._model_lock:
            problem = session.resume_at(request.client_step)
            if problem:
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"cannot resume: {problem}")
            self.server._save()
        return pb.OpenReply(session_id=request.resume_session,
                            protocol_version=wire.PROTOCOL_VERSION,
                            last_step=session.last_step,
                            max_batch_size=self.server.max_batch_size)

    def _session_of(self, request, context) -> tuple[str, _Session]:
        """The caller's client id and its session; anyone else's is refused."""
        client_id = self.server._client_id(context)
        with self.server._lock:
            session = self.server._sessions.get(request.session_id)
        if session is None:
            _abort(context, grpc.StatusCode.NOT_FOUND, "unknown session; call Open first")
        if session.client_id != client_id:
            _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                          "this session belongs to another client")
        return client_id, session

    def Step(self, request, context):  # noqa: N802 - gRPC method name
        client_id, session = self._session_of(request, context)
        with session.lock:
            if request.step == session.last_step and session.cached is not None:
                return session.cached  # a retransmission: answer again, apply nothing
            if request.step != session.last_step + 1:
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                              f"step {request.step} is stale or out of order; expected "
                              f"{session.last_step + 1}")
            try:
                message = wire.request_from_pb(request, self.server._specs_for(client_id),
                                               self.server.max_batch_size, session.codec)
            except wire.WireError as error:
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
            role = self.server.role
            with contextlib.ExitStack() as held:
                if isinstance(role, PartyHandler):
                    # A role that answers by party locks for itself: holding the
                    # model lock while it waits for the other parties of a step
                    # would stop them from reaching it.
                    reply = self._handle(context, role.handle_from, client_id, message)
                    held.enter_context(self.server._model_lock)
                else:
                    held.enter_context(self.server._model_lock)
                    reply = self._handle(context, role.handle, message)
                encoded = wire.reply_to_pb(reply, session.codec)
                session.last_step, session.cached = request.step, encoded
                if message.mode == "train":
                    session.last_train_step = request.step
                # Saved before the reply leaves: a client that got a reply can
                # always find its step applied after a crash.
                self.server._save()
            return encoded

    def _coordinator_of(self, request, context):
        client_id, _ = self._session_of(request, context)
        coordinator = self.server.coordinator
        if coordinator is None:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                          "this server runs no rounds (it has no coordinator)")
        return client_id, coordinator

    def Turn(self, request, context):  # noqa: N802 - gRPC method name
        client_id, coordinator = self._coordinator_of(request, context)
        go, round_, weights, finished = coordinator.turn(client_id, request.round)
        return pb.TurnReply(go=go, round=round_, finished=finished,
                            weights=[wire.encode(w) for w in weights])

    def Report(self, request, context):  # noqa: N802 - gRPC method name
        client_id, coordinator = self._coordinator_of(request, context)
        limit = sum(int(np.prod(w.shape)) for w in coordinator.weights)
        try:
            weights = [wire.decode(t, f"weights[{i}]", limit)
                       for i, t in enumerate(request.weights)]
            return pb.ReportReply(round=coordinator.report(client_id, request.round, weights,
                                                           request.samples))
        except wire.WireError as error:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except ValueError as error:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(error))

    @staticmethod
    def _handle(context, function, *arguments):
        try:
            return function(*arguments)
        except (ValueError, tf.errors.InvalidArgumentError) as error:
            # Data the checks above cannot judge (a label outside the classes,
            # say) fails in the loss, before any update.
            text = getattr(error, "message", None) or str(error)
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, text.splitlines()[0])
        except TimeoutError as error:
            _abort(context, grpc.StatusCode.ABORTED, str(error))
        except (ConnectionError, RuntimeError) as error:
            # A middle party's link downstream failed (or the party downstream
            # refused): say so upstream, instead of an opaque UNKNOWN.
            _abort(context, grpc.StatusCode.ABORTED, f"the party downstream failed: {error}")


class SplitServer:
    """Serve the server half of a split model to remote clients over gRPC.

    Args:
        model: the server half (a `keras.Model` whose inputs are the cut).
        loss, optimizer, metrics, loss_weights: as in `SplitModel.compile`.
        tokens: `{token: client_id}`; a client must present one of them. May be
            omitted with mutual TLS: the client certificate's common name is
            then the client id. With both, the token's client id must equal
            the certificate's common name.
        address: "host:port" to listen on ("127.0.0.1:0" picks a free port).
        certificate, private_key: PEM (bytes or a path) for TLS.
        client_ca: PEM of the CA that signs client certificates (mutual TLS).
        insecure: serve without TLS (logs a warning). Only for loopback tests.
        role: what handles the validated messages, instead of a `ServerRole`
            built from `loss`: a `RelayRole` makes this server a middle party of
            a chain (multi-hop), a `JoinLabels` the client's own last segment of
            a U-shaped chain. It needs `handle`, `state` and `restore`.
        max_batch_size: the largest batch a client may send; sets the message limit.
        checkpoint_dir: a folder for `server.ckpt`, rewritten after every step
            (before its reply is sent) and on `stop()`: weights, optimizer and
            metric state, and every session with its last step and reply. A
            server started on a folder that holds a checkpoint resumes from it,
            and its clients carry on where they were.
        durable_checkpoints: also flush each checkpoint to disk (survives power
            loss, not only a killed process; costs an fsync per step).
        coordinator: a `keras_split.configurations.rounds.RoundCoordinator`, to run rounds of
            many client processes (round-robin, SplitFed) through this server.
        allowed_compression: names of the codecs clients may choose (see
            `keras_split_wire.codecs`); all of them by default. "none" is always allowed.

    Example:

    ```python
    server = keras_split.SplitServer(split.server, loss="sparse_categorical_crossentropy",
                                     optimizer="adam", tokens={"s3cret": "hospital-a"},
                                     certificate="server.pem", private_key="server.key")
    server.start(); server.wait()
    ```
    """

    def __init__(self, model, loss=None, optimizer="rmsprop", metrics=None, loss_weights=None,
                 *, role=None,
                 tokens: dict[str, str] | None = None, address: str = "127.0.0.1:0",
                 certificate=None,
                 private_key=None, client_ca=None, insecure: bool = False,
                 max_batch_size: int = 1024, max_workers: int = 4,
                 allowed_compression=codecs.NAMES, checkpoint_dir=None,
                 durable_checkpoints: bool = False, coordinator=None):
        if not tokens and client_ca is None:
            raise ValueError(
                "Clients must authenticate: pass `tokens` ({token: client_id}), or `client_ca` "
                "for mutual TLS (client certificates name the clients), or both.")
        certificate = rpc.read_pem(certificate, "certificate")
        private_key = rpc.read_pem(private_key, "private key")
        if not insecure and (certificate is None or private_key is None):
            raise ValueError(
                "TLS is on by default: pass `certificate` and `private_key` (PEM bytes or "
                "paths), or insecure=True to serve in plaintext (loopback testing only)."
            )
        self.cut_specs: list[CutSpec] = [spec_of(t.name, t) for t in model.inputs]
        if role is None:
            if loss is None:
                raise ValueError("`SplitServer` needs a `loss` for its ServerRole, or a `role` "
                                 "(e.g. a keras_split.RelayRole for a middle party).")
            role = ServerRole(model, optimizer, loss, metrics, loss_weights)
        if not isinstance(role, (MessageHandler, PartyHandler)):
            raise TypeError(
                f"`role` must answer messages: a keras_split.roles.MessageHandler (`handle`, "
                f"`state`, `restore`) or PartyHandler (`handle_from`, `state`, `restore`); "
                f"received {type(role).__name__}, which has neither.")
        self.role = role
        parties = len(role.parties) if isinstance(role, GatheringRole) else 0
        if parties and max_workers <= parties:
            # Each party's call waits in a worker thread until all have arrived.
            max_workers = parties + 2
        self.max_batch_size = max_batch_size
        self.coordinator = coordinator
        unknown = set(allowed_compression) - set(codecs.NAMES)
        if unknown:
            raise ValueError(f"Unknown codecs in `allowed_compression`: {sorted(unknown)}; "
                             f"known: {list(codecs.NAMES)}.")
        self.codecs = frozenset(allowed_compression) | {"none"}
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._interceptor = _TokenInterceptor(dict(tokens or {}),
                                              certificates_suffice=client_ca is not None)
        self._mutual_tls = client_ca is not None
        self.checkpoint_path = None
        self._durable = durable_checkpoints
        if checkpoint_dir is not None:
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            self.checkpoint_path = Path(checkpoint_dir) / "server.ckpt"
            if self.checkpoint_path.exists():
                self._restore()
        limit = message_limit(self.cut_specs, max_batch_size)
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=[self._interceptor],
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit)],
        )
        pb_grpc.add_SplitLearningServicer_to_server(_Servicer(self), self._grpc)
        if insecure:
            logger.warning("Serving WITHOUT TLS on %s: traffic and tokens are readable by "
                           "anyone on the network path.", address)
            self.port = self._grpc.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(private_key, certificate)],
                root_certificates=rpc.read_pem(client_ca, "client CA"),
                require_client_auth=client_ca is not None,
            )
            self.port = self._grpc.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"Could not listen on {address!r}.")
        self.address = f"{address.rsplit(':', 1)[0]}:{self.port}"

    def start(self) -> SplitServer:
        self._grpc.start()
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop serving; steps in flight get `grace` seconds to finish. Then,
        with a checkpoint directory, write a final checkpoint."""
        self._grpc.stop(grace).wait()
        with self._model_lock:
            self._save()

    def _specs_for(self, client_id) -> list[CutSpec]:
        """The cut tensors this client sends: all of them, unless the role
        assigns each party its own (vertically partitioned data)."""
        if isinstance(self.role, GatheringRole):
            return list(self.role.specs_for(client_id, self.cut_specs))
        return self.cut_specs

    def _client_id(self, context) -> str:
        """Who is calling: the token's client id, the certificate's common name, or
        both when they agree."""
        by_token = self._interceptor.identify(context.invocation_metadata())
        if not self._mutual_tls:
            if by_token is None:  # the interceptor lets no such call through
                _abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
            return by_token
        names = context.auth_context().get("x509_common_name") or [b""]
        by_certificate = names[0].decode(errors="replace")
        if by_token is not None and by_token != by_certificate:
            _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                          f"the token belongs to {by_token!r} but the client certificate to "
                          f"{by_certificate!r}")
        return by_certificate

    def _save(self) -> None:
        if self.checkpoint_path is None:
            return
        with self._lock:
            sessions = dict(self._sessions)
        replies = {f"reply/{sid}": np.frombuffer(s.cached.SerializeToString(), np.uint8)
                   for sid, s in sessions.items() if s.cached is not None}
        header = {"party": "server", "cut": checkpoint.cut_of(self.cut_specs),
                  "sessions": {sid: s.header() for sid, s in sessions.items()}}
        checkpoint.write(self.checkpoint_path, header, {**self.role.state(), **replies},
                         durable=self._durable)

    def _restore(self) -> None:
        path = self.checkpoint_path
        header, arrays = checkpoint.read_for(path, "server", self.cut_specs)
        self.role.restore({k: v for k, v in arrays.items() if not k.startswith("reply/")}, path)
        for sid, fields in header["sessions"].items():
            session = _Session(client_id=fields["client_id"], codec=codecs.get(fields["codec"]),
                               last_step=fields["last_step"],
                               last_train_step=fields["last_train_step"])
            if f"reply/{sid}" in arrays:
                # Our own reply, serialized by this server: a protobuf, not a pickle.
                session.cached = pb.StepReply.FromString(arrays[f"reply/{sid}"].tobytes())
            self._sessions[sid] = session
        logger.info("Resumed from %s: %d session(s).", path, len(self._sessions))

    def wait(self) -> None:
        self._grpc.wait_for_termination()
