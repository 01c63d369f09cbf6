"""Sessions of a `SplitServer`: one per client connection, bounded and expiring.

A session belongs to the client that opened it, remembers the codec agreed at
`Open`, the last step applied (retransmissions get the cached reply, the
optimizer moves once) and when it was last used. The table bounds what any
client can make the server hold:

- at most `max_per_client` open sessions per client: an `Open` beyond that is
  refused (RESOURCE_EXHAUSTED, naming the limit) after idle sessions have been
  expired;
- a session unused for `idle_timeout` seconds expires (its client gets
  NOT_FOUND and opens a new one);

so memory grows with the number of clients, not with what they send.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from keras_split_wire import codecs
from keras_split_wire.proto import split_pb2 as pb


@dataclass
class Session:
    client_id: str
    codec: codecs.Codec = codecs.NONE
    last_step: int = 0
    last_train_step: int = 0  # the last step that changed weights
    cached: pb.StepReply | None = None
    last_used: float = field(default_factory=time.monotonic)
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


class SessionLimit(Exception):
    """A client asked for more sessions than the server allows it."""


class SessionTable:
    """The server's sessions, by id; thread-safe.

    Args:
        max_per_client: open sessions one client may hold.
        idle_timeout: seconds after which an unused session expires (None: never).
        clock: the time source (tests pass a fake one).
    """

    def __init__(self, max_per_client: int = 8, idle_timeout: float | None = 3600.0,
                 clock: Callable[[], float] = time.monotonic):
        if max_per_client < 1:
            raise ValueError(f"`max_sessions_per_client` must be at least 1, received "
                             f"{max_per_client}.")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"`session_idle_timeout` must be positive or None, received "
                             f"{idle_timeout}.")
        self.max_per_client, self.idle_timeout, self.clock = max_per_client, idle_timeout, clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def values(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def items(self) -> list[tuple[str, Session]]:
        with self._lock:
            return list(self._sessions.items())

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                session.last_used = self.clock()
            return session

    def open(self, client_id: str, codec: codecs.Codec) -> tuple[str, Session, list[str]]:
        """A new session for `client_id`; returns (id, session, ids expired to make room).

        Raises `SessionLimit` when the client already holds `max_per_client`
        sessions that are not idle.
        """
        with self._lock:
            expired = self._expire_locked()
            held = sum(s.client_id == client_id for s in self._sessions.values())
            if held >= self.max_per_client:
                raise SessionLimit(
                    f"client {client_id!r} already holds {held} open sessions, the server's "
                    f"limit (max_sessions_per_client={self.max_per_client}); reuse a session "
                    "(resume it) or wait for idle ones to expire"
                    + (f" after {self.idle_timeout:g} s" if self.idle_timeout else ""))
            session_id = secrets.token_hex(16)
            session = Session(client_id=client_id, codec=codec, last_used=self.clock())
            self._sessions[session_id] = session
            return session_id, session, expired

    def restore(self, session_id: str, session: Session) -> None:
        session.last_used = self.clock()
        with self._lock:
            self._sessions[session_id] = session

    def expire(self) -> list[str]:
        """Drop sessions idle for longer than `idle_timeout`; returns their ids."""
        with self._lock:
            return self._expire_locked()

    def _expire_locked(self) -> list[str]:
        if self.idle_timeout is None:
            return []
        now = self.clock()
        gone = [sid for sid, s in self._sessions.items()
                if now - s.last_used > self.idle_timeout and not s.lock.locked()]
        for sid in gone:
            del self._sessions[sid]
        return gone
