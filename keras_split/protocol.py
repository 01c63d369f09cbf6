"""One step of split learning, written as its protocol.

1. The client runs its half on a batch, under its own gradient tape, and sends
   the cut tensors (values only) with the labels to the server.
2. The server runs its half and the loss under its own tape, updates its
   weights, and replies with the gradient of the loss at the cut.
3. The client finishes backpropagation from that gradient
   (`tape.gradient(..., output_gradients=...)`) and updates its weights.

The server never sees raw inputs, the client's weights or its graph; the client
never sees the server's weights. Only the cut tensors, the labels and the cut
gradients cross, through the transport, which counts their bytes.

Each function returns the server's reply and the client's own regularization
loss: the loss Keras reports includes every layer's regularization, and only
the client can compute its share.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import keras
import numpy as np

from keras_split.messages import Activations, Reply, payload_bytes
from keras_split.roles import ClientRole, ClientStep
from keras_split.transport import InProcessTransport, Pending, Transport


def _values(tensors) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(t) for t in tensors)


def train_step(client: ClientRole, transport: Transport, step: int, x, y, sample_weight=None,
               reset_metrics: bool = False) -> tuple[Reply, float]:
    """One training step across the cut; returns the server's reply."""
    if isinstance(client, ClientRole) and isinstance(transport, InProcessTransport) \
            and transport.fuses:
        return _fused_train_step(client, transport, step, x, y, sample_weight, reset_metrics)

    def send(activations):                                             # 2 (at the cut)
        return transport.exchange(Activations(step, "train", activations, labels=y,
                                              sample_weight=sample_weight,
                                              reset_metrics=reset_metrics))

    # 1 and 3: the client's forward and backward, compiled as one call that
    # runs `send` when the forward pass reaches the cut.
    return client.step(x, send)


def separate_train_step(client: ClientRole, transport: Transport, step: int, x, y,
                        sample_weight=None, reset_metrics: bool = False) -> tuple[Reply, float]:
    """The same step with the client's halves as two calls (see `ClientRole`)."""
    context = client.forward(x)                                        # 1
    message = Activations(step, "train", _values(context.activations), labels=y,
                          sample_weight=sample_weight, reset_metrics=reset_metrics)
    reply = transport.exchange(message)                                # 2
    client.backward(context, reply.gradients)                          # 3
    return reply, float(context.regularization)


def evaluate_step(client: ClientRole, transport: Transport, step: int, x, y, sample_weight=None,
                  reset_metrics: bool = False) -> tuple[Reply, float]:
    """Forward only: the server updates its metrics and replies with them."""
    activations, regularization = client.infer(x)
    message = Activations(step, "evaluate", _values(activations),
                          labels=y, sample_weight=sample_weight, reset_metrics=reset_metrics)
    return transport.exchange(message), float(regularization)


def predict_step(client: ClientRole, transport: Transport, step: int, x) -> Reply:
    """Forward only: the server replies with the model outputs."""
    activations, _ = client.infer(x)
    return transport.exchange(Activations(step, "predict", _values(activations)))


def _fused_train_step(client, transport, step, x, y, sample_weight, reset_metrics):
    """`train_step` with both halves in one compiled call (in process, no codec).

    The same bytes are counted as if the message and its reply had crossed:
    the cut values up with the labels and sample weights, their gradients down.
    """
    batch = len(keras.tree.flatten(x)[0])
    placeholder = (np.empty((batch, 0), np.float32),)
    message = Activations(step, "train", placeholder, labels=y, sample_weight=sample_weight,
                          reset_metrics=reset_metrics)
    reply, regularization = client.fused_step(x, transport.server, message)
    if reply.step == step:
        cut = batch * sum(int(np.prod(o.shape[1:])) * np.dtype(o.dtype).itemsize
                          for o in client.model.outputs)
        transport.bytes.up += cut + payload_bytes(y, sample_weight)
        transport.bytes.down += cut
    return reply, regularization


@dataclass
class PipelinedStep:
    """One step of a `Pipeline`, from its forward pass to its reply."""

    step: int                     # its step number (0 when nothing was sent)
    x: Any
    tag: Any                      # the caller's, given back with the result
    context: ClientStep | None = None
    pending: Pending | None = None
    kept: list = field(default_factory=list)  # the client's non-trainable state before it
    error: BaseException | None = None         # raised when the step is taken out
    reply: Reply | None = None
    regularization: float = float("nan")


