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
"""

from __future__ import annotations

import itertools
import random
import time
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
    retrying a certificate problem only delays the error."""
    text = details.lower()
    return any(word in text for word in ("ssl", "tls", "handshake", "certificate"))


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
            code = error.code()
            details = error.details() or ""
            if code in _FAIL_FAST:
                kind, text = _FAIL_FAST[code]
                raise kind(text.format(details=details)) from None
            if code == grpc.StatusCode.UNAVAILABLE and is_tls_failure(details):
                raise LinkDownError(
                    f"TLS handshake with {address} failed ({details}). Check that "
                    f"{tls_hint} is the CA that signed the server's certificate, and the "
                    "client certificate if the server requires one."
                ) from None
            if code != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= give_up:
                raise LinkDownError(
                    f"Call to the split server at {address} failed: {code.name} "
                    f"({details}) after {attempt + 1} attempt(s) in "
                    f"{policy.retry_for:g} s of retrying."
                ) from None
            sleep(random.uniform(0, delay))  # noqa: S311 - jitter, not cryptographic
            delay = min(delay * 2, policy.max_backoff)
    raise AssertionError("unreachable")  # pragma: no cover
