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

A client that does not report within `turn_timeout` seconds of starting (a
killed process, a lost network) is dropped from that turn or round: the others
go on, and its late report is refused. Clients are known by their client id
(token or certificate), so one that restarts with a new session rejoins from
the next turn or round.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import keras
import numpy as np

from keras_split.configurations.federation import fedavg
from keras_split.roles import ServerRole


@dataclass
class RoundRecord:
    round: int
    trained: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


class RoundError(ValueError):
    """A report that does not fit the round (late, unexpected, wrong shapes)."""


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
        weights = fedavg([self.copies[c][0].model.get_weights() for c in counts],
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
    """

    def __init__(self, weights, mode: str = "round_robin", rounds: int = 1, clients: int = 2,
                 turn_timeout: float = 60.0, poll: float = 5.0, server=None):
        if server is not None and mode != "splitfed":
            raise ValueError("`server` (per-client server copies) applies to SplitFed only.")
        self.server = server
        if mode not in ("round_robin", "splitfed"):
            raise ValueError(f"`mode` must be 'round_robin' or 'splitfed', received {mode!r}.")
        self.mode, self.rounds, self.expected = mode, rounds, clients
        self.turn_timeout, self.poll = turn_timeout, poll
        self.weights = [np.asarray(w) for w in weights]
        self.round = 1
        self.members: list[str] = []          # in order of arrival: the turn order
        self.history: list[RoundRecord] = [RoundRecord(1)]
        self._lock = threading.Condition()
        self._turn = 0                         # round-robin: index into members
        self._started: dict[str, float] = {}   # who is training now, since when
        self._reports: dict[str, tuple] = {}   # SplitFed: this round's reports
        self._opened = None                    # when the current turn or round opened

    @property
    def finished(self) -> bool:
        return self.round > self.rounds

    # -- the two calls ---------------------------------------------------------

    def turn(self, client_id: str, ready_for: int):
        """(go, round, weights, finished) for `client_id`, waiting up to `poll` s."""
        deadline = time.monotonic() + self.poll
        with self._lock:
            if client_id not in self.members:
                self.members.append(client_id)
                if len(self.members) == self.expected and self._opened is None:
                    self._opened = time.monotonic()
                self._lock.notify_all()
            while True:
                self._expire()
                if self.finished:
                    return False, self.round, [], True
                if self._may_start(client_id, ready_for):
                    self._started[client_id] = time.monotonic()
                    return True, self.round, list(self.weights), False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False, self.round, [], False
                self._lock.wait(min(left, 0.2))

    def report(self, client_id: str, round_: int, weights, samples: int) -> int:
        weights = [np.asarray(w) for w in weights]
        with self._lock:
            self._expire()
            if round_ != self.round or client_id not in self._started:
                raise RoundError(f"no turn of {client_id!r} in round {round_} is open (the "
                                 f"round is {self.round}; a turn that outlived "
                                 f"{self.turn_timeout:g} s was dropped)")
            shapes = [w.shape for w in self.weights]
            if [w.shape for w in weights] != shapes:
                raise RoundError(f"the reported weights have shapes {[w.shape for w in weights]}"
                                 f", the client half has {shapes}")
            del self._started[client_id]
            self.history[-1].trained.append(client_id)
            if self.mode == "round_robin":
                self.weights = weights
                self._advance_turn()
            else:
                self._reports[client_id] = (weights, samples)
                self._maybe_average()
            self._lock.notify_all()
            return self.round

    # -- bookkeeping (under the lock) -----------------------------------------

    def _may_start(self, client_id, ready_for) -> bool:
        if self.round < ready_for or client_id in self._started:
            return False
        if len(self.members) < self.expected and self.round == 1 and not self.history[0].trained:
            return False  # the first round starts when the clients have arrived
        if self.mode == "round_robin":
            return not self._started and self.members[self._turn] == client_id
        record = self.history[-1]
        return client_id not in self._reports and client_id not in record.dropped

    def _expire(self) -> None:
        now = time.monotonic()
        for client_id, since in list(self._started.items()):
            if now - since > self.turn_timeout:
                del self._started[client_id]
                self._drop(client_id)
        # A turn (or round) that a client never claims expires too: a client that
        # is gone for good must not stall the others.
        if self._opened is None or self.finished or now - self._opened <= self.turn_timeout:
            return
        if self.mode == "round_robin" and not self._started:
            self._drop(self.members[self._turn])
        elif self.mode == "splitfed":
            record = self.history[-1]
            for member in self.members:
                if (member not in self._reports and member not in self._started
                        and member not in record.dropped):
                    self._drop(member)

    def _drop(self, client_id) -> None:
        self.history[-1].dropped.append(client_id)
        if self.mode == "round_robin":
            self._advance_turn()
        else:
            self._maybe_average(force=not self._started)
        self._lock.notify_all()

    def _next_round(self) -> None:
        self.round += 1
        if not self.finished:
            self.history.append(RoundRecord(self.round))

    def _advance_turn(self) -> None:
        self._turn += 1
        self._opened = time.monotonic()
        if self._turn >= len(self.members):
            self._turn = 0
            self._next_round()

    def _maybe_average(self, force: bool = False) -> None:
        if self._started:
            return  # someone is still training
        record = self.history[-1]
        pending = [m for m in self.members if m not in self._reports and m not in record.dropped]
        if pending and not force:
            return
        if self._reports:
            weights, counts = zip(*self._reports.values(), strict=True)
            self.weights = fedavg(list(weights), list(counts))
            if self.server is not None:  # SFLv1: the server copies too
                self.server.average({c: n for c, (_, n) in self._reports.items()})
        self._reports = {}
        self._opened = time.monotonic()
        self._next_round()
