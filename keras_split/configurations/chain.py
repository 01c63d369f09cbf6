"""A model cut at several depths: multi-hop chains and U-shaped learning.

`split_chain(model, cuts=[cut1, cut2, ...])` returns the segments in order (each
cut a layer name or a list of names, as in `split`). Training runs the one
split step of `protocol` at every hop:

- the first segment is a `ClientRole` (it holds the data);
- each middle segment is a `RelayRole`: to the party upstream it is a server
  (activations in, gradients out), to the party downstream a client (it sends
  its own activations and finishes its backward pass from the gradient that
  comes back, returning the gradient at its own input);
- the last segment is a `ServerRole` (loss and metrics).

**U-shaped** (`labels="client"`): the client holds the first and the last
segments and the labels; the server holds the middle. The labels never leave
the client: the client's transport keeps them in a local `LabelStore` and sends
the activations without them; the client's own last segment takes them back
from the store when the middle's activations come round, and leaves its loss,
metrics and predictions there for the client. Only cut activations and cut
gradients cross the wire.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading

import keras
import numpy as np
import tensorflow as tf

from keras_split import trainer
from keras_split.messages import Activations, Reply
from keras_split.partition import build_halves
from keras_split.roles import MAX_ACTIVATION, ClientRole, ServerRole, check_message
from keras_split.transport import InProcessTransport, Transport

_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _values(tensors) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(t) for t in tensors)


def _inputs(tensors):
    return list(tensors) if len(tensors) > 1 else tensors[0]


class RelayRole:
    """A middle party of a chain: its segment between two cuts.

    Each step is a transaction, as a `ServerRole`'s: the message is checked
    before any op (`check_message`), and when the step fails downstream, the
    gradient that comes back (or the one computed from it) is not finite, or
    its forward pass made its moving statistics non-finite, it raises and
    leaves its weights, optimizer, non-trainable state (BatchNormalization
    statistics, seeds) and running loss as they were.

    Args:
        model: the segment (its inputs are the upstream cut, its outputs the
            downstream cut).
        optimizer: this party's optimizer.
        next: the `Transport` to the party downstream.
        max_activation: the largest magnitude an activation received may have
            (see `ServerRole`).
    """

    def __init__(self, model: keras.Model, optimizer, next: Transport, *,
                 max_activation: float = MAX_ACTIVATION):
        self.model = model
        self.client = ClientRole(model, optimizer)
        self.client.build()
        self.next = next
        self.max_activation = max_activation
        self._step = 0  # its own numbering downstream: it may serve several upstreams
        self._regularization = trainer.ClientLoss()

    @property
    def optimizer(self):
        return self.client.optimizer

    def _send(self, message: Activations, tensors) -> Reply:
        self._step += 1
        return self.next.exchange(dataclasses.replace(message, step=self._step,
                                                      tensors=_values(tensors)))

    def handle(self, message: Activations) -> Reply:
        check_message(message, self.max_activation)
        if message.mode == "train":
            # The forward pass moves BatchNormalization statistics and seeds
            # before the step is known to succeed: keep their values (no copy)
            # to put back if it fails.
            variables = self.model.non_trainable_variables
            kept = [tf.identity(v) for v in variables]
            try:
                context = self.client.forward(_inputs(message.tensors), input_gradients=True)
                if not all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in variables
                           if v.dtype in _FLOATS):
                    raise ValueError(
                        "Refused the step: its forward pass made non-trainable state (such as "
                        "BatchNormalization's moving variance) non-finite. Nothing was updated.")
                reply = self._send(message, context.activations)
                gradients = self.client.backward(context, reply.gradients, finite=True)
            except BaseException:
                for variable, value in zip(variables, kept, strict=True):
                    variable.assign(value)
                raise
            regularization = float(context.regularization)
            return Reply(step=message.step, gradients=gradients,
                         logs=self._with_regularization(reply.logs, regularization, message))
        activations, regularization = self.client.infer(_inputs(message.tensors))
        reply = self._send(message, activations)
        logs = self._with_regularization(reply.logs, float(regularization), message)
        return Reply(step=message.step, logs=logs, outputs=reply.outputs)

    def _with_regularization(self, logs, value, message):
        # Each party adds its own layers' regularization to the reported loss
        # (a running mean, like the server's), as keras.Model.fit reports it.
        # Called once the step succeeded: a failed message resets nothing.
        if message.reset_metrics:
            self._regularization = trainer.ClientLoss()
        if message.mode == "predict":
            return logs
        self._regularization.add(value, message.tensors)
        return self._regularization.into(dict(logs))

    def state(self):
        return self.client.state()

    def restore(self, arrays, path) -> None:
        self.client.restore(arrays, path)


class LabelStore:
    """The client's labels, kept on the client (U-shaped learning), by step.

    The client's head keeps each step's labels under the step's `trace` (an id
    it gives the message, which middle parties pass on unchanged while they
    renumber `step`); its last segment takes them back by the same id when the
    middle's activations come round. Keyed by step, not by arrival order, so
    several steps may be in flight and a failed step leaves the others intact.
    """

    def __init__(self):
        self._pending: dict[str, tuple] = {}
        self._results: dict[str, tuple] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def new_trace(self) -> str:
        """A fresh id for one step (unique within this store)."""
        return f"u{next(self._ids)}"

    def put(self, trace: str, labels, sample_weight) -> None:
        with self._lock:
            self._pending[trace] = (labels, sample_weight)

    def take(self, trace: str):
        with self._lock:
            if trace not in self._pending:
                raise RuntimeError(
                    f"A message (trace {trace!r}) reached the client's last segment with no "
                    "labels kept for it: the U-shaped chain lost the step's id on the way "
                    f"(labels are kept for {sorted(self._pending)}).")
            return self._pending.pop(trace)

    def keep_result(self, trace: str, logs, outputs) -> None:
        """The last segment's loss, metrics and predictions: they stay local too."""
        with self._lock:
            self._results[trace] = (logs, outputs)

    def result(self, trace: str):
        with self._lock:
            return self._results.pop(trace)

    def discard(self, trace: str) -> None:
        """Forget one step (it failed): nothing of it is left for another step."""
        with self._lock:
            self._pending.pop(trace, None)
            self._results.pop(trace, None)

    def __len__(self) -> int:
        return len(self._pending) + len(self._results)


