"""The signatures a device runs, as one `tf.Module` over its own variables.

- `infer(inputs) -> cut_i`: the cut tensors in inference mode.
- `forward(inputs) -> cut_i`: the cut tensors in training mode (batch
  statistics), without changing anything: what the device sends up.
- `train(inputs, grad_i) -> step`: recomputes the training forward pass,
  backpropagates the server's cut gradients (a vector-Jacobian product), applies
  the optimizer, and updates BatchNorm moving statistics exactly once. With
  NoPeek, the gradient of `alpha * dCor(inputs, cut)` (forward ops: the
  objective's `cut_gradients`) is added to the received cut gradients first:
  the signature and what the device sends stay the same.
- `get_weights() -> w000...` / `set_weights(w000...)`: every model weight in
  `model.get_weights()` order (to persist them, or hand them to the next client).
- `get_optimizer() -> s000..., step` / `set_optimizer(...)`: the optimizer's
  slots and step count.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_split.export.optimizers import initial_slots
from keras_split_wire import device_names


def input_names(program) -> list[str]:
    """Signature names of the model's inputs: x0, x1, ... in `model.inputs` order
    (signature inputs are a dict: positional names keep the order recoverable)."""
    return [device_names.model_input(i) for i in range(len(program.inputs))]


def _spec(tensor, name):
    return tf.TensorSpec([None, *tensor.shape[1:]], tensor.dtype, name=name)


def _function(python_function, input_signature):
    # No AutoGraph: the program has no Python control flow over tensors, and
    # converting every rule and gradient closure costs seconds per layer.
    return tf.function(python_function, input_signature=input_signature, autograph=False)


class DeviceModule(tf.Module):
    """Variables and signatures of an exported client half."""

    def __init__(self, program, update, extra_gradients=None):
        super().__init__()
        # extra_gradients(inputs, cut_tensors) -> one gradient per cut tensor,
        # added to the server's (the device's own term of the loss); it may
        # return None (nothing to add: no ops are traced for it).
        self._program, self._update = program, update
        self._extra_gradients = extra_gradients
        self.params = [tf.Variable(np.asarray(v.numpy()), name=f"param_{i}")
                       for i, v in enumerate(program.trainable)]
        self.state = [tf.Variable(np.asarray(v.numpy()), name=f"state_{i}")
                      for i, v in enumerate(program.state)]
        self.slots = [tf.Variable(s, name=f"slot_{i}")
                      for i, s in enumerate(initial_slots(update, self.params))]
        self.step = tf.Variable(0.0, name="step")
        by_id = {id(v): var for v, var in zip(program.trainable, self.params, strict=True)}
        by_id.update({id(v): var for v, var in zip(program.state, self.state, strict=True)})
        self.weights = [by_id[id(v)] for v in program.weights]
        self.names = input_names(program)
        inputs = [_spec(t, n) for t, n in zip(program.inputs, self.names, strict=True)]
        grads = [_spec(t, device_names.cut_gradient(i)) for i, t in enumerate(program.outputs)]
        weights = [tf.TensorSpec(w.shape, w.dtype, name=device_names.weight(i))
                   for i, w in enumerate(self.weights)]
        slots = [tf.TensorSpec(s.shape, s.dtype, name=device_names.slot(i))
                 for i, s in enumerate(self.slots)]
        step = [tf.TensorSpec([], tf.float32, name=device_names.STEP)]
        self.functions = {
            device_names.INFER: _function(self._infer, input_signature=inputs),
            device_names.FORWARD: _function(self._forward, input_signature=inputs),
            device_names.TRAIN: _function(self._train, input_signature=inputs + grads),
            device_names.GET_WEIGHTS: _function(self._get_weights, input_signature=[]),
            device_names.SET_WEIGHTS: _function(self._set_weights, input_signature=weights),
            device_names.GET_OPTIMIZER: _function(self._get_optimizer, input_signature=[]),
            device_names.SET_OPTIMIZER: _function(self._set_optimizer,
                                                    input_signature=slots + step),
        }

    def _run(self, inputs, training):
        params = [p.read_value() for p in self.params]
        state = [s.read_value() for s in self.state]
        return self._program.run(params, state, list(inputs), training)

    @staticmethod
    def _cuts(outputs):
        return {device_names.cut(i): t for i, t in enumerate(outputs)}

    def _step(self):
        return {device_names.STEP: self.step.read_value()}

    def _infer(self, *inputs):
        return self._cuts(self._run(inputs, training=False)[0])

    def _forward(self, *inputs):
        return self._cuts(self._run(inputs, training=True)[0])

    def _train(self, *arguments):
        count = len(self.names)
        inputs, cut_gradients = arguments[:count], list(arguments[count:])
        params = [p.read_value() for p in self.params]
        state = [s.read_value() for s in self.state]
        with tf.GradientTape() as tape:
            tape.watch(params)
            outputs, new_state = self._program.run(params, state, list(inputs), True)
        extra = None if self._extra_gradients is None else self._extra_gradients(
            list(inputs), outputs)
        if extra is not None:
            cut_gradients = [g + e for g, e in zip(cut_gradients, extra, strict=True)]
        grads = tape.gradient(outputs, params, output_gradients=cut_gradients)
        new_params, new_slots = self._update.apply(
            params, grads, [s.read_value() for s in self.slots], self.step.read_value())
        for variable, value in zip(self.params, new_params, strict=True):
            variable.assign(value)
        for variable, value in zip(self.slots, new_slots, strict=True):
            variable.assign(value)
        for variable, value in zip(self.state, new_state, strict=True):
            variable.assign(value)
        self.step.assign_add(1.0)
        return self._step()

    def _get_weights(self):
        return {device_names.weight(i): w.read_value() for i, w in enumerate(self.weights)}

    def _set_weights(self, *weights):
        for variable, value in zip(self.weights, weights, strict=True):
            variable.assign(value)
        return self._step()

    def _get_optimizer(self):
        values = {device_names.slot(i): s.read_value() for i, s in enumerate(self.slots)}
        return {**values, **self._step()}

    def _set_optimizer(self, *values):
        for variable, value in zip(self.slots, values[:-1], strict=True):
            variable.assign(value)
        self.step.assign(values[-1])
        return self._step()
