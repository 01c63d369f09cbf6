"""The round policy of round-robin split learning and SplitFed, with no driver.

`RoundPolicy` decides, and only decides:

1. **Whose turn it is.** Round-robin: one client at a time, in the order the
   clients joined. SplitFed: every client that has not reported or dropped out,
   as soon as the round starts. The first round starts when `clients` clients
   have joined.
2. **What a client starts from.** Round-robin: the latest client half (the
   hand-off from the previous client). SplitFed: the round's client half, the
   FedAvg of the previous round's reports.
3. **The FedAvg weights**: each report counts in proportion to its sample count
   (`fedavg_coefficients`).
4. **Who is dropped**: a client whose turn outlives `turn_timeout` seconds, a
   turn (round-robin) or round (SplitFed) that nobody claims within
   `turn_timeout` seconds of opening, and a client whose link fails (`fail`).
   A dropped client's update is discarded; it takes part again from the next
   turn or round.
5. **When a round ends**: round-robin, after every member's turn; SplitFed, once
   no client is training and every member has reported or dropped out.

Every report is checked before it is recorded (an open turn, in time, a sample
count in (0, `max_samples`], weights with the round's length, dtypes and shapes,
all finite); a report that fails raises `RoundError` and changes nothing.

It has no threads, no clock and no TensorFlow: time is an argument (`now`, in
seconds of any monotonic clock), so the same object runs under two drivers.
`keras_split.configurations.federation` (`RoundRobin`, `SplitFed`) calls it in
process, one event at a time; `keras_split.configurations.rounds`
(`RoundCoordinator`) wraps it in a lock and long polls for client processes.

Example:

```python
policy = RoundPolicy([np.zeros(2, "float32")], "splitfed", rounds=1, clients=2)
start = policy.turn("a", 1, now=0.0)      # not yet: b has not joined
start = policy.turn("b", 1, now=0.0)      # the round starts: b goes
start = policy.turn("a", 1, now=0.0)      # and a too, from the same weights
policy.report("a", 1, [np.ones(2, "float32")], samples=10, now=1.0)
policy.report("b", 1, [np.full(2, 4.0, "float32")], samples=30, now=2.0)
policy.weights  # [array([3.25, 3.25])]: (1 * 10 + 4 * 30) / 40
```
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

MODES = ("round_robin", "splitfed")
# Large enough for any real shard, small enough that a forged count cannot give
# one client all the weight of a FedAvg (or overflow the total).
DEFAULT_MAX_SAMPLES = 10**9


@dataclass
class RoundRecord:
    """Who trained in a round and who was dropped, in the order it happened."""

    round: int
    trained: list = field(default_factory=list)
    dropped: list = field(default_factory=list)


class RoundError(ValueError):
    """A report that does not fit the round (late, unexpected, wrong shapes)."""


@dataclass(frozen=True)
class Turn:
    """The policy's answer to a client that asks to train.

    Attributes:
        go: whether the client trains now.
        round: the current round.
        weights: the client half to start from (empty unless `go`).
        finished: no rounds are left.
    """

    go: bool
    round: int
    weights: list
    finished: bool


@dataclass(frozen=True)
class RoundEnd:
    """A round that ended.

    Attributes:
        round: its number.
        weights: the client half the next round starts from (round-robin: the
            last report; SplitFed: the FedAvg of the reports).
        counts: the sample count of every client whose report was taken, in
            the order they reported: FedAvg's weights, and what a driver uses
            to average anything else per client (SFLv1's server copies).
    """

    round: int
    weights: list
    counts: dict


def fedavg_coefficients(counts: Sequence[int]) -> list[float]:
    """Each client's share of a FedAvg: its sample count over the total.

    Args:
        counts: the sample count of each client, all positive.

    Returns:
        A list of floats, one per client, that sums to 1.
    """
    counts = list(counts)
    bad = [n for n in counts if isinstance(n, bool) or not isinstance(n, numbers.Integral)
           or n <= 0]
    if bad:
        raise ValueError(f"FedAvg needs a positive integer sample count per client, received "
                         f"{counts}. Leave out the clients that trained on no samples.")
    # The counts are positive, so the total is too: no division by zero.
    total = float(sum(counts))
    return [n / total for n in counts]


def fedavg(weight_sets: list[list[np.ndarray]], counts: list[int]) -> list[np.ndarray]:
    """The sample-weighted average of several weight lists (FedAvg).

    Args:
        weight_sets: one list of arrays per client, all of the same structure.
        counts: the number of samples each client trained on (positive).

    Returns:
        One list of arrays: sum over clients of `weights * count / total`, in
        the dtype of the first client's arrays.
    """
    if not weight_sets:
        raise ValueError("No weights to average: every client dropped out of the round.")
    if len(counts) != len(weight_sets):
        raise ValueError(f"Give one sample count per weight list: {len(weight_sets)} weight "
                         f"lists, received {len(counts)} counts.")
    shares = fedavg_coefficients(counts)
    return [sum(w[i] * share for w, share in zip(weight_sets, shares, strict=True))
            .astype(weight_sets[0][i].dtype) for i in range(len(weight_sets[0]))]


class RoundPolicy:
    """Turns, hand-offs, FedAvg, dropouts and round ends; see the module doc.

    Clients are known by any hashable id (an index in process, a client id over
    the network). State changes only through `join`, `turn`, `report`, `fail`
    and `expire`; each takes the current time, so the caller owns the clock.

    Args:
        weights: the client half's initial weights.
        mode: "round_robin" or "splitfed".
        rounds: how many rounds to run.
        clients: how many clients must join before the first round starts.
        turn_timeout: seconds a client has to report after it starts, and that
            an open turn (round-robin) or round (SplitFed) waits to be claimed;
            None never drops anyone for time.
        max_samples: the largest sample count a report may give.
    """

    def __init__(self, weights, mode: str = "round_robin", rounds: int = 1, clients: int = 2,
                 turn_timeout: float | None = None, max_samples: int = DEFAULT_MAX_SAMPLES):
        if mode not in MODES:
            raise ValueError(f"`mode` must be 'round_robin' or 'splitfed', received {mode!r}.")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"`rounds` must be a non-negative integer, received {rounds!r}.")
        if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
            raise ValueError(f"`clients` must be a positive integer, received {clients!r}.")
        if turn_timeout is not None and not turn_timeout > 0:
            raise ValueError(f"`turn_timeout` must be a positive number of seconds or None, "
                             f"received {turn_timeout!r}.")
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"`max_samples` must be a positive integer, received "
                             f"{max_samples!r}.")
        self.mode, self.rounds, self.expected = mode, rounds, clients
        self.turn_timeout, self.max_samples = turn_timeout, max_samples
        self.weights = [np.array(w) for w in weights]
        self.round = 1
        self.members: list = []                 # in order of arrival: the turn order
        self.history: list[RoundRecord] = [RoundRecord(1)] if rounds else []
        # Counts every change of state, so that a driver knows when to wake
        # whoever waits on the policy (and only then).
        self.changes = 0
        self._turn = 0                          # round-robin: index into members
        self._started: dict = {}                # who is training now, since when
        self._counts: dict = {}                 # this round's reports: samples
        self._reports: dict = {}                # SplitFed: this round's reports: weights
        self._opened: float | None = None       # when the current turn or round opened
        self._ended: list[RoundEnd] = []        # rounds ended and not yet taken

    @property
    def finished(self) -> bool:
        return self.round > self.rounds

    @property
    def training(self) -> list:
        """The clients training now."""
        return list(self._started)

    # -- events ----------------------------------------------------------------

    def join(self, client_id: Hashable, now: float) -> bool:
        """Add `client_id` to the members (the turn order) if it is new.

        Returns:
            Whether it was new.
        """
        if client_id in self.members:
            return False
        self.members.append(client_id)
        if len(self.members) == self.expected and self._opened is None:
            self._opened = now
        self.changes += 1
        return True

    def turn(self, client_id: Hashable, ready_for: int, now: float) -> Turn:
        """`client_id` asks to train in round `ready_for` or later.

        It joins if it is new, turns that timed out by `now` are dropped, and
        it goes if the policy lets it (see `may_start`); it then counts as
        training from `now`.

        Returns:
            A `Turn`: go (with the weights to start from), not yet, or finished.
        """
        self.join(client_id, now)
        self.expire(now)
        if self.finished:
            return Turn(False, self.round, [], True)
        if not self.may_start(client_id, ready_for):
            return Turn(False, self.round, [], False)
        self._started[client_id] = now
        self.changes += 1
        return Turn(True, self.round, list(self.weights), False)

    def report(self, client_id: Hashable, round_: int, weights, samples: int,
               now: float) -> int:
        """`client_id` hands back the client half it trained in `round_`.

        Round-robin: the weights go to the next client. SplitFed: they are kept
        until the round ends, then averaged with the others (FedAvg).

        Args:
            client_id: who reports.
            round_: the round its turn was in.
            weights: the trained client half.
            samples: how many samples it trained on.
            now: the time.

        Returns:
            The current round after the report.

        Raises:
            RoundError: the report does not fit (no open turn, late, a bad
                sample count, weights of another structure, non-finite
                values); the policy is then left exactly as it was.
        """
        arrays = self.check_report(client_id, round_, weights, samples, now)
        del self._started[client_id]
        self.history[-1].trained.append(client_id)
        self._counts[client_id] = int(samples)
        self.changes += 1
        if self.mode == "round_robin":
            self.weights = arrays
            self._advance_turn(now)
        else:
            self._reports[client_id] = arrays
            self._maybe_average(now)
        return self.round

    def fail(self, client_id: Hashable, now: float) -> None:
        """`client_id`'s link failed during its turn: drop it from this turn
        (round-robin) or round (SplitFed), discarding its update.

        Raises:
            RoundError: `client_id` is not training.
        """
        if client_id not in self._started:
            raise RoundError(f"{client_id!r} failed, but it has no open turn (training now: "
                             f"{list(self._started)}). Report a failure only between a turn "
                             f"that went and its report.")
        del self._started[client_id]
        self._drop([client_id], now)

    def expire(self, now: float) -> list:
        """Drop every client whose turn outlived `turn_timeout` by `now`, and
        the clients of a turn or round that nobody claimed in that time.

        Returns:
            The clients dropped, in order.
        """
        if self.turn_timeout is None:
            return []
        dropped = []
        for client_id, since in list(self._started.items()):
            if now - since > self.turn_timeout:
                del self._started[client_id]
                self._drop([client_id], now)
                dropped.append(client_id)
        # A turn (or round) that a client never claims expires too: a client that
        # is gone for good must not stall the others.
        if self._opened is None or self.finished or now - self._opened <= self.turn_timeout:
            return dropped
        unclaimed = self._unclaimed()
        if unclaimed:
            # All at once: dropping them one by one could end the round at the
            # first and drop the rest from the next.
            self._drop(unclaimed, now)
        return dropped + unclaimed

    def take_round_ends(self) -> list[RoundEnd]:
        """The rounds that ended since the last call, oldest first."""
        ended, self._ended = self._ended, []
        return ended

    # -- questions (no change of state) ----------------------------------------

    def may_start(self, client_id: Hashable, ready_for: int) -> bool:
        """Whether `client_id`, a member, may start training now."""
        if self.finished or self.round < ready_for or client_id in self._started:
            return False
        if len(self.members) < self.expected and self.round == 1 and not self.history[0].trained:
            return False  # the first round starts when the clients have arrived
        if self.mode == "round_robin":
            return not self._started and self.members[self._turn] == client_id
        record = self.history[-1]
        return client_id not in self._counts and client_id not in record.dropped

    def next_expiry(self) -> float | None:
        """The time after which `expire` would drop someone, or None if none
        is due (so a driver that waits knows when to look again)."""
        if self.turn_timeout is None or self.finished:
            return None
        times = [since + self.turn_timeout for since in self._started.values()]
        if self._opened is not None and self._unclaimed():
            times.append(self._opened + self.turn_timeout)
        return min(times, default=None)

    def check_report(self, client_id: Hashable, round_: int, weights, samples: int,
                     now: float) -> list[np.ndarray]:
        """The checks of `report`, without recording anything.

        Returns:
            The reported weights as new arrays.

        Raises:
            RoundError: see `report`.
        """
        if round_ != self.round or client_id not in self._started:
            expired = ("" if self.turn_timeout is None else
                       f"; a turn that outlived turn_timeout={self.turn_timeout:g} s was dropped")
            raise RoundError(
                f"no turn of {client_id!r} in round {round_} is open (the round is "
                f"{self.round}{expired}). Report only the weights of a turn that went, in the "
                f"round it named; a dropped client rejoins from the next turn or round.")
        elapsed = now - self._started[client_id]
        if self.turn_timeout is not None and elapsed > self.turn_timeout:
            raise RoundError(
                f"the report of {client_id!r} for round {round_} is late: its turn started "
                f"{elapsed:g} s ago, more than turn_timeout={self.turn_timeout:g} s, so it "
                f"is dropped. Train for less than turn_timeout per turn, or raise it.")
        if (isinstance(samples, bool) or not isinstance(samples, numbers.Integral)
                or not 0 < samples <= self.max_samples):
            raise RoundError(
                f"the report of {client_id!r} gives a sample count of {samples!r}; expected "
                f"an integer in 1..{self.max_samples} (the number of samples it trained on, "
                f"which weighs its weights in FedAvg).")
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise RoundError(f"the report of {client_id!r} gives weights of type "
                             f"{type(weights).__name__}; expected a list of "
                             f"{len(self.weights)} arrays (`client.get_weights()`).")
        if len(weights) != len(self.weights):
            raise RoundError(
                f"the report of {client_id!r} gives {len(weights)} weight arrays; the client "
                f"half has {len(self.weights)}. Report `client.get_weights()` of the model "
                f"the turn's weights were loaded into.")
        try:
            arrays = [np.array(w) for w in weights]
        except (TypeError, ValueError) as error:
            raise RoundError(f"the report of {client_id!r} has weights that are not arrays: "
                             f"{error}") from error
        got = [(str(w.dtype), w.shape) for w in arrays]
        want = [(str(w.dtype), w.shape) for w in self.weights]
        if got != want:
            raise RoundError(
                f"the reported weights have shapes and dtypes {got}, the client half has "
                f"{want}. Report `client.get_weights()` of the model the turn's weights "
                f"were loaded into.")
        for index, array in enumerate(arrays):
            if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
                raise RoundError(
                    f"the report of {client_id!r} has non-finite values (NaN or inf) in "
                    f"weights[{index}]. Its training diverged: lower the learning rate, or "
                    f"clip gradients.")
        return arrays

    # -- bookkeeping -------------------------------------------------------------

    def _unclaimed(self) -> list:
        """Who an unclaimed turn (round-robin) or round (SplitFed) would drop."""
        if self.finished or not self.members:
            return []
        if self.mode == "round_robin":
            return [] if self._started else [self.members[self._turn]]
        record = self.history[-1]
        return [m for m in self.members if m not in self._counts and m not in self._started
                and m not in record.dropped]

    def _drop(self, client_ids: list, now: float) -> None:
        self.history[-1].dropped.extend(client_ids)
        self.changes += 1
        if self.mode == "round_robin":
            self._advance_turn(now)
        else:
            # The round does not end early for a dropout: members that have not
            # claimed it yet keep their time (the unclaimed expiry drops them).
            self._maybe_average(now)

    def _advance_turn(self, now: float) -> None:
        self._turn += 1
        self._opened = now
        if self._turn >= len(self.members):
            self._turn = 0
            self._next_round()

    def _maybe_average(self, now: float) -> None:
        if self._started or self._unclaimed():
            return  # someone is still training, or has yet to start
        if self._reports:
            self.weights = fedavg(list(self._reports.values()), list(self._counts.values()))
        self._opened = now
        self._next_round()

    def _next_round(self) -> None:
        self._ended.append(RoundEnd(self.round, list(self.weights), dict(self._counts)))
        self._counts, self._reports = {}, {}
        self.round += 1
        if not self.finished:
            self.history.append(RoundRecord(self.round))

    def __repr__(self) -> str:
        return (f"RoundPolicy(mode={self.mode!r}, round={self.round}/{self.rounds}, "
                f"members={self.members}, training={list(self._started)})")
