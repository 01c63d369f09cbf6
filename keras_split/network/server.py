"""The split-learning server over gRPC.

Protocol, per client:

1. The client calls `Open` with the protocol version and its cut spec (name,
   dtype and shape of each tensor it will send). The server checks both against
   its own half and opens a session that belongs to that client.
2. For each step the client calls `Step` with the session id, a step number and
   the cut tensors (and labels). The server identifies the caller before it
   reads the request body, checks the session is the caller's, decodes and
   validates every tensor against the cut spec, and only then runs its role.
   The same steps may travel on one `Steps` stream per client instead of a
   `Step` call each (what `GrpcTransport` uses): the caller is identified once
   per stream, from its metadata, and every message is checked, applied and
   answered exactly as a `Step` call's; a refusal ends the stream with the
   same status.
3. Step numbers make retries safe: a step equal to the last applied one gets
   the cached reply (the optimizer moves exactly once); an older or skipped one
   is refused with FAILED_PRECONDITION. With `replay_window=D`, the replies to
   the last D steps are kept, so a pipelined client (`fit(pipeline=D)`) whose
   stream dropped under D steps in flight can send them all again.

TLS is on unless `insecure=True`. Clients authenticate with a bearer token
(`authorization: Bearer <token>` metadata); with `client_ca`, the server also
requires a client certificate signed by that CA (mutual TLS).

What no peer can do (see the README's security section):

- **Hold the server before authenticating.** The server runs on asyncio: a call
  waiting for its request body holds no thread. Every method is read as a
  stream, so credentials are checked from the metadata and a refused caller's
  body is never read or parsed. A call must deliver its message within
  `first_message_timeout` seconds; each client may have `max_calls_per_client`
  calls in flight and the whole server `max_concurrent_rpcs`; beyond that
  calls are refused with RESOURCE_EXHAUSTED. An open step stream counts as one
  of its client's calls, and ends after `stream_idle_timeout` seconds without
  a message. Waiting for a turn in rounds is an
  asyncio wait, not a thread. Only the model's own work runs on the
  `max_workers` threads.
- **Grow the server without bound.** Sessions are capped per client and
  expire when idle (`sessions.SessionTable`).
- **Leave a half-applied step.** A role refuses before any change or changes
  nothing (`keras_split.roles.ServerRole`); a step whose checkpoint cannot be
  written is rolled back to the checkpoint and refused with UNAVAILABLE, so the
  client retries it.
- **Learn about the server from an error.** Every refusal is a specific status
  with a message that names the field; an unexpected error is INTERNAL with an
  incident number, and its traceback goes to the server's log only.

Every event is logged on the `keras_split.server` logger, one line each
(`event=... key=value ...`); tokens are never logged.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError

from keras_split import checkpoint
from keras_split.network import convert as wire
from keras_split.network.auth import Credentials
from keras_split.network.sessions import Session, SessionLimit, SessionTable
from keras_split.partition import CutSpec, spec_of
from keras_split.roles import (
    MAX_ACTIVATION,
    MAX_SAMPLE_WEIGHT,
    GatheringRole,
    MessageHandler,
    PartyHandler,
    ServerRole,
)
from keras_split_wire import SERVICE, codecs, rpc
from keras_split_wire.proto import split_pb2 as pb

logger = logging.getLogger("keras_split.server")

_incidents = itertools.count(1)


class Refusal(Exception):
    """A call the server refuses: a status code and a message for the peer."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


def _refuse(code: grpc.StatusCode, details: str) -> NoReturn:
    raise Refusal(code, details)


def message_limit(specs, max_batch_size: int) -> int:
    """Largest request the server accepts: derived from the cut, not a default."""
    return rpc.message_limit([s.bytes_per_sample for s in specs], max_batch_size)


def _short(session_id: str) -> str:
    return session_id[:8]


