"""Rounds of many client processes, coordinated by the server.

`RoundCoordinator` runs inside a `SplitServer` (`coordinator=`) and answers two
calls besides `Open` and `Step`:

- `Turn(round)`: a client asks to train. In round-robin, it is told to go when
  its turn comes, with the latest client half (handed over through the server,
  which therefore sees it); in SplitFed, every client goes when the round
  starts, with the round's averaged client half. Otherwise "ask again" (a long
  poll, so no call outlives its deadline).
- `Report(round, weights, samples)`: a client hands its trained client half
  back. Round-robin passes it to the next client; SplitFed averages the round's
  reports (FedAvg by sample count) once every client that started the round has
  reported.

Which client goes, what it starts from, the FedAvg and who is dropped are all
decided by `keras_split.configurations.policy.RoundPolicy`, the same policy the
in-process `RoundRobin` and `SplitFed` consult; the coordinator adds only what
a server needs around it: a lock, the clock, long polls, and (SFLv1) averaging
the per-client server copies when a round ends.

A client that does not report within `turn_timeout` seconds of starting (a
killed process, a lost network) is dropped from that turn or round: the others
go on, and its late report is refused. Clients are known by their client id
(token or certificate), so one that restarts with a new session rejoins from
the next turn or round. Every report is checked before it is taken (see the
policy); one that fails is refused with `RoundError` and changes nothing.

No call a client can make derails the rounds: whatever it sends, the only
exception out of `turn`, `report`, `fail` and `join` is `RoundError` (which
the server turns into a gRPC status), and a round always ends once
`turn_timeout` has passed, even if every client vanishes: every `turn` call
(and `expire`, which a server may call from a timer) drops whoever ran out of
time.

The coordinator survives a server restart: `state()` gives its whole state as a
JSON-able header and arrays for the server's checkpoint, and `restore(header,
arrays)` reads them back into a fresh coordinator, which carries on as if it
had never stopped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import keras
import numpy as np

from keras_split.configurations.policy import (
    DEFAULT_MAX_SAMPLES,
    DEFAULT_MAX_WEIGHT,
    RoundError,
    RoundPolicy,
    RoundRecord,
    fedavg,
)
from keras_split.roles import ServerRole

# Defined with the policy; imported from here as before.
__all__ = ["PerClientRole", "RoundCoordinator", "RoundError", "RoundRecord"]


class PerClientRole:
    """SFLv1's server: one copy of the server half per client (by client id).

    Serve it with `SplitServer(model, role=PerClientRole(...), coordinator=
    RoundCoordinator(..., mode="splitfed", server=role))`: each client's steps
    train its own copy, and at the end of every round the coordinator averages
    the copies of the clients that reported (FedAvg) into `model` and every copy.
    """

    def __init__(self, model: keras.Model, optimizer, loss, metrics=None, loss_weights=None):
        self.model = model
        self._arguments = (optimizer, loss, metrics, loss_weights)
        self.copies: dict[str, tuple[ServerRole, threading.Lock]] = {}
        self._lock = threading.Lock()

    def _copy(self, client_id):
        with self._lock:
            if client_id not in self.copies:
                clone = keras.models.clone_model(self.model)
                clone.set_weights(self.model.get_weights())
                self.copies[client_id] = (ServerRole(clone, *self._arguments), threading.Lock())
            return self.copies[client_id]

    def handle_from(self, client_id, message):
        role, lock = self._copy(client_id)
        with lock:
            return role.handle(message)

    def average(self, counts: dict[str, int]) -> None:
        # A client that reported without a step (or whose copy was lost in a
        # server restart) trained nothing here: its copy is the round's start.
        weights = fedavg([self._copy(c)[0].model.get_weights() for c in counts],
                         list(counts.values()))
        self.model.set_weights(weights)
        for role, _ in self.copies.values():
            role.model.set_weights(weights)

    def state(self):
        from keras_split import checkpoint

        return checkpoint.values_of("model", self.model.variables)

    def restore(self, arrays, path) -> None:
        from keras_split import checkpoint

        checkpoint.assign("model", self.model.variables, arrays, path)


class RoundCoordinator:
    """Turns and rounds for `clients` client processes; see the module doc.

    A thread-safe driver of one `RoundPolicy` (`self.policy`): every call takes
    the lock, hands the policy the time, and wakes the waiting `turn` calls
    whenever the policy's state changed.

    Args:
        weights: the client half's initial weights (`client.get_weights()`).
        mode: "round_robin" or "splitfed".
        rounds: how many rounds to run.
        clients: how many clients a round waits for before it starts (SplitFed)
            or before the first turn (round-robin).
        turn_timeout: seconds a client has to report after it starts.
        poll: the longest a `Turn` call waits before answering "ask again".
        server: for SFLv1, the server's `PerClientRole`, averaged each round
            like the client halves; SplitFed is SFLv2 without it.
        max_samples: the largest sample count a report may give.
        max_weight: the largest magnitude a reported float weight may have
            (None: no bound); see the policy.
        clock: the time in seconds (monotonic); tests and simulations pass
            their own.
    """

    def __init__(self, weights, mode: str = "round_robin", rounds: int = 1, clients: int = 2,
                 turn_timeout: float = 60.0, poll: float = 5.0, server=None,
                 max_samples: int = DEFAULT_MAX_SAMPLES,
                 max_weight: float | None = DEFAULT_MAX_WEIGHT,
                 clock: Callable[[], float] = time.monotonic):
        if server is not None and mode != "splitfed":
            raise ValueError("`server` (per-client server copies) applies to SplitFed only.")
        self.policy = RoundPolicy(weights, mode, rounds, clients, turn_timeout, max_samples,
                                  max_weight)
        self.server, self.poll, self.clock = server, poll, clock
        self._lock = threading.Condition()
        self._listeners: list[Callable[[], None]] = []

    # What the policy holds, read as before.
    mode = property(lambda self: self.policy.mode)
    rounds = property(lambda self: self.policy.rounds)
    expected = property(lambda self: self.policy.expected)
    turn_timeout = property(lambda self: self.policy.turn_timeout)
    max_samples = property(lambda self: self.policy.max_samples)
    max_weight = property(lambda self: self.policy.max_weight)
    round = property(lambda self: self.policy.round)
    weights = property(lambda self: self.policy.weights)
    members = property(lambda self: self.policy.members)
    history = property(lambda self: self.policy.history)
    finished = property(lambda self: self.policy.finished)

    # -- the calls (each one event of the policy) ---------------------------------

    def join(self, client_id: str) -> bool:
        """Make `client_id` a member (next in the turn order) without asking for
        a turn; `turn` does this too. Returns whether it was new."""
        with self._lock:
            return self._apply(self.policy.join, client_id, self.clock())

    def turn(self, client_id: str, ready_for: int, wait: float | None = None):
        """(go, round, weights, finished) for `client_id`, waiting up to `wait`
        seconds (`poll` by default; 0 answers at once) for it to go."""
        deadline = self.clock() + (self.poll if wait is None else wait)
        with self._lock:
            while True:
                decision = self._apply(self.policy.turn, client_id, ready_for, self.clock())
                if decision.go or decision.finished:
                    return decision.go, decision.round, decision.weights, decision.finished
                now = self.clock()
                left = deadline - now
                if left <= 0:
                    return False, decision.round, [], False
                # Wake for a change (notify) or when the policy has someone to
                # drop, whichever comes first; never spin.
                due = self.policy.next_expiry()
                self._lock.wait(left if due is None else min(left, max(due - now, 0.01)))

    def report(self, client_id: str, round_: int, weights, samples: int) -> int:
        """Take `client_id`'s trained client half for `round_`; returns the round
        now. Raises `RoundError` (and changes nothing) if the report does not fit."""
        with self._lock:
            # A late report is refused by the policy itself (and changes nothing);
            # the turn it belonged to is dropped by the next `turn` call's expiry.
            return self._apply(self.policy.report, client_id, round_, weights, samples,
                               self.clock())

    def fail(self, client_id: str) -> None:
        """`client_id`'s link failed during its turn: drop it now rather than
        after `turn_timeout`. Raises `RoundError` if it is not training."""
        with self._lock:
            self._apply(self.policy.fail, client_id, self.clock())

    def expire(self) -> list:
        """Drop whoever ran out of time (see `RoundPolicy.expire`); returns them.

        Every `turn` call does this; a server that calls it from a timer ends
        rounds on time even while no client asks for a turn.
        """
        with self._lock:
            return self._apply(self.policy.expire, self.clock())

    def listen(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback()` after every change of the policy's state, when
        `turn` calls blocked in this process are woken; for drivers that cannot
        block a thread, such as an asyncio server. It runs in the thread that
        made the change, under the coordinator's lock: it must only schedule
        work (`loop.call_soon_threadsafe`), never call the coordinator.
        Returns a function that removes it."""
        with self._lock:
            self._listeners.append(callback)

        def remove() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return remove

    def seconds_to_expiry(self) -> float | None:
        """Seconds until `expire` would drop someone (None: nobody is due)."""
        with self._lock:
            due = self.policy.next_expiry()
            return None if due is None else max(due - self.clock(), 0.0)

    # -- checkpoints ---------------------------------------------------------------

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The coordinator's whole state, for the server's checkpoint.

        Store the header under one key of the checkpoint header (it is JSON-able:
        str, int, float, None, lists and dicts) and the arrays under a prefix
        (their names are "weights/<i>" and "reports/<k>/<i>"); `restore` takes
        them back as they were, prefix removed. It changes nothing (it does not
        expire anyone) and can be called at any time, from any thread.

        Returns:
            `(header, arrays)`, as `RoundPolicy.state` documents them field by
            field: the configuration (to check a restore against), the round,
            the members in turn order, the turn index, who is training and for
            how long, whose reports (with sample counts) were taken in the round
            and who was dropped, the history; and copies of the round's weights
            and of the pending SplitFed reports' weights. Times are seconds
            elapsed at the time of the call, on `clock`.

            Not in it: SFLv1's per-client server copies (`PerClientRole`
            checkpoints only the averaged server half): after a restart, a
            client's copy restarts from the server half of the round's start.
        """
        with self._lock:
            return self.policy.state(self.clock())

    def restore(self, header: dict, arrays: dict[str, np.ndarray],
                restart_timers: bool = False) -> None:
        """Replace the whole state with one `state` gave, after checking it all.

        Meant for a fresh coordinator built with the configuration of the one
        that saved (same `mode` and client half; `rounds` may be larger, to
        extend a run). Waiting `turn` calls are woken.

        Times: by default every timer resumes with the time it had left when
        `state` was called (the time the server was down does not count against
        anyone); with `restart_timers=True` every training client, and the turn
        or round waiting to be claimed, gets a full `turn_timeout` from now.

        Raises:
            ValueError: the header or arrays do not fit this coordinator's
                configuration or are inconsistent (the message says which
                field); nothing is changed.
        """
        with self._lock:
            self._apply(self.policy.restore, header, arrays, self.clock(), restart_timers)

    # -- under the lock ------------------------------------------------------------

    def _apply(self, event, *arguments):
        before = self.policy.changes
        try:
            return event(*arguments)
        finally:
            if self.policy.changes != before:
                for ended in self.policy.take_round_ends():
                    if self.server is not None and ended.counts:  # SFLv1: the server copies too
                        self.server.average(ended.counts)
                self._lock.notify_all()
                for callback in list(self._listeners):
                    callback()