class Pipeline:
    """Training steps with up to `depth` in flight (`fit(pipeline=depth)`).

    Semantics. Steps are numbered in the order their batches are drawn, and
    everything happens in that order on each side:

    - The server receives the messages in order and handles each as in
      sequential training: message k is computed with the server's weights
      after its updates for steps 1..k-1. The server is never stale.
    - The client runs the forward pass of batch k, sends it, and only then
      finishes the oldest step still in flight when `depth` steps are: the
      backward pass of batch k-depth+1 runs when that step's reply is read,
      with the forward context (gradient tape) it kept. So the forward pass
      of batch k uses the client's weights after its updates for steps
      1..k-depth (up to depth-1 updates stale), and the update of step k is
      the gradient at those forward-time weights, applied to the current
      weights (the optimizer sees the updates in step order).
    - At depth 1 that is sequential training; `fit` then runs its usual
      compiled step instead (`train_step`), bit for bit today's.

    Replies are read oldest first, so callbacks see `on_train_batch_end` in
    batch order; a batch's `on_train_batch_begin` comes when it is sent, up
    to depth-1 batches ahead of the ends.

    A refused step (the server's `ValueError`, or any error of the transport
    for that step) ends the pipeline: the steps before it complete normally
    (their updates are applied and reported), the refused step and every step
    sent after it change nothing (the server refused the first and never
    handles the rest: a synchronous transport raises at the refusal before
    the next is sent, a stream ends there), the client's non-trainable state
    (BatchNormalization statistics, seeds) goes back to what it was before
    the refused step's forward pass, the step counter back to the step before
    it, and the error is raised. A step whose activations are not finite (the
    client's half diverged) is not sent, as in `ClientRole.step`: it reports
    a NaN loss and updates nothing.
    """

    def __init__(self, client: ClientRole, transport: Transport, depth: int,
                 next_step: Callable[[], int], rewind: Callable[[int], None] | None = None):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"The pipeline depth must be an integer >= 1, received {depth!r}.")
        self.client, self.transport, self.depth = client, transport, depth
        self._next_step, self._rewind = next_step, rewind
        self._flight: deque[PipelinedStep] = deque()

    def __len__(self) -> int:
        return len(self._flight)

    @property
    def full(self) -> bool:
        """Whether the oldest step must be taken out before the next is sent:
        `depth` steps are in flight, or the newest one failed."""
        return len(self._flight) >= self.depth or (
            bool(self._flight) and self._flight[-1].error is not None)

    def send(self, x, y, sample_weight=None, reset_metrics: bool = False, tag=None) -> None:
        """Run the forward pass of a batch and send its cut values."""
        if self.full:
            raise RuntimeError("The pipeline is full: take out its oldest step first.")
        client = self.client
        entry = PipelinedStep(step=0, x=x, tag=tag)
        entry.kept = client._keep_state() if client._state else []
        self._flight.append(entry)
        try:
            entry.context = context = client.forward(x)
            entry.regularization = float(context.regularization)
            activations = _values(context.activations)
            if not all(np.isfinite(a).all() for a in activations if a.dtype.kind == "f"):
                client._put_back_state(entry.kept)  # the newest step: nothing came after
                entry.context = None
                entry.regularization = float("nan")
                entry.reply = Reply(step=-1, logs={"loss": float("nan")})
                return
            entry.step = self._next_step()
            entry.pending = self.transport.submit(Activations(
                entry.step, "train", activations, labels=y, sample_weight=sample_weight,
                reset_metrics=reset_metrics))
        except Exception as error:  # noqa: BLE001 - raised again when taken out, in order
            entry.error = error

    def take(self) -> PipelinedStep:
        """Read the oldest step's reply and apply its backward pass; raise its
        error (see the class docstring) if it failed."""
        entry = self._flight.popleft()
        if entry.reply is not None:  # a diverged step: nothing was sent
            return entry
        try:
            if entry.error is not None:
                raise entry.error
            assert entry.pending is not None and entry.context is not None  # noqa: S101
            reply = entry.pending.result()
        except BaseException:
            # Refused or lost: this step and the later ones change nothing.
            self._flight.clear()
            if entry.kept:
                self.client._put_back_state(entry.kept)
            if entry.step and self._rewind is not None:
                self._rewind(entry.step - 1)
            raise
        try:
            self.client.backward(entry.context, reply.gradients)
        except BaseException:
            self._flight.clear()  # the server applied it: nothing to undo there
            raise
        if entry.context.logs:
            reply = replace(reply, logs={
                **reply.logs, **{k: float(v) for k, v in entry.context.logs.items()}})
        entry.reply = reply
        return entry

    def abandon(self) -> None:
        """Forget the steps in flight without applying them (the fit stopped on
        an error of its own, an interrupt): the client keeps its weights; the
        server may have applied them, so its step numbering may be ahead."""
        self._flight.clear()
        self.transport.abandon()

    def drain(self):
        """Take out every step in flight, oldest first."""
        while self._flight:
            yield self.take()
