"""The RPC policy both clients follow: credentials, limits, retries, errors.

- `read_pem`: PEM bytes, or a path to read them from.
- `message_limit`: the largest message for a cut, derived from the cut spec
  and the batch limit (never a fixed default): server and clients use it both
  ways.
- `channel_options`: message limits and a reconnect backoff that finds a
  restarted server within seconds.
- `call`: one unary call with a deadline, retried on UNAVAILABLE only (with
  jittered exponential backoff) for up to `Retry.retry_for` seconds, and every
  failure turned into an error that says what happened and how to fix it.
- `Stream`: the same policy for request-reply exchanges over one long-lived
  bidirectional call (the `Steps` method): a deadline per reply, a fresh
  stream for each retry and after a dropped one, the same errors.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import random
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

# Room for labels, sample weights and framing beside the cut tensors, per sample
# and per message. Labels larger than this per sample need a larger limit.
LABEL_BYTES_PER_SAMPLE = 4096
MESSAGE_OVERHEAD = 1 << 20
# What a client assumes of the server's batch limit before `Open` tells it.
CLIENT_MAX_BATCH = 1 << 16

T = TypeVar("T")


class ServerError(RuntimeError):
    """The server refused a call for a reason retrying cannot fix."""


class CredentialsError(ServerError, PermissionError):
    """The server refused who we are (token, certificate) or what we may do."""


class RejectedError(ServerError, ValueError):
    """The server rejected the content of a message (INVALID_ARGUMENT)."""


class LinkDownError(ServerError, ConnectionError):
    """The server could not be reached (or the TLS handshake failed)."""


def read_pem(value: bytes | str | Path | None, what: str = "PEM") -> bytes | None:
    """PEM bytes as given, or read from a path; `None` stays `None`."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as error:
        raise FileNotFoundError(f"Cannot read the {what} file {str(value)!r}: "
                                f"{error.strerror}. Pass PEM bytes or the path of a "
                                "readable PEM file.") from None


def message_limit(bytes_per_sample: Sequence[int | None], max_batch_size: int) -> int:
    """Largest message for a cut whose tensors take `bytes_per_sample` bytes each."""
    per_sample = sum(b or 0 for b in bytes_per_sample) + LABEL_BYTES_PER_SAMPLE
    return max_batch_size * per_sample + MESSAGE_OVERHEAD


