"""The two parties of split learning and what each computes.

The client owns the layers before the cut, its optimizer and (in the vanilla
setup) nothing else; the server owns the layers after the cut, the loss, the
metrics and its own optimizer. Each party's work is compiled with
`tf.function`. Per-step state travels as values: `ClientRole.forward` returns
a `ClientStep` that `ClientRole.backward` consumes, so any number of steps may
be in flight at once (many clients, pipelining).

A server step is a transaction: it applies completely or changes nothing. The
message is checked before any op (`check_message`); the step computes its loss
and gradients, and applies them only when they are finite. A refused step
leaves every variable as it was: weights, BatchNormalization statistics, seed
states, the optimizer (its iteration count included) and the metrics.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import keras
import numpy as np
import tensorflow as tf

from keras_split import checkpoint, compiled
from keras_split.compiled import Compiled
from keras_split.messages import Activations, Reply
from keras_split.partition import CutSpec

# The magnitude policy for what a peer sends (see `ServerRole`). Trained
# networks keep cut activations far below 1e9 (typically under 1e3; even the
# suite's deliberately diverging run, on inputs scaled by 1e6, sends about
# 2e6). A value of at most 1e9 times a sample weight of at most 1e6 is 1e15,
# whose square (1e30) still fits in float32 (3.4e38): BatchNormalization's
# variance, a Dense kernel's gradient and Adam's second moment stay finite.
# Beyond these, one finite message can turn every weight into NaN at the next
# step (activations of 3e38, or a sample weight of 1e38, do).
MAX_ACTIVATION = 1e9
MAX_SAMPLE_WEIGHT = 1e6


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
    # The scalar the backward pass differentiates with seed 1: the
    # regularization plus the role's extra objective (None: the regularization).
    own_loss: tf.Tensor | None = None
    logs: dict = field(default_factory=dict)  # the objective's own logs for this batch


class ClientRole:
    """Runs the client half: forward to the cut, then backward from the cut.

    Two ways to run a training step, with the same arithmetic:

    - `step(x, send)`: the whole client step compiled as one `tf.function`;
      at the cut it calls `send(activations)` (through `tf.numpy_function`),
      which delivers the values to the server and returns its `Reply`. This is
      what `fit` uses: one compiled call per step.
    - `forward(x)` then `backward(context, gradients)`: the two halves as
      separate calls, for setups that must do other work between them (several
      clients feeding one server, pipelining). Keeping a tape across two
      compiled calls costs more per step (TensorFlow runs the recorded
      function's backward eagerly).

    An optional `objective(inputs, activations) -> scalar` is a term of the
    client's own loss that only the client can compute (NoPeek's distance
    correlation between its raw batch and its cut, say). Its gradient joins the
    same backward pass as the server's cut gradient: the tape differentiates
    the activations with the cut gradients as seeds and the regularization
    plus the objective with seed 1. The server is unaware of it and nothing
    extra crosses the wire. It is not added to the reported loss. The
    objective may return `(scalar, logs)` instead, a dict of scalars named in
    its `log_names`; `step` adds them to the reply's logs (the training loops
    report their running means beside the server's).

    Args:
        model: the client half.
        optimizer: the client's optimizer (copied: the role owns its state).
        objective: None, or a callable as above, e.g.
            `keras_split.privacy.NoPeek(alpha=1.0)`.
    """

    def __init__(self, model: keras.Model, optimizer=None, objective=None):
        if objective is not None and not callable(objective):
            raise TypeError(
                "`objective` must be None or a callable `objective(inputs, activations)` "
                "returning a scalar (such as keras_split.privacy.NoPeek(alpha=1.0)); "
                f"received {type(objective).__name__}.")
        self.model = model
        self.objective = objective
        self.log_names: tuple[str, ...] = tuple(getattr(objective, "log_names", ()))
        self.optimizer = copy_optimizer(optimizer) if optimizer is not None else None
        # Compiled: tf.functions called through their concrete functions (keras_split.compiled).
        self._forward_train = Compiled(self._forward_fn, reduce_retracing=True)
        self._forward_infer = Compiled(
            lambda x: self._forward_fn(x, training=False), reduce_retracing=True
        )
        self._forward_objective = Compiled(self._forward_objective_fn, reduce_retracing=True)
        self._apply = Compiled(self._apply_fn, reduce_retracing=True)
        self._step = Compiled(self._step_fn, reduce_retracing=True)
        # Sends waiting for their compiled step to reach the cut, by step key.
        # Each entry lives for one call of step(); nothing carries over.
        self._sends: dict[int, Callable] = {}
        self._keys = itertools.count()
        self._fused: dict[int, Compiled] = {}  # fused steps, by in-process server
        # What a forward pass writes before anyone knows whether the step will
        # be applied (moving statistics, seed states): kept, and put back when
        # the step is refused or the client diverged.
        self._state = list(model.non_trainable_variables)
        self._keep_state = Compiled(lambda: [tf.identity(v) for v in self._state])

    def _put_back_state(self, kept) -> None:
        _assign_all(self._state, kept)

    def _forward_fn(self, x, training=True):
        activations = as_tuple(self.model(x, training=training))
        # Each party adds its own layers' regularization losses: the client's
        # are a term of the loss whose gradient only the client can compute.
        losses = self.model.losses
        regularization = tf.add_n(losses) if losses else tf.zeros(())
        return activations, regularization

    def _objective_fn(self, x, activations, regularization):
        """The regularization plus the objective (the scalar seeded with 1), and its logs."""
        result = self.objective(x, activations)
        value, logs = result if isinstance(result, tuple) else (result, {})
        value = tf.convert_to_tensor(value)
        if value.shape.rank != 0:
            raise ValueError(f"The client's `objective` must return a scalar; it returned a "
                             f"tensor of shape {tuple(value.shape)}.")
        return regularization + tf.cast(value, regularization.dtype), dict(logs)

    def _forward_objective_fn(self, x):
        activations, regularization = self._forward_fn(x)
        own_loss, logs = self._objective_fn(x, activations, regularization)
        return activations, regularization, own_loss, logs

    def _apply_fn(self, gradients):
        self.optimizer.apply(gradients, self.model.trainable_variables)

    def _variable_gradients(self, tape, activations, own_loss, cut_gradients):
        targets = list(activations) + [own_loss]
        seeds = list(cut_gradients) + [tf.ones(())]
        return tape.gradient(targets, self.model.trainable_variables, output_gradients=seeds)

    def _step_fn(self, key, x):
        logs: dict = {}
        with tf.GradientTape() as tape:
            activations, regularization = self._forward_fn(x)
            own_loss = regularization
            if self.objective is not None:
                own_loss, logs = self._objective_fn(x, activations, regularization)
        delivered = tf.numpy_function(
            self._deliver, [key, *activations],
            Tout=[tf.bool] + [a.dtype for a in activations], stateful=True)
        answered, cut_gradients = delivered[0], delivered[1:]
        answered.set_shape(())
        for gradient, activation in zip(cut_gradients, activations, strict=True):
            gradient.set_shape(activation.shape)
        gradients = self._variable_gradients(tape, activations, own_loss, cut_gradients)

        def apply():
            self._apply_fn(gradients)
            return tf.constant(True)

        # A refused or failed exchange returns normally, unanswered: the update
        # is skipped here and `step` raises the error once the call is over.
        # (Raising inside the numpy_function would make TensorFlow log the Python
        # traceback at WARNING before the caller saw the clean error.)
        tf.cond(answered, apply, lambda: tf.constant(False))
        return regularization, logs

    def _deliver(self, key, *activations):
        send = self._sends[int(key)]
        for activation in activations:
            # Views of the step's own tensors, which its backward pass reads
            # (max pooling's gradient reads its output): nothing may write them.
            activation.setflags(write=False)
        with compiled.waiting_at_the_cut():
            gradients = send(activations)
        if gradients is None:  # unanswered: `send` kept the error for `step`
            return [np.bool_(False)] + [np.zeros(a.shape, a.dtype) for a in activations]
        return [np.bool_(True), *gradients]

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

        Returns the server's reply and the client's regularization loss. The
        reply's logs also hold the objective's logs for this batch, if any.

        When the client's own activations are not finite (its half diverged),
        nothing is sent (a server refuses them) and nothing is updated; the
        step reports a NaN loss, as `keras.Model.fit` would, so that
        `keras.callbacks.TerminateOnNaN` stops the run. The reply's step is
        then -1: no server answered it.
        """
        key = next(self._keys)
        outcome: dict = {}

        def deliver(activations):
            try:
                if not all(_finite(a) for a in activations):
                    outcome["diverged"] = True
                    return None  # nothing is sent: a server refuses them
                reply = send(activations)
                outcome["reply"] = reply
                return check_gradients(reply.gradients, activations)
            except BaseException as error:
                # Kept so the caller sees this error, once the compiled call has
                # returned without applying anything.
                outcome["error"] = error
                return None

        self._sends[key] = deliver
        kept = self._keep_state() if self._state else []
        try:
            regularization, logs = self._step(tf.constant(key, tf.int64), x)
        except tf.errors.OpError:
            self._put_back_state(kept)
            if "error" in outcome:
                raise outcome["error"] from None
            raise
        except BaseException:
            self._put_back_state(kept)
            raise
        finally:
            del self._sends[key]
        if outcome.get("diverged") or "error" in outcome:
            # Unanswered: no update was applied; what the forward pass wrote
            # (BatchNormalization's statistics) is put back.
            self._put_back_state(kept)
            if "error" in outcome:
                raise outcome["error"]
            return Reply(step=-1, logs={"loss": float("nan")}), float("nan")
        reply = outcome["reply"]
        if logs:
            reply = replace(
                reply, logs={**reply.logs, **{k: float(v) for k, v in logs.items()}})
        return reply, float(regularization)

    def _fused_fn(self, server: ServerRole, x, labels, sample_weight):
        # Read before the forward passes write: what a refused step puts back.
        kept = [tf.identity(v) for v in self._state]
        server_kept = [tf.identity(v) for v in server._moved]
        with tf.GradientTape() as tape:
            activations, regularization = self._forward_fn(x)
            own_loss, logs = regularization, {}
            if self.objective is not None:
                own_loss, logs = self._objective_fn(x, activations, regularization)
        finite = _all_finite(activations)
        magnitude = tf.reduce_max(tf.stack([
            tf.cast(tf.reduce_max(tf.abs(a)), tf.float64) for a in activations]))
        sendable = finite & (magnitude <= server.max_activation)
        # What crosses: the values only (the server's tape starts from them).
        sent = [tf.stop_gradient(a) for a in activations]
        # The server's forward and backward run whatever the values; its update
        # runs only if they were sendable (and its own checks pass). What its
        # forward wrote on unsendable values is put back by `fused_step`, and
        # nothing it computed from them is used: the step is refused first.
        # The client's update runs under the server's condition: both apply, or neither.

        def client_update(cut):
            gradients = self._variable_gradients(tape, activations, own_loss, cut)
            return lambda: self._apply_fn(gradients)

        loss_ok, grads_ok, state_ok, loss, cut, server_logs = server._train_fn(
            sent, labels, sample_weight, admissible=sendable, client=client_update)
        cut = list(cut)
        return finite, magnitude, loss_ok, grads_ok, state_ok, loss, cut, server_logs, \
            regularization, logs, kept, server_kept

    def fused_step(self, x, server: ServerRole, message: Activations) -> tuple[Reply, float]:
        """`step` with the server's step in the same compiled call (both in process).

        The server half sees the cut values only (its tape starts from them),
        and every check and refusal of `ServerRole.handle` holds: a message
        the server would refuse raises the same `ValueError` and changes
        nothing on either side. `message` carries the step, labels, sample
        weights and `reset_metrics`; its `tensors` are the batch size's
        placeholder (`message.tensors[0]` has the batch's length).
        """
        if not server._built:  # its first message builds it from real cut values
            activations, _ = self.infer(x)
            server.prepare(replace(message, tensors=tuple(np.asarray(a) for a in activations)))
        server.prepare(message)
        function = self._fused.get(id(server))
        if function is None:
            function = Compiled(lambda x, y, w: self._fused_fn(server, x, y, w),
                                reduce_retracing=True)
            self._fused[id(server)] = function
        # The server's state before the step: read inside the call, or before a
        # metrics reset when the message asks for one.
        kept = server._snapshot(everything=True) if message.reset_metrics else None
        mine: list = []
        try:
            if message.reset_metrics:
                server.reset_metrics()
            (finite, magnitude, loss_ok, grads_ok, state_ok, loss, cut, server_logs,
             regularization, logs, mine, inside) = function(x, message.labels,
                                                            message.sample_weight)
            kept = (server._moved, inside) if kept is None else kept
            if not bool(finite):
                server._put_back(kept)
                self._put_back_state(mine)
                return Reply(step=-1, logs={"loss": float("nan")}), float("nan")
            if float(magnitude) > server.max_activation:
                raise _too_large("activations", float(magnitude), server.max_activation)
            server._refuse_unless_accepted(loss_ok, grads_ok, state_ok, loss)
        except BaseException:
            if kept is not None:
                server._put_back(kept)
            if mine:
                self._put_back_state(mine)
            raise
        reply_logs = {k: float(v) for k, v in server_logs.items()}
        reply_logs.update({k: float(v) for k, v in logs.items()})
        return (Reply(step=message.step, gradients=tuple(np.asarray(g) for g in cut),
                      logs=reply_logs), float(regularization))

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
        logs: dict = {}
        with tf.GradientTape() as tape:
            if inputs is not None:
                tape.watch(inputs)
            if self.objective is None:
                activations, regularization = self._forward_train(x)
                own_loss = regularization
            else:
                activations, regularization, own_loss, logs = self._forward_objective(x)
        return ClientStep(tape=tape, activations=activations, regularization=regularization,
                          inputs=inputs, own_loss=own_loss, logs=logs)

    def infer(self, x) -> tuple[tuple, tf.Tensor]:
        """Inference forward pass (no tape, `training=False`).

        Returns the cut activations and the client's regularization loss.
        """
        return self._forward_infer(x)

    def backward(self, step: ClientStep, gradients, finite: bool = False) -> tuple | None:
        """Finish backpropagation from the cut gradients and update the weights.

        Returns the gradients with respect to the inputs when the forward pass
        was run with `input_gradients=True`, else None.

        With `finite=True` the update is a transaction (what a middle party of
        a chain does): when the cut gradients received, or the gradients
        computed from them, are not finite, it raises `ValueError` before the
        optimizer runs, and the weights and the optimizer are unchanged.
        """
        if step.used:
            raise RuntimeError(
                "This ClientStep was already used for a backward pass. Run forward() again "
                "for a new step."
            )
        gradients = check_gradients(gradients, [np.asarray(a) for a in step.activations])
        if finite:
            for i, gradient in enumerate(gradients):
                if not _finite(gradient):
                    raise ValueError(
                        f"Refused the step: the gradient received for cut tensor {i} contains "
                        "NaN or Inf; expected finite values. Nothing was updated.")
        step.used = True
        seeds = [tf.convert_to_tensor(g) for g in gradients]
        own_loss = step.regularization if step.own_loss is None else step.own_loss
        if step.inputs is None:
            grads = self._variable_gradients(step.tape, step.activations, own_loss, seeds)
            if finite:
                _refuse_unless_representable(grads, "its weight gradients")
            self._apply(grads)
            return None
        variables = self.model.trainable_variables
        grads = step.tape.gradient(
            list(step.activations) + [own_loss], list(variables) + step.inputs,
            output_gradients=seeds + [tf.ones(())])
        if finite:
            _refuse_unless_representable(grads, "its weight and input gradients")
        self._apply(grads[: len(variables)])
        return tuple(np.zeros(i.shape, i.dtype.as_numpy_dtype) if g is None else np.asarray(g)
                     for g, i in zip(grads[len(variables):], step.inputs, strict=True))


