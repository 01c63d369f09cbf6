"""A client half as a pure function of explicit tensors, for export.

`ClientProgram(model)` reads the client half's layer graph and maps each layer
call to an implementation in `ops` (whose gradients run on device runtimes).
`run(params, state, inputs, training)` computes the cut tensors from the
trainable parameters, the non-trainable state (BatchNorm moving statistics)
and the inputs, and returns the new state a training step leaves behind.
Nothing here touches Keras variables, so the same function becomes a TFLite
signature over variables or a stateless ONNX graph over inputs.

A layer without a rule is refused when the program is built, naming the layer,
long before a device would fail on it.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_split.export import ops
from keras_split.graph import is_graph_model, read_graph, tensor_key

_ACTIVATIONS = {"linear": None, "relu": ops.relu, "sigmoid": ops.sigmoid, "tanh": ops.tanh}


class UnsupportedLayerError(ValueError):
    """A layer the device export cannot express."""


def _refuse(layer, why: str):
    raise UnsupportedLayerError(
        f"Layer {layer.name!r} ({type(layer).__name__}) cannot be exported for on-device "
        f"training: {why}. Move it to the server half (cut before it), or replace it with "
        "a supported layer (Conv2D, Dense, MaxPooling2D, AveragePooling2D, "
        "BatchNormalization, Flatten, Rescaling, ReLU/Activation, Add, Concatenate)."
    )


def _activation(layer):
    name = keras.activations.serialize(layer.activation)
    name = name if isinstance(name, str) else name.get("config", {}).get("name", str(name))
    if name not in _ACTIVATIONS:
        _refuse(layer, f"activation {name!r} has no device gradient rule (supported: "
                       f"{sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def _apply_activation(function, x):
    return x if function is None else function(x)


def _check_channels_last(layer):
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        _refuse(layer, "only channels_last data is supported")


class ClientProgram:
    """The client half's computation, layer by layer, over explicit tensors.

    Attributes:
        trainable: the model's trainable variables (the order of `params`).
        state: the non-trainable variables a training step updates (BatchNorm
            moving statistics), the order of `state`.
        weights: every model variable, in `model.weights` order (what
            `get_weights`/`set_weights` exchange).
        inputs: the model's input tensors; outputs: its output (cut) tensors.
    """

    def __init__(self, model: keras.Model):
        if not is_graph_model(model):
            raise TypeError("Export needs a functional or Sequential client half; received a "
                            f"{type(model).__name__}.")
        self.model = model
        self.graph = read_graph(model)
        self.trainable = list(model.trainable_variables)
        self.weights = list(model.weights)
        self.state = []
        self.inputs, self.outputs = list(model.inputs), list(model.outputs)
        trainable_ids = {id(v) for v in self.trainable}
        for variable in self.weights:
            if id(variable) not in trainable_ids and "seed_generator" not in variable.path:
                self.state.append(variable)
        for call in self.graph.calls:
            if not call.is_input:
                self._rule(call.layer)  # refuse unsupported layers now, not on the device
        if model.losses:
            raise UnsupportedLayerError(
                "The client half has regularization losses (kernel_regularizer, "
                "activity_regularizer, add_loss); the device export has no rule for them. "
                "Remove them from the client's layers before exporting.")
        self.check()

    def check(self) -> None:
        """Run once on a zero batch, in both modes: every layer's configuration is
        judged here (a dilated convolution, say), not on the device."""
        params = [tf.convert_to_tensor(v.value) for v in self.trainable]
        state = [tf.convert_to_tensor(v.value) for v in self.state]
        inputs = [tf.zeros([1, *t.shape[1:]], t.dtype) for t in self.inputs]
        for training in (True, False):
            self.run(params, state, inputs, training)

    def _rule(self, layer):
        kind = type(layer).__name__
        rule = getattr(self, f"_{kind}", None)
        if rule is None or isinstance(layer, keras.Model):
            _refuse(layer, f"there is no device rule for {kind}")
        return rule

    # -- running -----------------------------------------------------------------

    def run(self, params, state, inputs, training: bool):
        """Cut tensors for `inputs`; returns (outputs, new_state)."""
        self._params = {id(v): p for v, p in zip(self.trainable, params, strict=True)}
        self._state = {id(v): s for v, s in zip(self.state, state, strict=True)}
        self._new_state = dict(self._state)
        values = {}
        for tensor, value in zip(self.inputs, inputs, strict=True):
            values[tensor_key(tensor)] = value
        for call in self.graph.calls:
            if call.is_input:
                continue
            arguments = [values[tensor_key(t)] for t in call.inputs]
            result = self._rule(call.layer)(call.layer, arguments, training)
            for tensor, value in zip(call.outputs, result, strict=True):
                values[tensor_key(tensor)] = value
        outputs = [values[tensor_key(t)] for t in self.outputs]
        new_state = [self._new_state[id(v)] for v in self.state]
        return outputs, new_state

    def _p(self, variable):
        if id(variable) in self._params:
            return self._params[id(variable)]
        return self._state[id(variable)]  # a frozen (non-trainable) weight

    # -- rules, one per Keras layer class ------------------------------------

    def _Rescaling(self, layer, args, training):  # noqa: N802 - named after the class
        x = tf.cast(args[0], tf.float32)
        return [x * float(layer.scale) + float(layer.offset)]

    def _Conv2D(self, layer, args, training):  # noqa: N802
        _check_channels_last(layer)
        if tuple(layer.dilation_rate) != (1, 1) or layer.groups != 1:
            _refuse(layer, "dilated and grouped convolutions are not supported")
        if layer.padding not in ("valid", "same"):
            _refuse(layer, f"padding {layer.padding!r} is not supported")
        y = ops.conv2d(args[0], self._p(layer.kernel), layer.strides, layer.padding)
        if layer.use_bias:
            y = ops.bias_add(y, self._p(layer.bias))
        return [_apply_activation(_activation(layer), y)]

    def _Dense(self, layer, args, training):  # noqa: N802
        x = args[0]
        if len(x.shape) != 2:
            _refuse(layer, f"it takes a rank-{len(x.shape)} input; add a Flatten before it")
        y = ops.matmul(x, self._p(layer.kernel))
        if layer.use_bias:
            y = ops.bias_add(y, self._p(layer.bias))
        return [_apply_activation(_activation(layer), y)]

    def _pool_size(self, layer):
        _check_channels_last(layer)
        pool, strides = tuple(layer.pool_size), tuple(layer.strides)
        if pool != strides:
            _refuse(layer, f"overlapping pooling (pool {pool}, strides {strides}) is not "
                           "supported; use strides equal to pool_size")
        if layer.padding == "same":
            _refuse(layer, "padding='same' pooling is not supported; use 'valid'")
        return pool

    def _MaxPooling2D(self, layer, args, training):  # noqa: N802
        return [ops.max_pool(args[0], self._pool_size(layer))]

    def _AveragePooling2D(self, layer, args, training):  # noqa: N802
        return [ops.average_pool(args[0], self._pool_size(layer))]

    def _Flatten(self, layer, args, training):  # noqa: N802
        return [ops.flatten(args[0])]

    def _ReLU(self, layer, args, training):  # noqa: N802
        if layer.max_value is not None or layer.negative_slope or layer.threshold:
            _refuse(layer, "only plain ReLU (no max_value, negative_slope or threshold)")
        return [ops.relu(args[0])]

    def _Activation(self, layer, args, training):  # noqa: N802
        return [_apply_activation(_activation(layer), args[0])]

    def _Add(self, layer, args, training):  # noqa: N802
        shapes = {tuple(a.shape[1:]) for a in args}
        if len(shapes) != 1:
            _refuse(layer, "broadcasting additions are not supported")
        return [tf.add_n(args)]

    def _Concatenate(self, layer, args, training):  # noqa: N802
        axis = layer.axis % len(args[0].shape)
        if axis == 0:
            _refuse(layer, "concatenating along the batch axis is not supported")
        return [ops.concatenate(args, axis)]

    def _Dropout(self, layer, args, training):  # noqa: N802
        if layer.rate == 0 or not training:
            return [args[0]]
        _refuse(layer, "a training Dropout needs the same random mask in the device's forward "
                       "and train calls, which the export does not provide")

    def _BatchNormalization(self, layer, args, training):  # noqa: N802
        x = args[0]
        if layer.axis not in (-1, len(x.shape) - 1):
            _refuse(layer, "only normalization over the last (channels) axis is supported")
        if getattr(layer, "renorm", False) or getattr(layer, "synchronized", False):
            _refuse(layer, "batch renormalization and synchronized statistics are not supported")
        channels = x.shape[-1]
        gamma = self._p(layer.gamma) if layer.scale else tf.ones([channels])
        beta = self._p(layer.beta) if layer.center else tf.zeros([channels])
        mean_var, variance_var = layer.moving_mean, layer.moving_variance
        if not training or not layer.trainable:
            return [ops.batch_norm_infer(x, gamma, beta, self._p(mean_var),
                                         self._p(variance_var), layer.epsilon)]
        y, mean, variance = ops.batch_norm_train(x, gamma, beta, layer.epsilon)
        momentum = float(layer.momentum)
        self._new_state[id(mean_var)] = self._p(mean_var) * momentum + mean * (1 - momentum)
        self._new_state[id(variance_var)] = (self._p(variance_var) * momentum
                                             + variance * (1 - momentum))
        return [y]