def channel_options(limit: int, max_backoff: float = 2.0) -> list[tuple[str, int]]:
    """Client channel options: message limits both ways and a short reconnect backoff
    (gRPC's own grows to two minutes; a restarted server should be found in seconds)."""
    return [("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(max_backoff * 1000))]


def channel(address: str, limit: int, credentials: grpc.ChannelCredentials | None,
            max_backoff: float = 2.0) -> grpc.Channel:
    """A channel to `address`: TLS with `credentials`, plaintext when they are None."""
    options = channel_options(limit, max_backoff)
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def credentials(root_certificates=None, certificate=None,
                private_key=None) -> grpc.ChannelCredentials:
    """TLS credentials from PEM bytes or paths (`None` roots: the system's)."""
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(root_certificates, "CA certificate"),
        private_key=read_pem(private_key, "private key"),
        certificate_chain=read_pem(certificate, "certificate"))


def is_tls_failure(details: str) -> bool:
    """gRPC reports a failed handshake as UNAVAILABLE, like a server that is down;
    retrying a certificate problem only delays the error. A connection that the
    network dropped during the handshake (a server restarting) is no TLS
    problem: that one is retried."""
    text = details.lower()
    if any(word in text for word in _DROPPED):
        return False
    return any(word in text for word in ("ssl", "tls", "handshake", "certificate"))


# How gRPC words a connection lost under the handshake, not refused by it.
_DROPPED = ("connection reset", "broken pipe", "connection refused")


_FAIL_FAST: dict[grpc.StatusCode, tuple[type[ServerError], str]] = {
    grpc.StatusCode.UNAUTHENTICATED: (
        CredentialsError, "The server refused our credentials ({details}). Check the token "
                          "(and client certificate, with mutual TLS)."),
    grpc.StatusCode.PERMISSION_DENIED: (CredentialsError, "The server denied the call: "
                                                          "{details}."),
    grpc.StatusCode.INVALID_ARGUMENT: (RejectedError, "The server rejected the message: "
                                                      "{details}."),
    grpc.StatusCode.FAILED_PRECONDITION: (ServerError, "The server refused: {details}."),
    grpc.StatusCode.NOT_FOUND: (ServerError, "The server does not know this session: "
                                             "{details}."),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (ServerError, "The server is at a limit: {details}."),
    grpc.StatusCode.OUT_OF_RANGE: (RejectedError, "The server rejected the message: "
                                                  "{details}."),
}


@dataclass(frozen=True)
class Retry:
    """How long and how often to retry a call that fails with UNAVAILABLE.

    Waits grow exponentially from `backoff` seconds up to `max_backoff`, each
    drawn uniformly below the current bound (full jitter), so that many
    clients returning after a server restart do not arrive at the same instant.
    `retry_for=0` never retries.
    """

    timeout: float = 30.0
    retry_for: float = 60.0
    backoff: float = 0.1
    max_backoff: float = 2.0


def failure(error: grpc.RpcError, address: str, tls_hint: str, attempt: int,
            policy: Retry, give_up: float) -> ServerError | None:
    """The error to raise for a failed call, or None when it may be retried
    (UNAVAILABLE that is not a TLS failure, within the retry budget)."""
    code = error.code()
    details = error.details() or ""
    if code in _FAIL_FAST:
        kind, text = _FAIL_FAST[code]
        return kind(text.format(details=details))
    if code == grpc.StatusCode.UNAVAILABLE and is_tls_failure(details):
        return LinkDownError(
            f"TLS handshake with {address} failed ({details}). Check that "
            f"{tls_hint} is the CA that signed the server's certificate, and the "
            "client certificate if the server requires one.")
    if code != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= give_up:
        return LinkDownError(
            f"Call to the split server at {address} failed: {code.name} "
            f"({details}) after {attempt + 1} attempt(s) in "
            f"{policy.retry_for:g} s of retrying.")
    return None


def call(method: Callable[..., T], request: Any, metadata: Sequence[tuple[str, str]],
         policy: Retry, address: str, tls_hint: str = "root_certificates",
         sleep: Callable[[float], None] = time.sleep) -> T:
    """Call `method(request)` under `policy`; raise a `ServerError` subclass on failure.

    `tls_hint` names how the caller passes the CA (a Python argument or a
    command-line flag), so the TLS error tells the reader what to change.
    """
    delay = policy.backoff
    give_up = time.monotonic() + policy.retry_for
    for attempt in itertools.count():
        try:
            return method(request, metadata=metadata, timeout=policy.timeout)
        except grpc.RpcError as error:
            problem = failure(error, address, tls_hint, attempt, policy, give_up)
            if problem is not None:
                raise problem from None
            sleep(random.uniform(0, delay))  # noqa: S311 - jitter, not cryptographic
            delay = min(delay * 2, policy.max_backoff)
    raise AssertionError("unreachable")  # pragma: no cover


class StreamUnsupported(ServerError):
    """The server does not implement the streaming method (an older server):
    nothing was sent; use the unary method instead."""


class _Ended(Exception):
    """The stream ended without an error status before answering (the server
    closed an idle stream, or it was dropped)."""


_END = object()
# How a stream that died while idle fails its next exchange (the server
# restarted or stopped, the connection dropped, the server closed it).
_STALE = frozenset([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])


class Stream:
    """Request-reply exchanges over one long-lived bidirectional call.

    `exchange(request)` sends one message and waits for its one reply, under
    the same policy as `call`: a deadline of `policy.timeout` seconds per
    reply, UNAVAILABLE retried with jittered exponential backoff for up to
    `policy.retry_for` seconds, every other failure raised as the same
    `ServerError` subclass as a unary call's. Each retry goes out on a fresh
    stream, so the request must be idempotent (a split step is: a resent step
    number gets the server's cached reply).

    A stream that was already open may have died while idle (the server
    restarted, or closed it after a pause): the first failure on such a
    stream is retried at once on a fresh one, without counting against the
    budget. A fresh stream that the server answers with UNIMPLEMENTED (an
    older server) raises `StreamUnsupported`; nothing was applied.

    Not thread-safe: one exchange at a time, as a training loop makes them.
    """

    def __init__(self, method: Callable[..., Any], metadata: Sequence[tuple[str, str]],
                 policy: Retry, address: str, tls_hint: str = "root_certificates",
                 sleep: Callable[[float], None] = time.sleep):
        self._method, self._metadata = method, metadata
        self.policy, self.address, self.tls_hint, self._sleep = policy, address, tls_hint, sleep
        self._call: Any = None
        self._requests: queue.SimpleQueue | None = None
        self._pending: float | None = None  # when the awaited reply is overdue
        self._expired = False
        self._closed = False
        self._watchdog: threading.Thread | None = None
        self._lock = threading.Lock()
        self.opened = 0  # streams opened so far (the first, then one per reconnection)
        self._unanswered = 0  # requests sent with send() not yet read by receive()

    def exchange(self, request: Any) -> Any:
        if self._unanswered:
            raise RuntimeError(f"exchange() with {self._unanswered} request(s) sent by send() "
                               "still unanswered: receive() their replies first")
        delay = self.policy.backoff
        give_up = time.monotonic() + self.policy.retry_for
        attempt = 0
        while True:
            fresh = self._call is None
            if fresh:
                self._open()
            try:
                return self._round_trip(request)
            except (grpc.RpcError, _Ended) as error:
                expired = self._expired
                self._drop()
                if expired:
                    raise LinkDownError(
                        f"Call to the split server at {self.address} failed: "
                        f"DEADLINE_EXCEEDED (no reply within {self.policy.timeout:g} s)."
                    ) from None
                if isinstance(error, _Ended):
                    error = _EndedError()
                if not fresh and error.code() in _STALE:
                    continue  # a stream that died while idle: try once on a new one
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise StreamUnsupported(error.details() or "UNIMPLEMENTED") from None
                problem = failure(error, self.address, self.tls_hint, attempt, self.policy,
                                  give_up)
                if problem is not None:
                    raise problem from None
                self._sleep(random.uniform(0, delay))  # noqa: S311 - jitter
                delay = min(delay * 2, self.policy.max_backoff)
                attempt += 1

    # -- pipelined use: several requests on the wire, replies read in order --

    @property
    def in_flight(self) -> int:
        """Requests sent with `send` whose replies `receive` has not read."""
        return self._unanswered

    def send(self, request: Any) -> None:
        """Write `request` on the stream without waiting for its reply (opening
        the stream if there is none); `receive` reads the replies in order.

        No retry: a request in flight cannot be resent safely (the server
        answers only its last step again), so a failure surfaces in `receive`.
        """
        if self._call is None:
            self._open()
            self._unanswered = 0
        assert self._requests is not None  # noqa: S101 - set by _open
        self._requests.put(request)
        self._unanswered += 1

    def receive(self) -> Any:
        """The reply to the oldest request sent with `send` and not yet answered.

        The deadline is `policy.timeout` seconds per reply. A failure drops
        the stream, forgets every request still in flight, and raises the
        `ServerError` subclass a call's failure would; a link that went down
        (UNAVAILABLE, a cancelled or ended stream, a missed deadline) raises
        `LinkDownError` with no retry.
        """
        if self._call is None or not self._unanswered:
            raise RuntimeError("receive() without a request in flight")
        self._pending = time.monotonic() + self.policy.timeout
        try:
            reply = next(self._call)
        except StopIteration:
            error: Any = _EndedError()
        except grpc.RpcError as raised:
            error = raised
        else:
            error = None
        finally:
            with self._lock:
                self._pending = None
                expired = self._expired
        if error is None:
            self._unanswered -= 1
            if expired:
                self._drop()
            return reply
        lost = self._unanswered
        self._drop()
        if expired:
            raise LinkDownError(
                f"Call to the split server at {self.address} failed: DEADLINE_EXCEEDED (no "
                f"reply within {self.policy.timeout:g} s); {lost} request(s) in flight lost."
            ) from None
        problem = failure(error, self.address, self.tls_hint, 0, Retry(retry_for=0), 0.0)
        if problem is None or (isinstance(problem, LinkDownError)
                               and not is_tls_failure(error.details() or "")):
            problem = LinkDownError(
                f"The step stream to the split server at {self.address} failed: "
                f"{error.code().name} ({error.details()}); {lost} request(s) in flight lost.")
        raise problem from None

    def _open(self) -> None:
        requests: queue.SimpleQueue = queue.SimpleQueue()
        self._requests = requests
        self._expired = False
        self._call = self._method(iter(requests.get, _END), metadata=self._metadata)
        self.opened += 1
        if self._watchdog is None:
            # It holds the stream weakly: a stream nobody closed still goes away.
            self._watchdog = threading.Thread(target=_watch, args=(weakref.ref(self),),
                                              daemon=True, name="keras-split-stream-deadline")
            self._watchdog.start()

    def _round_trip(self, request: Any) -> Any:
        assert self._requests is not None  # noqa: S101 - set by _open
        self._pending = time.monotonic() + self.policy.timeout
        try:
            self._requests.put(request)
            try:
                reply = next(self._call)
            except StopIteration:
                raise _Ended from None
        finally:
            with self._lock:
                self._pending = None
                expired = self._expired
        if expired:  # the reply came as the watchdog cancelled: keep it, drop the stream
            self._drop()
        return reply

    def _drop(self) -> None:
        """Forget the current stream: end its request iterator and cancel it."""
        with self._lock:
            call, requests = self._call, self._requests
            self._call = self._requests = None
        self._unanswered = 0
        if requests is not None:
            requests.put(_END)
        if call is not None:
            call.cancel()

    def close(self) -> None:
        self._closed = True
        self._drop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _watch(ref: Callable[[], Stream | None]) -> None:
    """A stream's deadline watchdog: cancel its call when a reply is overdue (a
    stream has no per-message deadline of its own). Wakes a few times per
    timeout, not per step; ends with the stream."""
    while (stream := ref()) is not None and not stream._closed:
        period = max(min(stream.policy.timeout / 4, 1.0), 0.01)
        del stream
        time.sleep(period)
        stream = ref()
        if stream is None:
            return
        with stream._lock:
            pending, call = stream._pending, stream._call
            if pending is not None and call is not None and time.monotonic() > pending:
                stream._expired = True
                call.cancel()
        del stream


class _EndedError(grpc.RpcError):
    """A stream that ended without a status while a reply was awaited: the link
    dropped it; retried like UNAVAILABLE."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the stream ended before the reply"
