"""Server-side aggregation of concurrent clients' steps ("parallel split learning").

Several clients train against one shared server half at the same time. By
default the server runs their steps one after another, each on its own batch.
`ParallelRole` instead gathers the training steps that arrive while the
server is busy (and, optionally, within a short window) and runs **one**
server step on their concatenated activations, then returns each client its
own slice of the cut gradient:

    server step on   z = [z_1; z_2; ...; z_K]   (n = n_1 + ... + n_K rows)
    loss             L = the server's loss on the n rows (Keras's reduction:
                         the mean over the n samples for the default
                         "sum_over_batch_size", with sample weights multiplied in)
    server update    one optimizer step with dL/dW (one Adam iteration, not K)
    client k gets    dL/dz_k   (gradients="union", the default), or
                     dL/dz_k * n / n_k   (gradients="own")

"union" returns the exact gradient of the one loss the server minimised, so
when the clients hold copies of the same client half (SplitFed) the sum of
their updates is one step of the unsplit model on the whole group's batch.
Each client's gradient is then n_k / n of what it would get alone; "own"
rescales it to the gradient of a mean over its own batch (exactly that of its
batch alone, at the server's weights of the step, for a loss that is a mean
over samples), so a client's learning rate means what it meant before.

A group forms by itself under load: its first step waits `window` seconds
(0 by default), then for the server to finish the group before it, and every
step that arrived meanwhile joins (up to `max_group`). A lone client thus
waits for nobody, and many clients are served in groups as large as the load
makes them.

What it buys: one compiled server call per group instead of one per client,
and a larger batch for the server's matrix products (BENCHMARKS.md: about 1.4x
the server's samples per second at 256 concurrent clients). What it costs: a
client's step waits for its group (its worker thread waits with it: give the
server `max_workers` of at least `max_group` + 2), and K clients' steps make
one optimizer iteration (for Adam with bias correction, the first iterations
then weigh differently than K sequential steps).

Refusals stay per client. Each message is checked alone before it joins a
group (`check_message`, labels, classes: `ServerRole.prepare`), so a client
with out-of-range values is refused without touching the group. If the group's
combined step is refused (its loss or gradients are not finite), nothing has
changed and every member is retried alone, in arrival order: each is then
accepted or refused on its own batch, as without aggregation.

Evaluation and prediction messages are not grouped; they run alone between
groups. Metrics are the server's, shared by all clients as without
aggregation; a member's `reset_metrics` resets them before the group's step.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

import keras
import numpy as np

from keras_split.messages import Activations, Reply
from keras_split.roles import ServerRole, check_message

__all__ = ["ParallelRole"]

GRADIENTS = ("union", "own")


@dataclass
class _Group:
    deadline: float
    members: list[tuple[str, Activations]] = field(default_factory=list)
    closed: bool = False
    done: bool = False
    replies: list[Reply | BaseException | None] = field(default_factory=list)


class ParallelRole:
    """Run the training steps of concurrent clients as one server step.

    A `PartyHandler`: serve it with `SplitServer(split.server, role=
    ParallelRole(ServerRole(...)), max_workers=max_group + 2, ...)`, or call
    `handle_from(client_id, message)` from several threads in process.

    Args:
        role: the `ServerRole` that runs the server half.
        window: seconds the first step of a group waits for others before
            it waits for the server (default 0: only for the server). The group
            closes when the server takes it, or as soon as it holds
            `max_group` steps.
        max_group: the most clients' steps in one group (default 8).
        gradients: "union" (default) returns each client dL/dz_k of the
            group's loss; "own" scales it by n / n_k (see the module's docstring).

    Attributes:
        groups: how many combined steps ran; `grouped`: how many client steps
            they held; `retried`: how many groups were refused and retried alone.

    Example:

    ```python
    role = ParallelRole(ServerRole(split.server, "adam", loss), max_group=8)
    server = keras_split.SplitServer(split.server, role=role, max_workers=10,
                                     tokens=tokens, certificate=..., private_key=...)
    ```
    """

    def __init__(self, role: ServerRole, *, window: float = 0.0, max_group: int = 8,
                 gradients: str = "union"):
        if not isinstance(role, ServerRole):
            raise TypeError(f"`role` must be a keras_split.roles.ServerRole, received "
                            f"{type(role).__name__}.")
        if not (isinstance(window, (int, float)) and 0 <= window <= 60):
            raise ValueError(f"`window` must be a number of seconds in [0, 60], received "
                             f"{window!r}.")
        if not isinstance(max_group, int) or max_group < 1:
            raise ValueError(f"`max_group` must be a positive integer, received {max_group!r}.")
        if gradients not in GRADIENTS:
            raise ValueError(f"`gradients` must be one of {GRADIENTS}, received {gradients!r}.")
        self.role = role
        self.model = role.model
        self.window = float(window)
        self.max_group = max_group
        self.gradients = gradients
        self.groups = self.grouped = self.retried = 0
        self._condition = threading.Condition()
        self._open: _Group | None = None
        self._step_lock = threading.Lock()  # one server step (or state read) at a time
        self._prepare_lock = threading.Lock()  # the checks, and the first message's build

    # -- what a server asks of a role -------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        with self._step_lock:
            return self.role.state()

    def restore(self, arrays: dict[str, np.ndarray], path) -> None:
        with self._step_lock:
            self.role.restore(arrays, path)

    def handle_from(self, party: str, message: Activations) -> Reply:
        if message.mode != "train":
            with self._step_lock:
                return self.role.handle(message)
        # Checked alone first: a bad message is refused without joining a group.
        check_message(message, self.role.max_activation, self.role.max_sample_weight)
        with self._prepare_lock:  # not the step lock: steps join while a group runs
            self.role.prepare(message)
        group, index, leader = self._join(party, message)
        if leader:
            self._wait(group)
            self._run(group)
        else:
            with self._condition:
                self._condition.wait_for(lambda: group.done)
        result = group.replies[index]
        if isinstance(result, BaseException):
            raise result
        assert result is not None  # noqa: S101 - every member gets a reply or an error
        return replace(result, step=message.step)

    # -- grouping ---------------------------------------------------------------------

    def _join(self, party, message) -> tuple[_Group, int, bool]:
        with self._condition:
            group = self._open
            leader = group is None
            if group is None:
                group = self._open = _Group(deadline=time.monotonic() + self.window)
            group.members.append((party, message))
            index = len(group.members) - 1
            if len(group.members) >= self.max_group:
                self._close(group)
            return group, index, leader

    def _close(self, group: _Group) -> None:
        group.closed = True
        if self._open is group:
            self._open = None
        self._condition.notify_all()

    def _wait(self, group: _Group) -> None:
        with self._condition:
            while not group.closed:
                left = group.deadline - time.monotonic()
                if left <= 0:
                    break
                self._condition.wait(left)

    def _run(self, group: _Group) -> None:
        try:
            with self._step_lock:
                # The group closes when the server is free: the steps that
                # arrived while the previous group ran join this one.
                with self._condition:
                    self._close(group)
                    messages = [message for _, message in group.members]
                replies = self._combined(messages)
        except BaseException as error:  # noqa: BLE001 - delivered to the members
            replies = [error] * len(group.members)
        with self._condition:
            group.replies = replies
            group.done = True
            self._condition.notify_all()

    def _combined(self, messages: list[Activations]) -> list[Reply | BaseException]:
        if len(messages) == 1:
            return [self.role.handle(messages[0])]
        combined = _concatenate(messages)
        try:
            reply = self.role.handle(combined)
        except ValueError:
            # Nothing changed (a ServerRole step is a transaction): each alone.
            self.retried += 1
            alone: list[Reply | BaseException] = []
            for message in messages:
                try:
                    alone.append(self.role.handle(message))
                except ValueError as error:
                    alone.append(error)
            return alone
        self.groups += 1
        self.grouped += len(messages)
        sizes = [len(m.tensors[0]) for m in messages]
        total = sum(sizes)
        bounds = np.cumsum([0] + sizes)
        replies: list[Reply | BaseException] = []
        for k, size in enumerate(sizes):
            scale = total / size if self.gradients == "own" else 1.0
            gradients = tuple(
                (g[bounds[k]:bounds[k + 1]] * np.asarray(scale, g.dtype)) if scale != 1.0
                else g[bounds[k]:bounds[k + 1]].copy()
                for g in reply.gradients)
            replies.append(Reply(step=messages[k].step, gradients=gradients,
                                 logs=dict(reply.logs)))
        return replies


def _concatenate(messages: list[Activations]) -> Activations:
    tensors = tuple(np.concatenate(parts) for parts in zip(*(m.tensors for m in messages),
                                                           strict=True))
    labels = keras.tree.map_structure(lambda *parts: np.concatenate(parts),
                                      *(m.labels for m in messages))
    weights = None
    if any(m.sample_weight is not None for m in messages):
        weights = np.concatenate([
            np.ones(len(m.tensors[0]), np.float32) if m.sample_weight is None
            else np.asarray(m.sample_weight, np.float32) for m in messages])
    return Activations(step=messages[0].step, mode="train", tensors=tensors, labels=labels,
                       sample_weight=weights,
                       reset_metrics=any(m.reset_metrics for m in messages))