class KeepLabels(Transport):
    """Sends a message without its labels, keeping them in a `LabelStore` by step."""

    def __init__(self, inner: Transport, store: LabelStore):
        super().__init__()
        self.inner, self.store = inner, store
        self.bytes = inner.bytes  # count what really crosses

    def _exchange(self, message: Activations) -> tuple[Reply, int, int]:
        trace = self.store.new_trace()
        self.store.put(trace, message.labels, message.sample_weight)
        try:
            reply = self.inner.exchange(dataclasses.replace(
                message, labels=None, sample_weight=None, trace=trace))
            logs, outputs = self.store.result(trace)
        finally:
            # A step that failed on the way (out or back) must leave no labels
            # or results behind; one that succeeded has taken both already.
            self.store.discard(trace)
        # The inner transport counted what crossed, into the counter we share.
        return dataclasses.replace(reply, logs=logs, outputs=outputs), 0, 0


class JoinLabels:
    """The client's last segment: takes the labels back from the client's store."""

    def __init__(self, role: ServerRole, store: LabelStore):
        self.role, self.store = role, store

    def handle(self, message: Activations) -> Reply:
        labels, sample_weight = self.store.take(message.trace)
        reply = self.role.handle(dataclasses.replace(message, labels=labels,
                                                     sample_weight=sample_weight))
        # Only the cut gradient goes back through the server; the loss, metrics
        # and predictions reach the client through its own store.
        self.store.keep_result(message.trace, reply.logs, reply.outputs)
        return Reply(step=reply.step, gradients=reply.gradients)

    def state(self):
        return self.role.state()

    def restore(self, arrays, path) -> None:
        self.role.restore(arrays, path)