def check_gradients(gradients, activations) -> list[np.ndarray]:
    """Gradients from the server must match the activations sent, one for one.

    Non-finite values are let through here (a `ServerRole` never sends them:
    it refuses such a step); `ClientRole.backward(..., finite=True)` refuses them.
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


# -- checks on a received message ---------------------------------------------


def _assign_all(variables, values) -> None:
    """Put kept values back into their variables (a refused step's undo)."""
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


def _unique(variables) -> list:
    """The variables once each, in order (a layer may list one twice)."""
    return list({id(v): v for v in variables}.values())


def _is_float(dtype) -> bool:
    # ml_dtypes' bfloat16 and float8 types have numpy kind "V".
    return dtype.kind == "f" or dtype.name == "bfloat16" or dtype.name.startswith("float8")


def _numbers(value, where: str, kinds: str = "biuf") -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in kinds and not _is_float(array.dtype):
        raise ValueError(f"`{where}` must hold numbers; received dtype {array.dtype.name}.")
    return array


def _finite(value) -> bool:
    array = np.asarray(value)
    return not _is_float(array.dtype) or bool(np.isfinite(array).all())


def _extremes(array: np.ndarray) -> tuple[float, float]:
    """The smallest and largest value (NaN if any value is NaN), in one pass each."""
    if array.size == 0:
        return 0.0, 0.0
    return float(np.min(array)), float(np.max(array))


def _leaves(structure, name: str):
    """(field name, array) for each array of a nested structure of labels or weights."""
    if structure is None:
        return
    if isinstance(structure, dict):
        for key, value in structure.items():
            yield from _leaves(value, f"{name}[{key!r}]")
    elif isinstance(structure, (list, tuple)):
        for index, value in enumerate(structure):
            yield from _leaves(value, f"{name}[{index}]")
    else:
        yield name, structure


def check_message(message: Activations, max_activation: float = MAX_ACTIVATION,
                  max_sample_weight: float = MAX_SAMPLE_WEIGHT) -> int:
    """Refuse a message no step may run on, before any op sees it.

    A server role calls this first; over the network the server's decoding
    makes some of the same checks on the wire, and this is the role's own.

    Args:
        message: the received `Activations`.
        max_activation: the largest magnitude a cut value may have.
        max_sample_weight: the largest sample weight accepted.

    Returns:
        The batch size.

    Raises:
        ValueError: naming the field, what it holds and what was expected, for
            no cut tensors, an empty batch, tensors, labels or sample weights
            of different lengths, non-numeric values, NaN or Inf, activations
            beyond `max_activation`, or sample weights that are negative or
            above `max_sample_weight`.
    """
    if not message.tensors:
        raise ValueError("A message needs at least one cut tensor in `tensors`; received none.")
    batch = -1
    for i, tensor in enumerate(message.tensors):
        where = f"activations[{i}]"
        array = _numbers(tensor, where)
        if array.ndim == 0:
            raise ValueError(f"`{where}` must have a batch axis first; received a scalar.")
        if i == 0:
            batch = array.shape[0]
        elif array.shape[0] != batch:
            raise ValueError(f"`{where}` has {array.shape[0]} samples, but `activations[0]` has "
                             f"{batch}: every cut tensor must hold the same batch.")
        if batch == 0:
            # An empty batch computes nothing useful and makes batch statistics
            # (BatchNormalization's mean and variance) NaN for every later step.
            raise ValueError(f"`{where}` is an empty batch (shape {array.shape}); expected at "
                             "least one sample.")
        low, high = _extremes(array)
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError(f"`{where}` contains NaN or Inf; expected finite values (a client "
                             "sends these when its half diverged: lower its learning rate).")
        if max(-low, high) > max_activation:
            raise _too_large(where, max(-low, high), max_activation)
    check_labels(message.labels, message.sample_weight, batch, max_sample_weight)
    return batch


def _too_large(where: str, magnitude: float, max_activation: float) -> ValueError:
    return ValueError(
        f"`{where}` holds a value of magnitude {magnitude:.3g}, above the "
        f"server's limit of {max_activation:g} (`max_activation`). Normalise the "
        "inputs, or raise `max_activation` if the model really produces such values.")


def check_labels(labels, sample_weight, batch: int,
                 max_sample_weight: float = MAX_SAMPLE_WEIGHT) -> None:
    """The label and sample-weight part of `check_message`, for a batch of `batch`."""
    for where, leaf in _leaves(labels, "labels"):
        array = _numbers(leaf, where)
        if array.ndim == 0 or array.shape[0] != batch:
            raise ValueError(f"`{where}` has shape {array.shape}; expected {batch} samples "
                             "first, one label per sample of the activations.")
        if not _finite(array):
            raise ValueError(f"`{where}` contains NaN or Inf; expected finite values.")
    for where, leaf in _leaves(sample_weight, "sample_weight"):
        array = _numbers(leaf, where, kinds="iuf")
        if array.ndim == 0 or array.shape[0] != batch:
            raise ValueError(f"`{where}` has shape {array.shape}; expected {batch} samples "
                             "first, one weight per sample of the activations.")
        low, high = _extremes(array)
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > max_sample_weight:
            # A negative weight turns the step into gradient ascent on the
            # shared model; a huge one overflows the optimizer's state.
            raise ValueError(
                f"`{where}` must hold finite numbers in [0, {max_sample_weight:g}] "
                f"(`max_sample_weight`); received values from {low:g} to {high:g}.")


def _sparse_categorical(loss) -> tuple[bool, object]:
    """Whether `loss` takes class indices as labels, and its `ignore_class`."""
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError:
            return False, None
    if getattr(loss, "fn", loss) is not keras.losses.sparse_categorical_crossentropy:
        return False, None
    config = loss.get_config() if isinstance(loss, keras.losses.Loss) else {}
    if config.get("axis", -1) != -1:
        return False, None  # classes on another axis: the loss itself checks them
    return True, config.get("ignore_class")


def _class_rules(model: keras.Model, loss) -> dict[str, tuple]:
    """By output name: (output shape, sparse categorical loss?, ignore_class)."""
    try:
        names, outputs = list(model.output_names), list(model.outputs)
    except (AttributeError, ValueError):
        return {}  # a model without a known output structure: the loss checks labels
    if isinstance(loss, dict):
        losses = [loss.get(name) for name in names]
    elif isinstance(loss, (list, tuple)) and len(loss) == len(names):
        losses = list(loss)
    else:
        losses = [loss] * len(names)
    return {name: (tuple(output.shape), *_sparse_categorical(item))
            for name, output, item in zip(names, outputs, losses, strict=True)}


def _labels_by_output(labels, names: list[str]):
    """(field, labels, output name) for the labels Keras gives each output."""
    if isinstance(labels, dict):
        return [(f"labels[{k!r}]", v, k) for k, v in labels.items() if k in names]
    if isinstance(labels, (list, tuple)):
        if len(labels) != len(names):
            return []
        return [(f"labels[{i}]", v, n) for i, (v, n) in enumerate(zip(labels, names,
                                                                        strict=True))]
    return [("labels", labels, names[0])] if len(names) == 1 else []


def _indexes_classes(label_shape: tuple, output_shape: tuple) -> bool:
    """Labels of this shape hold one class index per prediction vector of the output."""
    inner = output_shape[1:-1]
    for expected in (inner, inner + (1,)):
        if len(label_shape) - 1 == len(expected) and all(
                want is None or got == want
                for got, want in zip(label_shape[1:], expected, strict=True)):
            return True
    return False


def _representable(tensors) -> tf.Tensor:
    """True when every floating tensor is finite and the sum of its squares fits
    its float type: optimizers (Adam, RMSprop, clipping by norm) square
    gradients, and one overflowing square corrupts their state for good."""
    ok = tf.constant(True)
    for tensor in tensors:
        if tensor is None:
            continue
        if isinstance(tensor, tf.IndexedSlices):
            tensor = tensor.values
        if not tensor.dtype.is_floating:
            continue
        if tensor.dtype in (tf.float16, tf.bfloat16):
            tensor = tf.cast(tensor, tf.float32)
        ok = tf.logical_and(ok, tf.math.is_finite(tf.reduce_sum(tf.square(tensor))))
    return ok


def _all_finite(values) -> tf.Tensor:
    """True when every floating value (a tensor or a variable) is finite."""
    ok = tf.constant(True)
    for value in values:
        if value.dtype in ("float16", "bfloat16", "float32", "float64"):
            ok = tf.logical_and(ok, tf.reduce_all(tf.math.is_finite(value)))
    return ok


def _refuse_unless_representable(gradients, what: str) -> None:
    if not bool(_representable(gradients)):
        raise ValueError(
            f"Refused the step: {what} are not finite, or so large that their squares "
            "overflow (as optimizers such as Adam compute them). Nothing was updated.")


_NOTHING_CHANGED = ("Nothing was updated: the weights, BatchNormalization statistics, seed "
                    "states, optimizer and metrics are as before.")


class ServerRole:
    """Runs the server half: loss, metrics, its update and the cut gradients.

    Every step is a transaction: it applies completely or changes nothing, so
    that no hostile or broken peer can corrupt the server's model.

    1. Before any op, `handle` refuses a message that `check_message` refuses
       (an empty batch, lengths that disagree, non-numeric or non-finite
       values, activations beyond `max_activation`, negative or too large
       sample weights), and labels outside the classes of an output: for a
       sparse categorical loss, or integer labels with one index per
       prediction vector, each label must lie in `[0, units)` (its
       `ignore_class` excepted).
    2. The step computes the loss and the gradients, and applies them only if
       the loss is finite, the gradients (at the cut included) are finite
       with squares that fit their float type, and the state its forward pass
       wrote (moving statistics) is finite.
    3. A refused step raises `ValueError` and leaves every variable as it was:
       weights, BatchNormalization statistics, seed states, the optimizer (its
       iteration count included) and the metrics. `reset_metrics` takes
       effect with an accepted message only.

    The forward pass moves non-trainable state (moving statistics, seeds)
    before the loss is known, so each step keeps the values of the
    non-trainable variables (references, not copies: TensorFlow copies a
    variable's buffer only when it is written while still shared), and of the
    metrics when the message resets them, and puts them back if the step is
    refused. Trainable weights, the optimizer and the metrics are written only
    once the step is accepted.

    Args:
        model: the server half (its inputs are the cut).
        optimizer, loss, metrics, loss_weights: as in `keras.Model.compile`.
        max_activation: the largest magnitude a cut activation may have; a
            message with a larger value is refused. The default, 1e9, is far
            above what trained networks produce (typically under 1e3) and low
            enough that squares of activations times sample weights stay
            finite in float32 (see `MAX_ACTIVATION`).
        max_sample_weight: the largest sample weight accepted (default 1e6).

    Example:

    ```python
    role = ServerRole(split.server, "adam", loss, metrics=["accuracy"],
                      max_activation=1e4)
    reply = role.handle(message)  # raises ValueError, changing nothing, if refused
    ```
    """

    def __init__(self, model: keras.Model, optimizer, loss, metrics=None, loss_weights=None,
                 *, max_activation: float = MAX_ACTIVATION,
                 max_sample_weight: float = MAX_SAMPLE_WEIGHT):
        if not max_activation > 0 or not max_sample_weight > 0:
            raise ValueError(f"`max_activation` and `max_sample_weight` must be positive; "
                             f"received {max_activation!r} and {max_sample_weight!r}.")
        self.model = model
        self.max_activation = max_activation
        self.max_sample_weight = max_sample_weight
        model.compile(
            optimizer=copy_optimizer(optimizer),
            loss=loss,
            metrics=metrics,
            loss_weights=loss_weights,
        )
        self._classes = _class_rules(model, loss)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self._train = Compiled(self._train_fn, reduce_retracing=True)
        self._evaluate = Compiled(self._evaluate_fn, reduce_retracing=True)
        self._predict = Compiled(
            lambda a: model(list(a) if len(a) > 1 else a[0], training=False),
            reduce_retracing=True,
        )
        self._keep = Compiled(lambda: [tf.identity(v) for v in self._kept])
        self._keep_moved = Compiled(lambda: [tf.identity(v) for v in self._moved])
        # The variables a refused step puts back (set by _build): all the
        # non-trainable and metric ones, and those a forward pass may move.
        self._kept: list = []
        self._moved: list = []
        self._built = False
        self._pending_metrics = None

    @property
    def optimizer(self):
        return self.model.optimizer

    def _inputs(self, activations):
        return list(activations) if len(activations) > 1 else activations[0]

    def _train_fn(self, activations, labels, sample_weight, admissible=None, client=None):
        # For the fused step (the client's step and this one in one graph):
        # `admissible`, a boolean tensor that must also hold for the update to
        # run (the client's checks of the cut values), and `client`, a callable
        # that takes the cut gradients and returns the client's update, run
        # under the same condition as this one. One condition for the whole
        # step instead of three: each costs a few percent of a small model's step.
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
        loss_ok, grads_ok = tf.math.is_finite(loss), _representable(grads)
        # What the forward pass wrote (BatchNormalization's moving variance
        # overflows on huge activations while the normalised loss stays finite).
        state_ok = _all_finite(self.model.non_trainable_variables)

        client_update = client(cut_grads) if client is not None else None

        def accept():
            self.model.optimizer.apply(var_grads, variables)
            if client_update is not None:
                client_update()
            self.loss_tracker.update_state(loss, sample_weight=tf.shape(activations[0])[0])
            return self._logs(labels, y_pred, sample_weight)

        accepted = loss_ok & grads_ok & state_ok
        if admissible is not None:
            accepted = accepted & admissible
        # The update runs only for an accepted step; a refused one leaves the
        # weights and the optimizer untouched (handle() puts the rest back).
        logs = tf.cond(accepted, accept, self._results)
        return loss_ok, grads_ok, state_ok, loss, cut_grads, logs

    def _evaluate_fn(self, activations, labels, sample_weight):
        y_pred = self.model(self._inputs(list(activations)), training=False)
        loss = self.model.compute_loss(
            x=None, y=labels, y_pred=y_pred, sample_weight=sample_weight, training=False
        )
        loss_ok = tf.math.is_finite(loss)

        def accept():
            self.loss_tracker.update_state(loss, sample_weight=tf.shape(activations[0])[0])
            return self._logs(labels, y_pred, sample_weight)

        return loss_ok, loss, tf.cond(loss_ok, accept, self._results)

    def _logs(self, labels, y_pred, sample_weight):
        logs = self.model.compute_metrics(None, labels, y_pred, sample_weight=sample_weight)
        logs = {k: v for k, v in logs.items() if k != "loss"}
        return {"loss": self.loss_tracker.result(), **logs}

    def _results(self):
        """The logs as they stand, with no update (a refused step's branch)."""
        logs = {k: v for k, v in self.model.get_metrics_result().items() if k != "loss"}
        return {"loss": self.loss_tracker.result(), **logs}

    def _snapshot(self, everything: bool) -> tuple[list, list]:
        """The variables a refused step puts back, and their values now.

        A training or evaluation step writes its metrics only once it is
        accepted, so before a step only what its forward pass may move
        (moving statistics, seed states) needs keeping, and nothing at all
        (no extra call) for a model without such state; `everything` also
        keeps the metrics, for a message that resets them first."""
        if everything:
            return self._kept, self._keep()
        if self._moved:
            return self._moved, self._keep_moved()
        return [], []

    @staticmethod
    def _put_back(kept) -> None:
        _assign_all(*kept)  # (variables, values), from _snapshot

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
        kept = list(self.model.non_trainable_variables) + self._metric_variables()
        self._kept = _unique(kept)
        self._moved = _unique(self.model.non_trainable_variables)
        self._built = True
        if self._pending_metrics is not None:
            checkpoint.assign("metrics", self._metric_variables(), *self._pending_metrics)
            self._pending_metrics = None

    def _metric_variables(self) -> list:
        return list(self.loss_tracker.variables) + [
            v for metric in self.model.metrics for v in metric.variables
        ]

    def _check_classes(self, labels) -> None:
        for where, leaf, name in _labels_by_output(labels, list(self._classes)):
            shape, sparse, ignore = self._classes[name]
            units = shape[-1] if shape else None
            array = np.asarray(leaf)
            if units is None or not (sparse or (
                    units > 1 and array.dtype.kind in "iu" and _indexes_classes(array.shape,
                                                                                shape))):
                continue
            values = array if ignore is None else array[array != ignore]
            low, high = _extremes(values)
            if low < 0 or high >= units:
                ignoring = "" if ignore is None else f", or {ignore} (`ignore_class`)"
                raise ValueError(
                    f"`{where}` must hold class indices in [0, {units}){ignoring} for output "
                    f"{name!r} ({units} units); received values from {low:g} to {high:g}.")

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
        # Metric variables exist once the first labelled batch has built them:
        # assigned now if they exist, else when they are built. A checkpoint
        # taken before they were built holds none: they start from zero.
        if any(k.startswith("metrics/") for k in arrays):
            if self._built:
                checkpoint.assign("metrics", self._metric_variables(), arrays, path)
            else:
                self._pending_metrics = (arrays, path)
        elif self._built:
            self.reset_metrics()

    def reset_metrics(self) -> None:
        self.loss_tracker.reset_state()
        self.model.reset_metrics()

    @staticmethod
    def _refuse_unless_accepted(loss_ok, grads_ok, state_ok, loss) -> None:
        if not bool(loss_ok):
            raise ValueError(
                f"Refused the step: its loss is not finite ({float(loss)}); expected a "
                f"finite loss. {_NOTHING_CHANGED} Check the labels and sample weights; if "
                "training diverged, lower the learning rate.")
        if not bool(grads_ok):
            raise ValueError(
                "Refused the step: its gradients are not finite, or so large that their "
                "squares overflow (as optimizers such as Adam compute them). "
                f"{_NOTHING_CHANGED}")
        if not bool(state_ok):
            raise ValueError(
                "Refused the step: its forward pass made non-trainable state (such as "
                "BatchNormalization's moving variance) non-finite. "
                f"{_NOTHING_CHANGED} Lower `max_activation`.")

    def prepare(self, message: Activations) -> None:
        """The checks `handle` makes before it runs anything that needs no cut
        values (labels, sample weights, classes), and the first message's build.
        For a fused in-process step (`ClientRole.fused_step`)."""
        if message.labels is None:
            raise ValueError(
                f"A {message.mode!r} message needs labels: the server computes the loss. "
                "Pass `y` to fit()/evaluate()."
            )
        batch = len(message.tensors[0])
        check_labels(message.labels, message.sample_weight, batch, self.max_sample_weight)
        self._check_classes(message.labels)
        if not self._built:
            self._build(message)

    def handle(self, message: Activations) -> Reply:
        """Process one message from a client and return the reply.

        Raises `ValueError`, with nothing changed, when the message or its step
        is refused (see the class docstring).
        """
        check_message(message, self.max_activation, self.max_sample_weight)
        if message.mode == "predict":
            if message.reset_metrics:
                self.reset_metrics()
            outputs = self._predict(message.tensors)
            return Reply(step=message.step, outputs=keras.tree.map_structure(np.asarray, outputs))
        if message.labels is None:
            raise ValueError(
                f"A {message.mode!r} message needs labels: the server computes the loss. "
                "Pass `y` to fit()/evaluate()."
            )
        self._check_classes(message.labels)
        if not self._built:
            self._build(message)
        kept = self._snapshot(everything=message.reset_metrics)
        try:
            if message.reset_metrics:
                self.reset_metrics()
            if message.mode == "train":
                loss_ok, grads_ok, state_ok, loss, grads, logs = self._train(
                    message.tensors, message.labels, message.sample_weight)
            else:
                loss_ok, loss, logs = self._evaluate(
                    message.tensors, message.labels, message.sample_weight)
                grads_ok, state_ok, grads = True, True, ()
            self._refuse_unless_accepted(loss_ok, grads_ok, state_ok, loss)
        except BaseException:
            # The forward pass (and a reset) may have moved non-trainable and
            # metric state; the weights and the optimizer were not written.
            self._put_back(kept)
            raise
        return Reply(
            step=message.step,
            gradients=tuple(np.asarray(g) for g in grads),
            logs={k: float(v) for k, v in logs.items()},
        )


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