def _role_failure(error: BaseException) -> Refusal | None:
    """The status for an error a role raised while handling a valid message."""
    if isinstance(error, (ValueError, tf.errors.InvalidArgumentError)):
        # Data the checks before the role cannot judge (a label outside the
        # classes, say): the role refuses it before any update.
        text = getattr(error, "message", None) or str(error)
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, text.splitlines()[0])
    if isinstance(error, TimeoutError):
        return Refusal(grpc.StatusCode.ABORTED, str(error))
    if isinstance(error, (ConnectionError, RuntimeError)):
        # A middle party's link downstream failed (or the party downstream
        # refused): say so upstream, instead of an opaque UNKNOWN.
        return Refusal(grpc.StatusCode.ABORTED, f"the party downstream failed: {error}")
    return None


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
            built from `loss`: any object with the methods of
            `keras_split.roles.MessageHandler` or `PartyHandler` (a
            `RelayRole` makes this server a middle party of a chain, a
            `JoinLabels` the client's own last segment of a U-shaped chain).
        max_batch_size: the largest batch a client may send; sets the message limit.
        max_workers: threads for the model's work (steps, checkpoints). Calls
            waiting for their message or their turn use none.
        max_concurrent_rpcs: calls the server holds at once; more are refused
            with RESOURCE_EXHAUSTED.
        max_calls_per_client: calls one client may have in flight at once.
        max_sessions_per_client: open sessions one client may hold.
        session_idle_timeout: seconds after which an unused session expires
            (None: never).
        first_message_timeout: seconds a call has, once admitted, to deliver
            its request message.
        stream_idle_timeout: seconds a step stream (`Steps`) may wait for its
            client's next step; then the server ends it (a client that comes
            back opens a new one, transparently).
        max_activation, max_sample_weight: the magnitude policy of the
            `ServerRole` built from `loss` (see `keras_split.roles.ServerRole`):
            larger activations or sample weights are refused before any op.
        checkpoint_dir: a folder (locked by this server while it runs) for
            `server.ckpt`, rewritten after every step before its reply is sent,
            and one small record per session: weights, optimizer and metric
            state, round state, and each session's last step and reply. A
            server started on a folder that holds a checkpoint resumes from it,
            and its clients carry on where they were.
        durable_checkpoints: also flush each checkpoint to disk (survives power
            loss, not only a killed process; costs an fsync per step).
        coordinator: a `keras_split.configurations.rounds.RoundCoordinator`, to
            run rounds of many client processes (round-robin, SplitFed).
        allowed_compression: names of the codecs clients may choose (see
            `keras_split_wire.codecs`); all of them by default. "none" is always allowed.
        replay_window: replies kept per session to answer a resent step. 1 (the
            default) answers the last step again, what a sequential client
            needs; a client that keeps D steps in flight (`fit(pipeline=D)`)
            resends up to D after its stream drops, which a window of D
            answers without applying anything twice. Costs D replies (the cut
            gradients of a batch each) of memory per session. A step the
            window no longer holds is refused as stale, changing nothing.

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
                 max_concurrent_rpcs: int = 256, max_calls_per_client: int = 4,
                 max_sessions_per_client: int = 8,
                 session_idle_timeout: float | None = 3600.0,
                 first_message_timeout: float = 10.0,
                 stream_idle_timeout: float = 60.0,
                 max_activation: float = MAX_ACTIVATION,
                 max_sample_weight: float = MAX_SAMPLE_WEIGHT,
                 allowed_compression=codecs.NAMES, checkpoint_dir=None,
                 durable_checkpoints: bool = False, coordinator=None,
                 replay_window: int = 1):
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
        for name, value in [("max_workers", max_workers),
                            ("max_concurrent_rpcs", max_concurrent_rpcs),
                            ("max_calls_per_client", max_calls_per_client),
                            ("max_batch_size", max_batch_size),
                            ("replay_window", replay_window)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, received {value!r}.")
        for name, limit in [("first_message_timeout", first_message_timeout),
                            ("stream_idle_timeout", stream_idle_timeout)]:
            if not limit > 0:
                raise ValueError(f"`{name}` must be positive, received {limit!r}.")
        self.cut_specs: list[CutSpec] = [spec_of(t.name, t) for t in model.inputs]
        if role is None:
            if loss is None:
                raise ValueError("`SplitServer` needs a `loss` for its ServerRole, or a `role` "
                                 "(e.g. a keras_split.RelayRole for a middle party).")
            role = ServerRole(model, optimizer, loss, metrics, loss_weights,
                              max_activation=max_activation,
                              max_sample_weight=max_sample_weight)
        if not isinstance(role, (MessageHandler, PartyHandler)):
            raise TypeError(
                f"`role` must answer messages: a keras_split.roles.MessageHandler (`handle`, "
                f"`state`, `restore`) or PartyHandler (`handle_from`, `state`, `restore`); "
                f"received {type(role).__name__}, which has neither.")
        self.role = role
        parties = len(role.parties) if isinstance(role, GatheringRole) else 0
        if parties and max_workers <= parties:
            # Each party's step waits in a worker thread until all have arrived.
            max_workers = parties + 2
        self.max_batch_size = max_batch_size
        self.insecure = insecure
        self.max_calls_per_client = max_calls_per_client
        self.first_message_timeout = first_message_timeout
        self.replay_window = replay_window
        # Replies to the steps before each session's last (the last one is
        # `Session.cached`), by session id: at most replay_window - 1 each.
        self._replays: dict[str, collections.OrderedDict[int, pb.StepReply]] = {}
        self.coordinator = coordinator
        unknown = set(allowed_compression) - set(codecs.NAMES)
        if unknown:
            raise ValueError(f"Unknown codecs in `allowed_compression`: {sorted(unknown)}; "
                             f"known: {list(codecs.NAMES)}.")
        self.codecs = frozenset(allowed_compression) | {"none"}
        self.sessions = SessionTable(max_sessions_per_client, session_idle_timeout)
        self._sessions = self.sessions  # the name tests and tools have used
        self._credentials = Credentials(dict(tokens or {}), mutual_tls=client_ca is not None)
        self._in_flight: Counter[str] = Counter()
        # Step streams waiting for their client's next step: they hold a call
        # slot of their client (max_calls_per_client) but no work in flight.
        self._idle_streams: Counter[str] = Counter()
        self.stream_idle_timeout = stream_idle_timeout
        # For `wait_for_rounds`: when the last call ended, and who has been
        # told that the rounds are over.
        self._last_call = time.monotonic()
        self._told_finished: set[str] = set()
        self._model_lock = threading.Lock()
        self._workers = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="keras-split-server")
        self.checkpoint_path: Path | None = None
        self._durable = durable_checkpoints
        self._store: checkpoint.SessionStore | None = None
        self._folder_lock: checkpoint.FolderLock | None = None
        self._last_stepped: tuple[str, Session] | None = None
        if checkpoint_dir is not None:
            self._open_checkpoints(Path(checkpoint_dir))
        self._limit = message_limit(self.cut_specs, max_batch_size)
        self._loop = asyncio.new_event_loop()
        self._loop_done = threading.Event()  # set once the loop has stopped and closed
        self._thread = threading.Thread(target=self._run_loop, daemon=True,
                                        name="keras-split-server-loop")
        self._thread.start()
        self._server: Any = None
        try:
            self.port = self._call_soon(self._bind(address, insecure, certificate, private_key,
                                                   rpc.read_pem(client_ca, "client CA"),
                                                   max_concurrent_rpcs))
        except BaseException:
            self._shutdown_loop()
            raise
        if self.port == 0:
            self._shutdown_loop()
            raise OSError(f"Could not listen on {address!r}.")
        self.address = f"{address.rsplit(':', 1)[0]}:{self.port}"
        if insecure:
            logger.warning("Serving WITHOUT TLS on %s: traffic and tokens are readable by "
                           "anyone on the network path.", self.address)

    # -- lifecycle -------------------------------------------------------------

    def _call_soon(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _bind(self, address, insecure, certificate, private_key, client_ca,
                    max_concurrent_rpcs) -> int:
        self._server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", self._limit),
                     ("grpc.max_send_message_length", self._limit),
                     # Dead peers are found and their connections closed.
                     ("grpc.keepalive_time_ms", 60_000),
                     ("grpc.keepalive_timeout_ms", 20_000),
                     ("grpc.http2.max_pings_without_data", 0),
                     ("grpc.max_connection_idle_ms", 15 * 60_000)],
            maximum_concurrent_rpcs=max_concurrent_rpcs)

        def serialize(message):
            return message.SerializeToString()

        methods = {name: grpc.stream_unary_rpc_method_handler(
            handler, request_deserializer=None, response_serializer=serialize)
            for name, handler in [("Open", self._open), ("Step", self._step),
                                  ("Turn", self._turn), ("Report", self._report)]}
        methods["Steps"] = grpc.stream_stream_rpc_method_handler(
            self._steps, request_deserializer=None, response_serializer=serialize)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, methods),))
        if insecure:
            return self._server.add_insecure_port(address)
        credentials = grpc.ssl_server_credentials(
            [(private_key, certificate)], root_certificates=client_ca,
            require_client_auth=client_ca is not None)
        return self._server.add_secure_port(address, credentials)

    def start(self) -> SplitServer:
        if self.checkpoint_path is not None:
            with self._model_lock:
                self._save()  # what a step whose checkpoint fails rolls back to
        self._call_soon(self._server.start())
        self._expiry = asyncio.run_coroutine_threadsafe(self._expire_sessions(), self._loop)
        logger.info("event=server.started address=%s tls=%s mutual_tls=%s sessions=%d",
                    self.address, not self.insecure, self._credentials.mutual_tls,
                    len(self.sessions))
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop serving; calls in flight get `grace` seconds to finish. Then,
        with a checkpoint directory, write a final checkpoint and unlock it."""
        if not self._loop.is_running():
            return
        expiry = getattr(self, "_expiry", None)
        if expiry is not None:
            expiry.cancel()
        self._call_soon(self._server.stop(grace))
        self._call_soon(self._settle())
        self._workers.shutdown(wait=True)
        with self._model_lock:
            self._save()
        self._shutdown_loop()
        if self._folder_lock is not None:
            self._folder_lock.release()
        logger.info("event=server.stopped address=%s", self.address)

    @staticmethod
    async def _settle(timeout: float = 2.0) -> None:
        """Let the calls the stop cancelled (open step streams, mostly) finish
        their handlers, so that no task is left pending when the loop stops."""
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def _run_loop(self) -> None:
        # The loop closes in its own thread, once it has stopped. Waiters watch
        # `_loop_done`, not the thread: CPython's Thread.join interrupted by a
        # signal (an operator's SIGTERM) can leave the thread reported dead
        # while it still runs, and the loop would then never be closed.
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()
            self._loop_done.set()

    def _shutdown_loop(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._loop.stop)
        except RuntimeError:  # closed already: it had stopped
            pass
        self._loop_done.wait(timeout=10)

    def wait(self) -> None:
        """Block until the server stops."""
        self._loop_done.wait()

    def wait_for_rounds(self, linger: float = 10.0, poll: float = 0.1) -> bool:
        """Block until the coordinator's rounds are over and their clients are done.

        Done means: the last round ended; every client that took part has been
        told so (or has had `turn_timeout` seconds to ask since, which covers
        one that died); and no call has been in flight for `linger` seconds.
        Clients usually evaluate against the server once told (`keras-split
        client --rounds` does), so `linger` should cover a client's pause
        between being told and its first evaluation step. Then call `stop()`.

        Returns:
            True when the rounds are over and the clients quiet; False when the
            server was stopped first.

        Raises:
            ValueError: this server runs no rounds (it has no coordinator).
        """
        if self.coordinator is None:
            raise ValueError("`wait_for_rounds` needs a server that runs rounds: pass "
                             "`coordinator=RoundCoordinator(...)` to SplitServer.")
        ended = None
        while self._loop.is_running():
            now = time.monotonic()
            if self.coordinator.finished:
                ended = now if ended is None else ended
                told = (set(self.coordinator.members) <= self._told_finished
                        or now - ended >= self.coordinator.turn_timeout)
                if told and not self._in_flight and now - self._last_call >= linger:
                    return True
            time.sleep(poll)
        return False

    async def _expire_sessions(self) -> None:
        """Expire idle sessions, and end turns and rounds that timed out even when
        no client is asking (every client of a round may be gone)."""
        timeout = self.sessions.idle_timeout
        period = 60.0 if timeout is None else min(60.0, max(timeout / 4, 0.05))
        if self.coordinator is not None:
            period = min(period, max(self.coordinator.turn_timeout / 4, 0.05))
        while True:
            await asyncio.sleep(period)
            for session_id in self.sessions.expire():
                self._forget(session_id, "idle")
            if self.coordinator is not None:
                for client_id in self.coordinator.expire():
                    logger.info("event=client.dropped client=%s round=%d reason=timeout",
                                client_id, self.coordinator.round)

    def _forget(self, session_id: str, why: str) -> None:
        logger.info("event=session.expired session=%s reason=%s", _short(session_id), why)
        self._replays.pop(session_id, None)
        if self._store is not None:
            self._store.remove(session_id)

    # -- every call --------------------------------------------------------------

    async def _admit(self, method: str, requests, context, parse):
        """Identify the caller from metadata (no body read yet), bound its calls in
        flight, then read one request message within `first_message_timeout`."""
        names = None
        if self._credentials.mutual_tls:
            names = (context.auth_context() or {}).get("x509_common_name")
        client_id, why, denied = self._credentials.identify(context.invocation_metadata(),
                                                           names)
        if not client_id:
            logger.info("event=call.refused method=%s peer=%s reason=%r", method,
                        context.peer(), why)
            code = grpc.StatusCode.PERMISSION_DENIED if denied else \
                grpc.StatusCode.UNAUTHENTICATED
            await context.abort(code, why)
        held = self._in_flight[client_id] + self._idle_streams[client_id]
        if held >= self.max_calls_per_client:
            logger.info("event=call.refused method=%s client=%s reason=calls_in_flight", method,
                        client_id)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"client {client_id!r} already has {held} "
                                f"calls in flight (max_calls_per_client="
                                f"{self.max_calls_per_client}); wait for them to finish")
        self._in_flight[client_id] += 1
        try:
            raw = await asyncio.wait_for(anext(aiter(requests)), self.first_message_timeout)
        except StopAsyncIteration:
            self._release(client_id)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no message")
        except TimeoutError:
            self._release(client_id)
            logger.info("event=call.refused method=%s client=%s reason=no_message", method,
                        client_id)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no request message within {self.first_message_timeout:g} s")
        except BaseException:
            self._release(client_id)
            raise
        try:
            return client_id, parse(raw)
        except DecodeError:
            self._release(client_id)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the {method} request is not a valid protobuf message")

    def _release(self, client_id: str) -> None:
        self._last_call = time.monotonic()
        self._in_flight[client_id] -= 1
        if not self._in_flight[client_id]:
            del self._in_flight[client_id]

    async def _serve(self, method: str, requests, context, parse, handler):
        client_id, request = await self._admit(method, requests, context, parse)
        try:
            return await self._answer(method, client_id, request, context, handler)
        finally:
            self._release(client_id)

    async def _answer(self, method: str, client_id: str, request, context, handler):
        """`handler`'s reply to one request; a refusal or a failure aborts the call."""
        try:
            return await handler(client_id, request)
        except Refusal as refusal:
            logger.info("event=call.refused method=%s client=%s code=%s reason=%r", method,
                        client_id, refusal.code.name, refusal.details)
            await context.abort(refusal.code, refusal.details)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            incident = next(_incidents)
            logger.exception("event=call.failed method=%s client=%s incident=%d", method,
                             client_id, incident)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"the server failed on this call (incident {incident}); its "
                                "operator has the details in the server log")

    async def _in_worker(self, function, *arguments):
        return await asyncio.get_running_loop().run_in_executor(self._workers, function,
                                                                *arguments)

    def _session_of(self, client_id: str, session_id: str) -> Session:
        """The caller's session; anyone else's is refused."""
        session = self.sessions.get(session_id)
        if session is None:
            _refuse(grpc.StatusCode.NOT_FOUND, "unknown or expired session; call Open first")
        if session.client_id != client_id:
            _refuse(grpc.StatusCode.PERMISSION_DENIED, "this session belongs to another client")
        return session

    # -- Open --------------------------------------------------------------------

    async def _open(self, requests, context):
        return await self._serve("Open", requests, context, pb.OpenRequest.FromString,
                                 self._open_session)

    async def _open_session(self, client_id: str, request: pb.OpenRequest) -> pb.OpenReply:
        if request.protocol_version != wire.PROTOCOL_VERSION:
            _refuse(grpc.StatusCode.FAILED_PRECONDITION,
                    f"protocol version {request.protocol_version} is not supported; "
                    f"the server speaks version {wire.PROTOCOL_VERSION}")
        try:
            codec = codecs.get(request.codec or None)
            accepted = codec.name in self.codecs
        except ValueError:
            accepted = False
        if not accepted:
            _refuse(grpc.StatusCode.FAILED_PRECONDITION,
                    f"compression {request.codec[:64]!r} is not accepted; this server accepts "
                    f"{sorted(self.codecs)}")
        mine = [(s.dtype, s.shape) for s in self._specs_for(client_id)]
        theirs = [wire.spec_from_pb(s) for s in request.cut[:64]]
        if mine != theirs:
            _refuse(grpc.StatusCode.FAILED_PRECONDITION,
                    f"cut mismatch: the client sends {theirs}, the server's half takes {mine}")
        if request.resume_session:
            return await self._in_worker(self._resume, request, codec, client_id)
        try:
            session_id, session, expired = self.sessions.open(client_id, codec)
        except SessionLimit as error:
            _refuse(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        for gone in expired:
            self._forget(gone, "idle")
        if self._store is not None:
            # A session outlives a restart even before its first step (a client
            # in rounds may only ask for turns for a while).
            await self._in_worker(self._store.put, session_id, session.header(), b"")
        logger.info("event=session.opened client=%s session=%s codec=%s", client_id,
                    _short(session_id), codec.spec)
        return pb.OpenReply(session_id=session_id, protocol_version=wire.PROTOCOL_VERSION,
                            last_step=0, max_batch_size=self.max_batch_size)

    def _resume(self, request, codec, client_id) -> pb.OpenReply:
        session = self._session_of(client_id, request.resume_session)
        if session.codec != codec:
            _refuse(grpc.StatusCode.FAILED_PRECONDITION,
                    f"the session was opened with compression {session.codec.spec!r}, "
                    f"not {codec.spec!r}")
        with session.lock, self._model_lock:
            self._replays.pop(request.resume_session, None)
            problem = session.resume_at(request.client_step)
            if problem:
                _refuse(grpc.StatusCode.FAILED_PRECONDITION, f"cannot resume: {problem}")
            self._persist(request.resume_session, session)
        logger.info("event=session.resumed client=%s session=%s step=%d", client_id,
                    _short(request.resume_session), session.last_step)
        return pb.OpenReply(session_id=request.resume_session,
                            protocol_version=wire.PROTOCOL_VERSION,
                            last_step=session.last_step, max_batch_size=self.max_batch_size)

    # -- Step --------------------------------------------------------------------

    async def _step(self, requests, context):
        return await self._serve("Step", requests, context, pb.StepRequest.FromString,
                                 self._run_step)

    async def _run_step(self, client_id: str, request: pb.StepRequest) -> pb.StepReply:
        session = self._session_of(client_id, request.session_id)
        return await self._in_worker(self._apply_step, client_id, session, request)

    async def _steps(self, requests, context):
        """`Steps`: the steps of one client on one call, each checked and applied
        exactly as a `Step` call's. The caller is identified once, from the
        call's metadata, before its first message is read; every message's
        session must be the caller's. A refusal ends the stream with its
        status (the client opens a new one for its next step); a client that
        sends nothing for `stream_idle_timeout` seconds has its stream ended."""
        client_id, request = await self._admit("Steps", requests, context,
                                               pb.StepRequest.FromString)
        messages = aiter(requests)
        idle = False
        try:
            while True:
                reply = await self._answer("Steps", client_id, request, context,
                                           self._run_step)
                self._last_call = time.monotonic()
                self._move(client_id, self._in_flight, self._idle_streams)
                idle = True
                await context.write(reply)
                try:
                    async with asyncio.timeout(self.stream_idle_timeout):
                        raw = await anext(messages)
                except StopAsyncIteration:
                    return  # the client closed the stream
                except TimeoutError:
                    logger.info("event=stream.idle client=%s seconds=%g", client_id,
                                self.stream_idle_timeout)
                    return
                self._move(client_id, self._idle_streams, self._in_flight)
                idle = False
                try:
                    request = pb.StepRequest.FromString(raw)
                except DecodeError:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        "the Steps request is not a valid protobuf message")
        finally:
            if idle:
                self._move(client_id, self._idle_streams, self._in_flight)
            self._release(client_id)

    @staticmethod
    def _move(client_id: str, source: Counter[str], target: Counter[str]) -> None:
        source[client_id] -= 1
        if not source[client_id]:
            del source[client_id]
        target[client_id] += 1

    def _apply_step(self, client_id: str, session: Session, request) -> pb.StepReply:
        with session.lock:
            if request.step == session.last_step and session.cached is not None:
                return session.cached  # a retransmission: answer again, apply nothing
            replayed = self._replays.get(request.session_id, {}).get(request.step)
            if replayed is not None and request.step < session.last_step:
                return replayed  # a step resent from a pipeline: the same
            if request.step != session.last_step + 1:
                _refuse(grpc.StatusCode.FAILED_PRECONDITION,
                        f"step {request.step} is stale or out of order; expected "
                        f"{session.last_step + 1}")
            try:
                message = wire.request_from_pb(request, self._specs_for(client_id),
                                               self.max_batch_size, session.codec)
            except wire.WireError as error:
                _refuse(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            role = self.role
            with contextlib.ExitStack() as held:
                if isinstance(role, PartyHandler):
                    # A role that answers by party locks for itself: holding the
                    # model lock while it waits for the other parties of a step
                    # would stop them from reaching it.
                    reply = self._handle(role, client_id, message)
                    held.enter_context(self._model_lock)
                else:
                    # The step and its checkpoint under one lock: no other step
                    # may be saved between them (a crash would then keep this
                    # step's update without its session line).
                    held.enter_context(self._model_lock)
                    reply = self._handle(role, client_id, message)
                encoded = wire.reply_to_pb(reply, session.codec)
                previous = (session.last_step, session.last_train_step, session.cached)
                if self.replay_window > 1 and session.cached is not None:
                    kept = self._replays.setdefault(request.session_id,
                                                    collections.OrderedDict())
                    kept[session.last_step] = session.cached
                    while len(kept) > self.replay_window - 1:
                        kept.popitem(last=False)
                session.last_step, session.cached = request.step, encoded
                if message.mode == "train":
                    session.last_train_step = request.step
                try:
                    # Saved before the reply leaves: a client that got a reply can
                    # always find its step applied after a crash.
                    self._persist(request.session_id, session)
                except OSError as error:
                    session.last_step, session.last_train_step, session.cached = previous
                    self._roll_back()
                    logger.error("event=checkpoint.failed client=%s session=%s error=%r",
                                 client_id, _short(request.session_id), str(error))
                    _refuse(grpc.StatusCode.UNAVAILABLE,
                            "the server could not save this step and undid it; retry")
            if message.mode == "train" and message.reset_metrics:
                logger.info("event=epoch.started client=%s session=%s step=%d", client_id,
                            _short(request.session_id), request.step)
            return encoded

    def _handle(self, role, client_id: str, message):
        try:
            if isinstance(role, PartyHandler):
                return role.handle_from(client_id, message)
            return role.handle(message)
        except Exception as error:
            refusal = _role_failure(error)
            if refusal is None:
                raise
            raise refusal from None

    def _specs_for(self, client_id) -> list[CutSpec]:
        """The cut tensors this client sends: all of them, unless the role
        assigns each party its own (vertically partitioned data)."""
        if isinstance(self.role, GatheringRole):
            try:
                return list(self.role.specs_for(client_id, self.cut_specs))
            except ValueError as error:
                _refuse(grpc.StatusCode.PERMISSION_DENIED, str(error))
        return self.cut_specs

    # -- rounds ------------------------------------------------------------------

    def _coordinator(self):
        if self.coordinator is None:
            _refuse(grpc.StatusCode.FAILED_PRECONDITION,
                    "this server runs no rounds (it has no coordinator)")
        return self.coordinator

    async def _turn(self, requests, context):
        return await self._serve("Turn", requests, context, pb.TurnRequest.FromString,
                                 self._wait_for_turn)

    async def _wait_for_turn(self, client_id: str, request: pb.TurnRequest) -> pb.TurnReply:
        self._session_of(client_id, request.session_id)
        coordinator = self._coordinator()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + coordinator.poll
        # An asyncio wait: a client waiting for its turn holds no thread. It
        # wakes when the coordinator's state changes (another client reports,
        # joins or is dropped) or when someone's time runs out, whichever is
        # first; listening starts before the first look, so no change is missed.
        changed = asyncio.Event()
        stop = coordinator.listen(lambda: loop.call_soon_threadsafe(changed.set))
        try:
            while True:
                changed.clear()
                go, round_, weights, finished = coordinator.turn(client_id, request.round,
                                                                 wait=0.0)
                left = deadline - loop.time()
                if go or finished or left <= 0:
                    break
                due = coordinator.seconds_to_expiry()
                try:
                    await asyncio.wait_for(changed.wait(),
                                           left if due is None else min(left, max(due, 0.01)))
                except TimeoutError:
                    pass
        finally:
            stop()
        if go:
            logger.info("event=turn.started client=%s round=%d", client_id, round_)
            await self._in_worker(self._save_locked)
        if finished and client_id not in self._told_finished:
            self._told_finished.add(client_id)
            logger.info("event=client.finished client=%s rounds=%d", client_id,
                        coordinator.rounds)
        return pb.TurnReply(go=go, round=round_, finished=finished,
                            weights=[wire.encode(w) for w in weights])

    async def _report(self, requests, context):
        return await self._serve("Report", requests, context, pb.ReportRequest.FromString,
                                 self._take_report)

    async def _take_report(self, client_id: str, request: pb.ReportRequest) -> pb.ReportReply:
        self._session_of(client_id, request.session_id)
        coordinator = self._coordinator()
        return await self._in_worker(self._record_report, client_id, coordinator, request)

    def _record_report(self, client_id, coordinator, request) -> pb.ReportReply:
        from keras_split_wire.tensors import element_count

        limit = sum(element_count(w.shape) for w in coordinator.weights) or 1
        try:
            weights = [wire.decode(t, f"weights[{i}]", limit)
                       for i, t in enumerate(request.weights[:len(coordinator.weights) + 1])]
        except wire.WireError as error:
            _refuse(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        before = coordinator.round
        try:
            round_ = coordinator.report(client_id, request.round, weights, request.samples)
        except ValueError as error:  # RoundError: the report does not fit the round
            _refuse(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        logger.info("event=report.accepted client=%s round=%d samples=%d", client_id,
                    request.round, request.samples)
        for record in coordinator.history:
            if before <= record.round < coordinator.round:
                logger.info("event=round.completed round=%d trained=%s dropped=%s",
                            record.round, list(record.trained), list(record.dropped))
        self._save_locked()
        return pb.ReportReply(round=round_)

    # -- checkpoints -------------------------------------------------------------

    def _open_checkpoints(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        lock = self._folder_lock = checkpoint.FolderLock(folder)
        lock.acquire()
        try:
            self.checkpoint_path = folder / "server.ckpt"
            self._store = checkpoint.SessionStore(folder / "sessions",
                                                  durable=self._durable)
            if self.checkpoint_path.exists():
                self._restore()
        except BaseException:
            lock.release()
            raise

    def _persist(self, session_id: str, session: Session) -> None:
        """After a step of `session` (under the model lock): the model checkpoint,
        which also carries this session's line (so the two can never disagree),
        then this session's own record. Other sessions' records are untouched:
        the cost does not grow with idle sessions."""
        if self.checkpoint_path is None:
            return
        self._last_stepped = (session_id, session)
        self._save()
        assert self._store is not None  # noqa: S101 - set with checkpoint_path
        self._store.put(session_id, session.header(), self._blob(session))

    @staticmethod
    def _blob(session: Session) -> bytes:
        return b"" if session.cached is None else session.cached.SerializeToString()

    def _save_locked(self) -> None:
        with self._model_lock:
            self._save()

    def _save(self) -> None:
        if self.checkpoint_path is None:
            return
        arrays = dict(self.role.state())
        header: dict[str, Any] = {"party": "server", "cut": checkpoint.cut_of(self.cut_specs)}
        if self._last_stepped is not None:
            session_id, session = self._last_stepped
            header["last_session"] = {"id": session_id, **session.header()}
            arrays["last_session/reply"] = np.frombuffer(self._blob(session), np.uint8)
        if self.coordinator is not None:
            rounds_header, rounds_arrays = self.coordinator.state()
            header["rounds"] = rounds_header
            arrays.update({f"rounds/{k}": v for k, v in rounds_arrays.items()})
        checkpoint.write(self.checkpoint_path, header, arrays, durable=self._durable)

    def _roll_back(self) -> None:
        """Undo a step whose checkpoint could not be written: back to the last one."""
        _, arrays = checkpoint.read_for(self.checkpoint_path, "server", self.cut_specs)
        self.role.restore(self._role_arrays(arrays), self.checkpoint_path)

    @staticmethod
    def _role_arrays(arrays):
        return {k: v for k, v in arrays.items()
                if not k.startswith(("last_session/", "rounds/"))}

    def _restore(self) -> None:
        path = self.checkpoint_path
        header, arrays = checkpoint.read_for(path, "server", self.cut_specs)
        self.role.restore(self._role_arrays(arrays), path)
        assert self._store is not None  # noqa: S101 - set before _restore
        records = self._store.load_all()
        last = header.get("last_session")
        if last is not None:
            # The model checkpoint is written first and atomically: its line for
            # the last session stepped is the newest.
            records[last["id"]] = (last, arrays["last_session/reply"].tobytes())
        for session_id, (fields, blob) in records.items():
            session = Session(client_id=fields["client_id"],
                              codec=codecs.get(fields["codec"]),
                              last_step=int(fields["last_step"]),
                              last_train_step=int(fields["last_train_step"]))
            if blob:
                # Our own reply, serialized by this server: a protobuf, not a pickle.
                session.cached = pb.StepReply.FromString(blob)
            self.sessions.restore(session_id, session)
        if "rounds" in header and self.coordinator is not None:
            self.coordinator.restore(header["rounds"], {
                k[len("rounds/"):]: v for k, v in arrays.items() if k.startswith("rounds/")})
        logger.info("event=checkpoint.restored path=%s sessions=%d", path, len(self.sessions))
