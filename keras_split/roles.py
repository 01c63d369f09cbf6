"""The two parties of split learning and what each computes.

The client owns the layers before the cut, its optimizer and (in the vanilla
setup) nothing else; the server owns the layers after the cut, the loss, the
metrics and its own optimizer. Each party's work is compiled with
`tf.function`. Per-step state travels as values: `ClientRole.forward` returns
a `ClientStep` that `ClientRole.backward` consumes, so any number of steps may
be in flight at once (many clients, pipelining).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import keras
import numpy as np
import tensorflow as tf

from keras_split import checkpoint
from keras_split.messages import Activations, Reply
from keras_split.partition import CutSpec


def copy_optimizer(optimizer) -> keras.optimizers.Optimizer:
    """A fresh optimizer with the same configuration (no shared state)."""
    optimizer = keras.optimizers.get(optimizer)
    return type(optimizer).from_config(optimizer.get_config())


def as_tuple(structure) -> tuple:
    return tuple(structure) if isinstance(structure, (list, tuple)) else (structure,)


@dataclass
class ClientStep:
    """The state of one client step between its forward and backward halves.

    It holds the gradient tape of the forward pass, so it can be used once.
    """

    tape: tf.GradientTape
    activations: tuple
    regularization: tf.Tensor
    used: bool = field(default=False)
    inputs: list | None = None  # watched inputs, when their gradient is wanted


class ClientRole:
    """Runs the client half: forward to the cut, then backward from the cut.

    Two ways to run a training step, with the same arithmetic:

    - `step(x, send)`: the whole client step compiled as one `tf.function`;
      at the cut it calls `send(activations)` (through `tf.py_function`),
      which delivers the values to the server and returns its `Reply`. This is
      what `fit` uses: one compiled call per step.
    - `forward(x)` then `backward(context, gradients)`: the two halves as
      separate calls, for setups that must do other work between them (several
      clients feeding one server, pipelining). Keeping a tape across two
      compiled calls costs more per step (TensorFlow runs the recorded
      function's backward eagerly).
    """

    def __init__(self, model: keras.Model, optimizer=None):
        self.model = model
        self.optimizer = copy_optimizer(optimizer) if optimizer is not None else None
        self._forward_train = tf.function(self._forward_fn, reduce_retracing=True)
        self._forward_infer = tf.function(
            lambda x: self._forward_fn(x, training=False), reduce_retracing=True
        )
        self._apply = tf.function(self._apply_fn, reduce_retracing=True)
        self._step = tf.function(self._step_fn, reduce_retracing=True)
        # Sends waiting for their compiled step to reach the cut, by step key.
        # Each entry lives for one call of step(); nothing carries over.
        self._sends: dict[int, Callable] = {}
        self._keys = itertools.count()

    def _forward_fn(self, x, training=True):
        activations = as_tuple(self.model(x, training=training))
        # Each party adds its own layers' regularization losses: the client's
        # are a term of the loss whose gradient only the client can compute.
        losses = self.model.losses
        regularization = tf.add_n(losses) if losses else tf.zeros(())
        return activations, regularization

    def _apply_fn(self, gradients):
        self.optimizer.apply(gradients, self.model.trainable_variables)

    def _variable_gradients(self, tape, activations, regularization, cut_gradients):
        targets = list(activations) + [regularization]
        seeds = list(cut_gradients) + [tf.ones(())]
        return tape.gradient(targets, self.model.trainable_variables, output_gradients=seeds)

    def _step_fn(self, key, x):
        with tf.GradientTape() as tape:
            activations, regularization = self._forward_fn(x)
        cut_gradients = tf.py_function(
            self._deliver, [key, *activations], Tout=[a.dtype for a in activations]
        )
        for gradient, activation in zip(cut_gradients, activations, strict=True):
            gradient.set_shape(activation.shape)
        self._apply_fn(
            self._variable_gradients(tape, activations, regularization, cut_gradients)
        )
        return regularization

    def _deliver(self, key, *activations):
        send = self._sends[int(key)]
        return send(tuple(a.numpy() for a in activations))

    def build(self) -> None:
        if self.optimizer is not None and not self.optimizer.built:
            self.optimizer.build(self.model.trainable_variables)

    def state(self) -> dict[str, np.ndarray]:
        """Values of every variable this party owns: weights, seeds, optimizer state."""
        self.build()
        return {**checkpoint.values_of("model", self.model.variables),
                **checkpoint.values_of("optimizer", self.optimizer.variables)}

    def restore(self, arrays: dict[str, np.ndarray], path) -> None:
        self.build()
        checkpoint.assign("model", self.model.variables, arrays, path)
        checkpoint.assign("optimizer", self.optimizer.variables, arrays, path)

    def step(self, x, send: Callable) -> tuple[Reply, float]:
        """One compiled training step; `send(activations) -> Reply` runs at the cut.

        Returns the server's reply and the client's regularization loss.
        """
        key = next(self._keys)
        outcome: dict = {}

        def deliver(activations):
            try:
                reply = send(activations)
                outcome["reply"] = reply
                return check_gradients(reply.gradients, activations)
            except BaseException as error:
                # Kept so the caller sees this error, not TensorFlow's wrapper of it.
                outcome["error"] = error
                raise

        self._sends[key] = deliver
        try:
            regularization = self._step(tf.constant(key, tf.int64), x)
        except tf.errors.OpError:
            if "error" in outcome:
                raise outcome["error"] from None
            raise
        finally:
            del self._sends[key]
        return outcome["reply"], float(regularization)

    def forward(self, x, input_gradients: bool = False) -> ClientStep:
        """Training forward pass: run the client half under a gradient tape.

        With `input_gradients=True`, `backward` also returns the gradient with
        respect to `x`: what a middle party of a chain sends back upstream.
        """
        inputs = None
        if input_gradients:
            inputs = [tf.convert_to_tensor(v) for v in as_tuple(x)]
            x = inputs if isinstance(x, (list, tuple)) else inputs[0]
        # The compiled forward is recorded on the tape as one call; TensorFlow
        # keeps what its backward needs, so backward() does not recompute it
        # (Dropout masks and BatchNorm updates happen exactly once).
        with tf.GradientTape() as tape:
            if inputs is not None:
                tape.watch(inputs)
            activations, regularization = self._forward_train(x)
        return ClientStep(tape=tape, activations=activations, regularization=regularization,
                          inputs=inputs)

    def infer(self, x) -> tuple[tuple, tf.Tensor]:
        """Inference forward pass (no tape, `training=False`).

        Returns the cut activations and the client's regularization loss.
        """
        return self._forward_infer(x)

    def backward(self, step: ClientStep, gradients) -> tuple | None:
        """Finish backpropagation from the cut gradients and update the weights.

        Returns the gradients with respect to the inputs when the forward pass
        was run with `input_gradients=True`, else None.
        """
        if step.used:
            raise RuntimeError(
                "This ClientStep was already used for a backward pass. Run forward() again "
                "for a new step."
            )
        gradients = check_gradients(gradients, [np.asarray(a) for a in step.activations])
        step.used = True
        seeds = [tf.convert_to_tensor(g) for g in gradients]
        if step.inputs is None:
            self._apply(
                self._variable_gradients(step.tape, step.activations, step.regularization, seeds)
            )
            return None
        variables = self.model.trainable_variables
        grads = step.tape.gradient(
            list(step.activations) + [step.regularization], list(variables) + step.inputs,
            output_gradients=seeds + [tf.ones(())])
        self._apply(grads[: len(variables)])
        return tuple(np.zeros(i.shape, i.dtype.as_numpy_dtype) if g is None else np.asarray(g)
                     for g, i in zip(grads[len(variables):], step.inputs, strict=True))


def check_gradients(gradients, activations) -> list[np.ndarray]:
    """Gradients from the server must match the activations sent, one for one.

    Non-finite values are let through on purpose: a diverging loss is a
    training outcome the server reports, and `TerminateOnNaN` stops on it.
    """
    if len(gradients) != len(activations):
        raise ValueError(
            f"Expected one gradient per cut tensor ({len(activations)}), received "
            f"{len(gradients)}."
        )
    checked = []
    for i, (gradient, activation) in enumerate(zip(gradients, activations, strict=True)):
        gradient = np.asarray(gradient)
        if gradient.shape != activation.shape:
            raise ValueError(
                f"The gradient for cut tensor {i} has shape {gradient.shape}, but the "
                f"activation sent had shape {activation.shape}."
            )
        checked.append(gradient.astype(activation.dtype, copy=False))
    return checked


class ServerRole:
    """Runs the server half: loss, metrics, its update and the cut gradients."""

    def __init__(self, model: keras.Model, optimizer, loss, metrics=None, loss_weights=None):
        self.model = model
        model.compile(
            optimizer=copy_optimizer(optimizer),
            loss=loss,
            metrics=metrics,
            loss_weights=loss_weights,
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self._train = tf.function(self._train_fn, reduce_retracing=True)
        self._evaluate = tf.function(self._evaluate_fn, reduce_retracing=True)
        self._predict = tf.function(
            lambda a: model(list(a) if len(a) > 1 else a[0], training=False),
            reduce_retracing=True,
        )
        self._built = False
        self._pending_metrics = None

    @property
    def optimizer(self):
        return self.model.optimizer

    def _inputs(self, activations):
        return list(activations) if len(activations) > 1 else activations[0]

    def _train_fn(self, activations, labels, sample_weight):
        activations = [tf.convert_to_tensor(a) for a in activations]
        with tf.GradientTape() as tape:
            tape.watch(activations)
            y_pred = self.model(self._inputs(activations), training=True)
            loss = self.model.compute_loss(
                x=None, y=labels, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
        variables = self.model.trainable_variables
        grads = tape.gradient(loss, activations + list(variables))
        cut_grads, var_grads = grads[: len(activations)], grads[len(activations) :]
        self.model.optimizer.apply(var_grads, variables)
        self.loss_tracker.update_state(loss, sample_weight=tf.shape(activations[0])[0])
        return cut_grads, self._logs(labels, y_pred, sample_weight)

    def _evaluate_fn(self, activations, labels, sample_weight):
        y_pred = self.model(self._inputs(list(activations)), training=False)
        loss = self.model.compute_loss(
            x=None, y=labels, y_pred=y_pred, sample_weight=sample_weight, training=False
        )
        self.loss_tracker.update_state(loss, sample_weight=tf.shape(activations[0])[0])
        return self._logs(labels, y_pred, sample_weight)

    def _logs(self, labels, y_pred, sample_weight):
        logs = self.model.compute_metrics(None, labels, y_pred, sample_weight=sample_weight)
        logs = {k: v for k, v in logs.items() if k != "loss"}
        return {"loss": self.loss_tracker.result(), **logs}

    def _build(self, message: Activations) -> None:
        # Keras creates metric and optimizer variables lazily; a tf.function
        # may only create variables on its first trace, so build them eagerly
        # once, with training=False so no state (BatchNorm, seeds) moves.
        y_pred = self.model(self._inputs(list(message.tensors)), training=False)
        if message.labels is not None:
            self.model.compute_loss(
                x=None, y=message.labels, y_pred=y_pred, sample_weight=message.sample_weight
            )
            self.model.compute_metrics(None, message.labels, y_pred, message.sample_weight)
        self.model.optimizer.build(self.model.trainable_variables)
        self.reset_metrics()
        self._built = True
        if self._pending_metrics is not None:
            checkpoint.assign("metrics", self._metric_variables(), *self._pending_metrics)
            self._pending_metrics = None

    def _metric_variables(self) -> list:
        return list(self.loss_tracker.variables) + [
            v for metric in self.model.metrics for v in metric.variables
        ]

    def state(self) -> dict[str, np.ndarray]:
        """Values of every variable this party owns: weights, seeds, optimizer and
        (once built) the running metrics of the current epoch."""
        self.model.optimizer.build(self.model.trainable_variables)
        arrays = {**checkpoint.values_of("model", self.model.variables),
                  **checkpoint.values_of("optimizer", self.model.optimizer.variables)}
        if self._built:
            arrays.update(checkpoint.values_of("metrics", self._metric_variables()))
        return arrays

    def restore(self, arrays: dict[str, np.ndarray], path) -> None:
        self.model.optimizer.build(self.model.trainable_variables)
        checkpoint.assign("model", self.model.variables, arrays, path)
        checkpoint.assign("optimizer", self.model.optimizer.variables, arrays, path)
        # Metric variables exist once the first labelled batch has built them.
        if any(k.startswith("metrics/") for k in arrays):
            self._pending_metrics = (arrays, path)

    def reset_metrics(self) -> None:
        self.loss_tracker.reset_state()
        self.model.reset_metrics()

    def handle(self, message: Activations) -> Reply:
        """Process one message from a client and return the reply."""
        if not self._built and message.mode != "predict":
            self._build(message)
        if message.reset_metrics:
            self.reset_metrics()
        if message.mode == "predict":
            outputs = self._predict(message.tensors)
            return Reply(step=message.step, outputs=keras.tree.map_structure(np.asarray, outputs))
        if message.labels is None:
            raise ValueError(
                f"A {message.mode!r} message needs labels: the server computes the loss. "
                "Pass `y` to fit()/evaluate()."
            )
        if message.mode == "train":
            grads, logs = self._train(message.tensors, message.labels, message.sample_weight)
            return Reply(
                step=message.step,
                gradients=tuple(np.asarray(g) for g in grads),
                logs={k: float(v) for k, v in logs.items()},
            )
        logs = self._evaluate(message.tensors, message.labels, message.sample_weight)
        return Reply(step=message.step, logs={k: float(v) for k, v in logs.items()})


# -- what a server asks of a role ------------------------------------------------
#
# A `SplitServer` (keras_split.network) serves any role that fits one of these
# protocols; it never asks for a role's class, so the network layer does not
# depend on the configurations that define the roles.


class Stateful(Protocol):
    """A role whose state a server checkpoints and restores."""

    def state(self) -> dict[str, np.ndarray]:
        """Every array the role needs to resume: weights, optimizer, metrics."""
        ...

    def restore(self, arrays: dict[str, np.ndarray], path) -> None:
        """Load what `state` returned (`path` names the checkpoint in errors)."""
        ...


@runtime_checkable
class MessageHandler(Stateful, Protocol):
    """Answers each message on its own: `ServerRole`, `RelayRole`, `JoinLabels`.

    The server calls `handle` under its model lock, one message at a time.
    """

    def handle(self, message: Activations) -> Reply: ...


@runtime_checkable
class PartyHandler(Stateful, Protocol):
    """Answers a message knowing which party (client id) sent it, and may wait
    for other parties' messages of the same step: `GatherRole` (vertical),
    `PerClientRole` (SFLv1).

    It locks for itself: the server calls `handle_from` outside its model lock,
    since holding it while one party waits would keep the others out.
    """

    def handle_from(self, party: str, message: Activations) -> Reply: ...


@runtime_checkable
class GatheringRole(PartyHandler, Protocol):
    """A `PartyHandler` whose parties each send their own share of the cut
    (vertically partitioned data), and whose steps wait for all of them."""

    parties: list[str]

    def specs_for(self, party: str, specs: Sequence[CutSpec]) -> Sequence[CutSpec]:
        """The cut tensors `party` sends, out of the server half's `specs`."""
        ...
