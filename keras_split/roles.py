"""The two parties of split learning and what each computes.

The client owns the layers before the cut, its optimizer and (in the vanilla
setup) nothing else; the server owns the layers after the cut, the loss, the
metrics and its own optimizer. Each party's work is compiled with
`tf.function`. Per-step state travels as values: `ClientRole.forward` returns
a `ClientStep` that `ClientRole.backward` consumes, so any number of steps may
be in flight at once (many clients, pipelining).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from keras_split.messages import Activations, Reply


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


class ClientRole:
    """Runs the client half: forward to the cut, then backward from the cut."""

    def __init__(self, model: keras.Model, optimizer=None):
        self.model = model
        self.optimizer = copy_optimizer(optimizer) if optimizer is not None else None
        self._forward_train = tf.function(self._forward_fn, reduce_retracing=True)
        self._forward_infer = tf.function(
            lambda x: self._forward_fn(x, training=False), reduce_retracing=True
        )
        self._apply = tf.function(self._apply_fn, reduce_retracing=True)

    def _forward_fn(self, x, training=True):
        activations = as_tuple(self.model(x, training=training))
        # Each party adds its own layers' regularization losses: the client's
        # are a term of the loss whose gradient only the client can compute.
        losses = self.model.losses
        regularization = tf.add_n(losses) if losses else tf.zeros(())
        return activations, regularization

    def _apply_fn(self, gradients):
        self.optimizer.apply(gradients, self.model.trainable_variables)

    def build(self) -> None:
        if self.optimizer is not None and not self.optimizer.built:
            self.optimizer.build(self.model.trainable_variables)

    def forward(self, x) -> ClientStep:
        """Training forward pass: run the client half under a gradient tape."""
        # The compiled forward is recorded on the tape as one call; TensorFlow
        # keeps what its backward needs, so backward() does not recompute it
        # (Dropout masks and BatchNorm updates happen exactly once).
        with tf.GradientTape() as tape:
            activations, regularization = self._forward_train(x)
        return ClientStep(tape=tape, activations=activations, regularization=regularization)

    def infer(self, x) -> tuple[tuple, tf.Tensor]:
        """Inference forward pass (no tape, `training=False`).

        Returns the cut activations and the client's regularization loss.
        """
        return self._forward_infer(x)

    def backward(self, step: ClientStep, gradients) -> None:
        """Finish backpropagation from the cut gradients and update the weights."""
        if step.used:
            raise RuntimeError(
                "This ClientStep was already used for a backward pass. Run forward() again "
                "for a new step."
            )
        step.used = True
        if len(gradients) != len(step.activations):
            raise ValueError(
                f"Expected one gradient per cut tensor ({len(step.activations)}), "
                f"received {len(gradients)}."
            )
        variables = self.model.trainable_variables
        targets = list(step.activations) + [step.regularization]
        seeds = [tf.convert_to_tensor(g) for g in gradients] + [tf.ones(())]
        grads = step.tape.gradient(targets, variables, output_gradients=seeds)
        self._apply(grads)


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
