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

Every event is checked before it changes anything. A report needs an open
turn, in time, a sample count in 1..`max_samples`, and weights with the round's
length, dtypes and shapes, all finite and no larger in magnitude than
`max_weight`. One that fails (whatever it holds: wrong types, NaN, a negative
count that would cancel the others' total) raises `RoundError` naming the
field, and the policy is left exactly as it was; no other exception comes out
of an event.

**Absurd values.** A finite but huge weight (3e38 in float32) would dominate a
FedAvg or overflow it to inf, so reports are bounded twice: a float weight
beyond `max_weight` (1e6 by default, far above any trained weight; None turns
the bound off) is refused, and FedAvg sums in float64 whatever the dtype, so a
sample-weighted average of finite values is finite and cast back without
overflow.

**Every round ends.** With a `turn_timeout`, once the first round has started
something is always due (`next_expiry`): a client training, a turn or round
waiting to be claimed. A driver that calls `expire` at that time drops it, so a
round with M members ends at most M + 1 timeouts after its last event, even if
every client has vanished (tests/test_policy.py checks this on random event
sequences).

**Checkpoints.** `state(now)` returns the whole state as a JSON-able header and
arrays, and `restore(header, arrays, now)` reads it back after checking all of
it; times are saved as seconds elapsed, so each timer resumes with the time it
had left (see `state`).

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

import math
import numbers
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

MODES = ("round_robin", "splitfed")
# Large enough for any real shard, small enough that a forged count cannot give
# one client all the weight of a FedAvg (or overflow the total).
DEFAULT_MAX_SAMPLES = 10**9
# Far above any trained weight (which are of order 1), far below where float32
# sums overflow (3.4e38): a report beyond it is refused, not averaged.
DEFAULT_MAX_WEIGHT = 1e6
# The version of the header `RoundPolicy.state` writes.
STATE_FORMAT = 1


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

    The sum runs in float64 whatever the dtype (a float32 sum of large values
    overflows to inf, a float16 one loses the small clients' shares), and is
    cast back: a weighted average of finite values is finite and no larger than
    the largest of them, so the cast cannot overflow. Integer and boolean
    arrays are rounded to the nearest value of their dtype.

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
    averaged = []
    for i, first in enumerate(weight_sets[0]):
        total = sum(np.asarray(w[i], np.float64) * share
                    for w, share in zip(weight_sets, shares, strict=True))
        averaged.append(_cast(np.asarray(total), np.asarray(first).dtype))
    return averaged


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "biu":
        low, high = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        # float64(2**63 - 1) rounds up to 2**63, which int64 cannot hold.
        top = np.float64(high)
        if int(top) > high:
            top = np.nextafter(top, 0)
        values = np.clip(np.rint(values), np.float64(low), top)
    return values.astype(dtype)


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_id(value) -> bool:
    """A client id that a checkpoint header (JSON) can hold and give back."""
    return isinstance(value, str) or _is_integer(value)


class RoundPolicy:
    """Turns, hand-offs, FedAvg, dropouts and round ends; see the module doc.

    Clients are known by any hashable id (an index in process, a client id over
    the network; `state` needs str or int). State changes only through `join`,
    `turn`, `report`, `fail`, `expire` and `restore`; each takes the current
    time, so the caller owns the clock. An event either succeeds or raises
    `RoundError` and changes nothing.

    Args:
        weights: the client half's initial weights (numeric arrays, finite).
        mode: "round_robin" or "splitfed".
        rounds: how many rounds to run.
        clients: how many clients must join before the first round starts.
        turn_timeout: seconds a client has to report after it starts, and that
            an open turn (round-robin) or round (SplitFed) waits to be claimed;
            None never drops anyone for time (and so cannot promise that a
            round ends if a client vanishes).
        max_samples: the largest sample count a report may give.
        max_weight: the largest magnitude a reported float weight may have;
            None for no bound (non-finite values are refused regardless).
    """

    def __init__(self, weights, mode: str = "round_robin", rounds: int = 1, clients: int = 2,
                 turn_timeout: float | None = None, max_samples: int = DEFAULT_MAX_SAMPLES,
                 max_weight: float | None = DEFAULT_MAX_WEIGHT):
        if mode not in MODES:
            raise ValueError(f"`mode` must be 'round_robin' or 'splitfed', received {mode!r}.")
        if not _is_integer(rounds) or rounds < 0:
            raise ValueError(f"`rounds` must be a non-negative integer, received {rounds!r}.")
        if not _is_integer(clients) or clients < 1:
            raise ValueError(f"`clients` must be a positive integer, received {clients!r}.")
        if turn_timeout is not None and not (
                isinstance(turn_timeout, numbers.Real) and not isinstance(turn_timeout, bool)
                and 0 < turn_timeout < math.inf):
            raise ValueError(f"`turn_timeout` must be a positive number of seconds or None, "
                             f"received {turn_timeout!r}.")
        if not _is_integer(max_samples) or max_samples < 1:
            raise ValueError(f"`max_samples` must be a positive integer, received "
                             f"{max_samples!r}.")
        if max_weight is not None and not (
                isinstance(max_weight, numbers.Real) and not isinstance(max_weight, bool)
                and max_weight > 0):
            raise ValueError(f"`max_weight` must be a positive number or None, received "
                             f"{max_weight!r}.")
        self.mode, self.rounds, self.expected = mode, int(rounds), int(clients)
        self.turn_timeout, self.max_samples, self.max_weight = turn_timeout, max_samples, max_weight
        self.weights = [np.array(w) for w in weights]
        for index, array in enumerate(self.weights):
            if array.dtype.kind not in "biuf":
                raise ValueError(f"weights[{index}] has dtype {array.dtype}; the client half's "
                                 f"weights must be numeric arrays (`client.get_weights()`).")
            problem = self._value_problem(array)
            if problem:
                raise ValueError(f"The initial weights[{index}] have {problem}. Pass finite "
                                 f"weights, or a larger `max_weight`.")
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

        Raises:
            RoundError: `client_id` is not hashable.
        """
        _check_id(client_id)
        if client_id in self.members:
            return False
        self.members.append(client_id)
        if len(self.members) >= self.expected and self._opened is None:
            self._opened = now
        self.changes += 1
        return True

    def turn(self, client_id: Hashable, ready_for: int, now: float) -> Turn:
        """`client_id` asks to train in round `ready_for` or later.

        It joins if it is new, turns that timed out by `now` are dropped, and
        it goes if the policy lets it (see `may_start`); it then counts as
        training from `now`.

        Returns:
            A `Turn`: go (with a copy of the weights to start from), not yet,
            or finished.

        Raises:
            RoundError: `client_id` is not hashable or `ready_for` not an integer.
        """
        _check_id(client_id)
        if not _is_integer(ready_for):
            raise RoundError(f"{client_id!r} asks for a turn in round {ready_for!r}; `round` "
                             f"must be an integer (the round it is ready for).")
        self.join(client_id, now)
        self.expire(now)
        if self.finished:
            return Turn(False, self.round, [], True)
        if not self.may_start(client_id, ready_for):
            return Turn(False, self.round, [], False)
        self._started[client_id] = now
        self.changes += 1
        # Copies: whatever the caller does to them, the policy's stay as they are.
        return Turn(True, self.round, [w.copy() for w in self.weights], False)

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
                sample count, weights of another structure, non-finite or
                too large values); the policy is then left exactly as it was.
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
        _check_id(client_id)
        if client_id not in self._started:
            raise RoundError(f"{client_id!r} failed, but it has no open turn (training now: "
                             f"{list(self._started)}). Report a failure only between a turn "
                             f"that went and its report.")
        del self._started[client_id]
        self._drop([client_id], now)

    def expire(self, now: float) -> list:
        """Drop every client whose turn outlived `turn_timeout` by `now`, and
        the clients of a turn or round that nobody claimed in that time.

        A driver that calls this at `next_expiry()` (or later) ends every round:
        see the module doc.

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
        is due (so a driver that waits knows when to look again).

        With a `turn_timeout`, it is None only before the first round starts
        and once the rounds are finished."""
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
            RoundError: see `report`; the message names the field at fault.
        """
        _check_id(client_id)
        if not _is_integer(round_):
            raise RoundError(f"the report of {client_id!r} names round {round_!r}; `round` must "
                             f"be an integer (the round of the turn it trained in).")
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
        if not _is_integer(samples) or not 0 < samples <= self.max_samples:
            raise RoundError(
                f"the report of {client_id!r} gives a sample count of {_shown(samples)}; expected "
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
        except Exception as error:  # noqa: BLE001 - whatever a caller sent, refuse it
            raise RoundError(f"the report of {client_id!r} has weights that are not arrays: "
                             f"{type(error).__name__}: {error}") from error
        got = [(str(w.dtype), w.shape) for w in arrays]
        want = [(str(w.dtype), w.shape) for w in self.weights]
        if got != want:
            raise RoundError(
                f"the reported weights have shapes and dtypes {got}, the client half has "
                f"{want}. Report `client.get_weights()` of the model the turn's weights "
                f"were loaded into.")
        for index, array in enumerate(arrays):
            problem = self._value_problem(array)
            if problem:
                # Either would poison the average: NaN spreads, and one huge
                # weight outweighs every other client's.
                raise RoundError(f"the report of {client_id!r} has {problem} in "
                                 f"weights[{index}]. Its training diverged: lower the learning "
                                 f"rate, or clip gradients.")
        return arrays

    def _value_problem(self, array: np.ndarray) -> str:
        """What is wrong with the values of a weight array, or ''."""
        if array.dtype.kind != "f":
            return ""
        if not np.isfinite(array).all():
            return "non-finite values (NaN or inf)"
        if self.max_weight is not None and (np.abs(array) > self.max_weight).any():
            return (f"values of magnitude up to {float(np.abs(array).max()):.3g}, beyond "
                    f"max_weight={self.max_weight:g}")
        return ""

    # -- checkpoints -------------------------------------------------------------

    def state(self, now: float) -> tuple[dict, dict[str, np.ndarray]]:
        """The whole state, for a checkpoint: `(header, arrays)`.

        Rounds that ended and were not yet taken (`take_round_ends`) are not
        part of it; a driver takes them after every event.

        Args:
            now: the time, on the clock of the events.

        Returns:
            `header`, a dict that `json.dumps` can write:

            - "format": `STATE_FORMAT` (1).
            - "mode", "rounds", "clients", "turn_timeout", "max_samples",
              "max_weight": the configuration, to check a restore against.
            - "round": the current round (`rounds + 1` once finished).
            - "members": the client ids in turn order.
            - "turn": round-robin, the index in "members" of the client whose
              turn it is; SplitFed, 0.
            - "opened": seconds since the current turn (round-robin) or round
              (SplitFed) opened, at `now`; None before the first round starts.
            - "training": `[client_id, seconds since it started]` for each
              client training now.
            - "reports": `[client_id, samples]` for each report taken in the
              current round, in order.
            - "history": one `{"round", "trained", "dropped"}` per round so far,
              the current one last (who reported, who was dropped).

            `arrays`, copies: "weights/<i>" the client half's weights (the
            round's start in SplitFed, the latest hand-off in round-robin) and,
            SplitFed, "reports/<k>/<i>" the weights of the k-th entry of
            "reports".

        Raises:
            TypeError: a client id is neither a str nor an int.
        """
        bad = [c for c in self.members if not _is_id(c)]
        if bad:
            raise TypeError(f"Only str and int client ids can be saved, received {bad!r}.")

        def ids(values):
            return [c if isinstance(c, str) else int(c) for c in values]

        def since(then):
            return max(0.0, float(now - then))

        header = {
            "format": STATE_FORMAT, "mode": self.mode, "rounds": self.rounds,
            "clients": self.expected, "turn_timeout": self.turn_timeout,
            "max_samples": self.max_samples, "max_weight": self.max_weight,
            "round": self.round, "members": ids(self.members), "turn": self._turn,
            "opened": None if self._opened is None else since(self._opened),
            "training": [[c, since(t)] for c, t in zip(ids(self._started),
                                                       self._started.values(), strict=True)],
            "reports": [[c, n] for c, n in zip(ids(self._counts), self._counts.values(),
                                               strict=True)],
            "history": [{"round": r.round, "trained": ids(r.trained), "dropped": ids(r.dropped)}
                        for r in self.history],
        }
        arrays = {f"weights/{i}": w.copy() for i, w in enumerate(self.weights)}
        for k, client_id in enumerate(self._reports):
            for i, w in enumerate(self._reports[client_id]):
                arrays[f"reports/{k}/{i}"] = w.copy()
        return header, arrays

    def restore(self, header: dict, arrays: dict[str, np.ndarray], now: float,
                restart_timers: bool = False) -> None:
        """Replace the whole state with one written by `state`.

        Everything is checked before anything changes: the mode and the
        weights' structure must be this policy's; the round must fit `rounds`
        (a finished run can be extended by a policy with more rounds); every
        client id, index, count, time and array must be consistent. The
        configuration (`clients`, `turn_timeout`, `max_samples`, `max_weight`)
        is this policy's, not the header's: saved counts and weights must fit it.

        Args:
            header, arrays: as `state` returns them (the header possibly
                through JSON).
            now: the time, on the clock of the events to come.
            restart_timers: False (the default): every timer resumes with the
                time it had left at `state` (the time between `state` and this
                call does not count). True: every training client, and the
                open turn or round, gets a full `turn_timeout` from `now`.

        Raises:
            ValueError: what does not fit, named; the policy is unchanged.
        """
        fields = _read_state(self, header, arrays, now, restart_timers)
        vars(self).update(fields)
        self.changes += 1

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


def _shown(value) -> str:
    """`value` for a message: an integer of any type as a plain number."""
    return str(int(value)) if _is_integer(value) else repr(value)


def _check_id(client_id) -> None:
    try:
        hash(client_id)
    except TypeError:
        raise RoundError(f"a client id must be hashable (a str or an int), received "
                         f"{type(client_id).__name__} {client_id!r}.") from None


def _read_state(policy: RoundPolicy, header, arrays, now: float, restart_timers: bool) -> dict:
    """The attributes `RoundPolicy.restore` sets, from a header and arrays that
    are checked here, all of them, before any is used."""

    def refuse(what: str):
        raise ValueError(f"Cannot restore the rounds from this checkpoint: {what}.")

    def get(mapping, key, where="the header"):
        if key not in mapping:
            refuse(f"{where} has no {key!r}")
        return mapping[key]

    def integer(value, name, low, high):
        if not _is_integer(value) or not low <= value <= high:
            refuse(f"{name} is {value!r}, expected an integer in {low}..{high}")
        return int(value)

    def elapsed(value, name):
        if (not isinstance(value, numbers.Real) or isinstance(value, bool)
                or not 0 <= value < math.inf):
            refuse(f"{name} is {value!r}, expected a non-negative number of seconds")
        return now if restart_timers else now - float(value)

    def ids(value, name, allowed=None):
        if not isinstance(value, list) or not all(_is_id(c) for c in value):
            refuse(f"{name} must be a list of client ids (str or int), received {value!r}")
        if len(set(value)) != len(value):
            refuse(f"{name} names a client twice: {value!r}")
        if allowed is not None and not set(value) <= set(allowed):
            refuse(f"{name} names clients that are not members: "
                   f"{sorted(map(str, set(value) - set(allowed)))}")
        return list(value)

    def pairs(value, name):
        if not isinstance(value, list) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
            refuse(f"{name} must be a list of [client_id, value] pairs, received {value!r}")
        return [p[0] for p in value], [p[1] for p in value]

    if not isinstance(header, dict):
        refuse(f"the header is a {type(header).__name__}, not a dict")
    if get(header, "format") != STATE_FORMAT:
        refuse(f"its format is {header['format']!r}; this version reads format {STATE_FORMAT}")
    if get(header, "mode") != policy.mode:
        refuse(f"it holds {header['mode']!r} rounds, this coordinator runs {policy.mode!r}; "
               f"restore it into one with mode={header['mode']!r}")
    round_ = integer(get(header, "round"), "'round'", 1, policy.rounds + 1)
    members = ids(get(header, "members"), "'members'")
    history_ = get(header, "history")
    if not isinstance(history_, list) or len(history_) not in (round_ - 1, round_):
        refuse(f"'history' must list rounds 1..{round_ - 1} or 1..{round_} (the round is "
               f"{round_}), received {history_!r}")
    if len(history_) == round_ > policy.rounds:
        refuse(f"it is in round {round_}, and this coordinator runs {policy.rounds} rounds; "
               f"pass rounds >= {round_}")
    history = []
    for number, entry in enumerate(history_, start=1):
        where = f"'history' entry {number}"
        if not isinstance(entry, dict) or get(entry, "round", where) != number:
            refuse(f"{where} must be a dict with 'round': {number}, received {entry!r}")
        trained = ids(get(entry, "trained", where), f"{where}: 'trained'", members)
        dropped = ids(get(entry, "dropped", where), f"{where}: 'dropped'", members)
        if set(trained) & set(dropped):
            refuse(f"{where} has clients both trained and dropped: {trained} and {dropped}")
        history.append(RoundRecord(number, trained, dropped))
    # A run saved finished (no record for its round yet) and extended by this
    # policy's larger `rounds` starts the new round with an empty record.
    current = history[-1] if len(history) == round_ else RoundRecord(round_)
    fresh = len(history) < round_
    if fresh and round_ <= policy.rounds:
        history.append(current)

    reporters, counts = pairs(get(header, "reports"), "'reports'")
    if reporters != current.trained:
        refuse(f"'reports' names {reporters}, but round {round_} was trained by "
               f"{current.trained}")
    counts = [integer(n, f"the sample count of {c!r}", 1, policy.max_samples)
              for c, n in zip(reporters, counts, strict=True)]
    trainers, times = pairs(get(header, "training"), "'training'")
    ids(trainers, "'training'", members)
    busy = set(trainers) & (set(current.trained) | set(current.dropped))
    if busy:
        refuse(f"{sorted(map(str, busy))} are training and also reported or dropped in round "
               f"{round_}")
    started = {c: elapsed(t, f"the training time of {c!r}")
               for c, t in zip(trainers, times, strict=True)}
    if (fresh or round_ > policy.rounds) and (started or current.dropped):
        refuse(f"round {round_} has events, but no record")
    opened = get(header, "opened")
    opened = None if opened is None else elapsed(opened, "'opened'")
    if opened is None and (round_ > 1 or started or current.trained or current.dropped):
        refuse("'opened' is None, but the first round has started")
    if opened is None and len(members) >= policy.expected:
        opened = now  # this policy waits for fewer clients: the first round opens now

    turn = integer(get(header, "turn"), "'turn'", 0, max(len(members) - 1, 0))
    finished = round_ > policy.rounds
    if policy.mode == "round_robin" and not finished and members:
        # Turns go in member order: the members before `turn` have had theirs.
        done = set(current.trained) | set(current.dropped)
        if done != set(members[:turn]) or not set(started) <= {members[turn]}:
            refuse(f"turn {turn} of {members} does not fit round {round_}: trained "
                   f"{current.trained}, dropped {current.dropped}, training {list(started)}")
    if policy.mode == "splitfed":
        if turn != 0:
            refuse(f"'turn' is {turn}; SplitFed has no turn order (0)")
        waiting = [m for m in members if m not in started and m not in current.trained
                   and m not in current.dropped]
        if not finished and opened is not None and members and not started and not waiting:
            refuse(f"round {round_} has no client left to train or report, so it should "
                   f"have ended")

    if not isinstance(arrays, dict):
        refuse(f"the arrays are a {type(arrays).__name__}, not a dict")
    want = {f"weights/{i}" for i in range(len(policy.weights))}
    if policy.mode == "splitfed":
        want |= {f"reports/{k}/{i}" for k in range(len(reporters))
                 for i in range(len(policy.weights))}
    if set(arrays) != want:
        refuse(f"the arrays are {sorted(arrays)}, expected {sorted(want)}")

    def weights(prefix):
        values = []
        for i, like in enumerate(policy.weights):
            key = f"{prefix}/{i}"
            value = arrays[key]
            if not isinstance(value, np.ndarray) or value.dtype != like.dtype or (
                    value.shape != like.shape):
                refuse(f"array {key!r} is {getattr(value, 'dtype', type(value).__name__)} "
                       f"{getattr(value, 'shape', '')}, the client half has {like.dtype} "
                       f"{like.shape}")
            problem = policy._value_problem(value)
            if problem:
                refuse(f"array {key!r} has {problem}")
            values.append(np.array(value))
        return values

    return {
        "round": round_, "members": members, "history": history, "_turn": turn,
        "_started": started, "_counts": dict(zip(reporters, counts, strict=True)),
        "_reports": ({c: weights(f"reports/{k}") for k, c in enumerate(reporters)}
                     if policy.mode == "splitfed" else {}),
        "_opened": opened, "_ended": [], "weights": weights("weights"),
    }