class SplitChain(trainer.LoopOwner):
    """A model cut into segments; see the module doc and `split_chain`.

    Attributes:
        segments: the `keras.Model` of each segment, in order.
        cut_specs: the `CutSpec`s of each cut.
        parties: after `compile`, who holds each segment.
    """

    def __init__(self, segments, cut_specs, source=None):
        super().__init__()
        self.segments, self.cut_specs, self.source = list(segments), list(cut_specs), source
        self.roles: list = []
        self.parties: list[str] = []

    @property
    def client(self) -> keras.Model:
        return self.segments[0]

    @property
    def layers(self):
        return [layer for segment in self.segments for layer in segment.layers]

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, loss_weights=None,
                labels: str = "server", transports=None, nopeek=None):
        """Configure every party, in process.

        Args:
            optimizer: each party gets its own copy.
            loss, metrics, loss_weights: computed by the last segment's holder.
            labels: "server" (the last party holds the labels: vanilla and
                multi-hop) or "client" (U-shaped: the client holds the first and
                last segments and the labels never leave it).
            transports: optional wrappers, `transports[i](transport)` for hop i
                (to observe or record what crosses; tests use it).
            nopeek: a `keras_split.privacy.NoPeek(alpha)` for the first party
                (the data holder): it also minimises the distance correlation
                between its raw batch and the activations of the first cut.
                The other parties are unaware of it.
        """
        if loss is None:
            raise ValueError("`compile` needs a `loss`, computed by the last segment.")
        if labels not in ("server", "client"):
            raise ValueError(f"`labels` must be 'server' or 'client', received {labels!r}.")
        if labels == "client" and len(self.segments) < 3:
            raise ValueError("U-shaped learning (labels='client') needs at least two cuts: "
                             "the client's head, the server's body and the client's tail.")
        wrap = list(transports or [])
        wrap += [lambda t: t] * (len(self.segments) - 1 - len(wrap))
        store = LabelStore()
        last = ServerRole(self.segments[-1], optimizer, loss, metrics, loss_weights)
        downstream = JoinLabels(last, store) if labels == "client" else last
        self.roles = [last]
        for index in range(len(self.segments) - 2, 0, -1):
            relay = RelayRole(self.segments[index], optimizer,
                              wrap[index](InProcessTransport(downstream)))
            self.roles.insert(0, relay)
            downstream = relay
        self.client_role = ClientRole(self.segments[0], optimizer, objective=nopeek)
        self.client_role.build()
        self.roles.insert(0, self.client_role)
        first = wrap[0](InProcessTransport(downstream))
        self.transport = KeepLabels(first, store) if labels == "client" else first
        middle = ["server"] * (len(self.segments) - 2)
        if labels == "client":
            self.parties = ["client", *middle, "client"]
        else:
            self.parties = ["client", *[f"party {i + 1}" for i in range(len(middle))], "server"]

    def merge(self) -> keras.Model:
        """One model computing the whole chain with the current weights."""
        inputs = self.segments[0].inputs
        tensors = self.segments[0](inputs)
        for segment in self.segments[1:]:
            tensors = segment(tensors)
        return keras.Model(inputs, tensors)

    def __repr__(self):
        names = " | ".join("→".join(layer.name for layer in s.layers
                                    if not isinstance(layer, keras.layers.InputLayer))
                           for s in self.segments)
        return f"SplitChain({names})"


def split_chain(model: keras.Model, cuts) -> SplitChain:
    """Cut `model` at several depths, in order from input to output.

    Args:
        model: a functional or Sequential model.
        cuts: a list of cuts, each a layer name or a list of layer names (one cut
            made of several tensors); each later cut must lie after the earlier.

    Returns:
        A `SplitChain` with `len(cuts) + 1` segments.

    Example:

    ```python
    chain = keras_split.split_chain(model, cuts=["pool1", "dense"])
    chain.compile(optimizer="adam", loss=loss, labels="client")  # U-shaped
    chain.fit(x, y, epochs=3)
    ```
    """
    if not isinstance(cuts, (list, tuple)) or len(cuts) < 1:
        raise ValueError(f"`cuts` must be a list of at least one cut, received {cuts!r}.")
    segments, specs, rest = [], [], model
    for number, cut in enumerate(cuts):
        try:
            head, rest, cut_specs = build_halves(rest, cut)
        except ValueError as error:
            raise ValueError(f"Cut {number + 1} of {len(cuts)} ({cut!r}): {error}") from None
        segments.append(head)
        specs.append(cut_specs)
    segments.append(rest)
    return SplitChain(segments=segments, cut_specs=specs, source=model)
