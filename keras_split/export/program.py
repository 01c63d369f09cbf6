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
import numpy as np
import tensorflow as tf

from keras_split.export import ops
from keras_split.graph import Call, is_graph_model, read_graph, tensor_key

_ACTIVATIONS = {"linear": None, "relu": ops.relu, "relu6": ops.relu6, "sigmoid": ops.sigmoid,
                "tanh": ops.tanh, "hard_sigmoid": ops.hard_sigmoid,
                "hard_silu": ops.hard_silu, "silu": ops.silu, "softmax": ops.softmax}

SUPPORTED = ("Conv2D, DepthwiseConv2D, SeparableConv2D, Dense, MaxPooling2D, "
             "AveragePooling2D, GlobalAveragePooling2D, BatchNormalization, Normalization, "
             "Rescaling, ZeroPadding2D, Flatten, Reshape, ReLU, Activation, Add, Multiply, "
             "Concatenate, Dropout at inference, and +, -, *, / with a constant")

# Python arithmetic on a symbolic Keras tensor leaves these operations (not
# layers) in the graph: MobileNetV3's hard sigmoid is `ReLU(6.0)(x + 3.0) * (1 / 6)`.
_ARITHMETIC = {"Add": "add", "Subtract": "subtract", "Multiply": "multiply",
               "Divide": "divide", "TrueDivide": "divide"}


class UnsupportedLayerError(ValueError):
    """A layer the device export cannot express."""


def _refuse(layer, why: str):
    kind = type(layer).__name__
    what = (f"Layer {layer.name!r} ({kind})" if isinstance(layer, keras.Layer)
            else f"Operation {layer.name!r} (keras.ops {kind})")
    raise UnsupportedLayerError(
        f"{what} cannot be exported for on-device training: {why}. Move it to the server "
        f"half (cut before it), or replace it with a supported layer ({SUPPORTED})."
    )


def _activation_name(layer) -> str:
    name = keras.activations.serialize(layer.activation)
    return name if isinstance(name, str) else name.get("config", {}).get("name", str(name))


def _activation(layer):
    name = _activation_name(layer)
    if name not in _ACTIVATIONS:
        _refuse(layer, f"activation {name!r} has no device gradient rule (supported: "
                       f"{sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def _apply_activation(function, x):
    return x if function is None else function(x)


def _node(call: Call):
    """The Keras node of `call`: its arguments as called (constants, keywords)."""
    operation, node_index, _ = call.outputs[0]._keras_history
    return operation._inbound_nodes[node_index]


def _is_keras_class(operation) -> bool:
    # A user's class that happens to share a Keras class's name gets no rule.
    return type(operation).__module__.startswith("keras.")


def _rule_name(operation) -> str | None:
    if isinstance(operation, keras.Model) or not _is_keras_class(operation):
        return None
    kind = type(operation).__name__
    return f"_{kind}" if isinstance(operation, keras.Layer) else f"_op_{kind}"


def _regularized(layer) -> bool:
    if not isinstance(layer, keras.Layer):
        return False
    return bool(layer.losses) or getattr(layer, "activity_regularizer", None) is not None


def _blocking(model, options) -> tuple[Call | None, UnsupportedLayerError | None]:
    """The first call (in graph order) the export cannot express, and why."""
    for call in read_graph(model).calls:
        error = _why_not(call, options)
        if error is not None:
            return call, error
    return None, None


def _why_not(call: Call, options) -> UnsupportedLayerError | None:
    """Why the export cannot express `call`, or None when it can."""
    if call.is_input:
        return None
    try:
        _checked_rule(call, options)
        if _regularized(call.layer):
            raise UnsupportedLayerError(
                f"Layer {call.layer.name!r} ({type(call.layer).__name__}) has a "
                "regularization loss (kernel_regularizer, activity_regularizer, add_loss); "
                "the device export has no rule for it. Remove it from the client's layers "
                "before exporting, or cut before this layer.")
    except UnsupportedLayerError as error:
        return error
    return None


def blocks_export(call: Call, dropout: str | None = None) -> bool:
    """Whether the device export cannot express one call of a layer graph.

    The per-call form of `exportable`, for a cut table that asks it once per
    layer of a whole model and then, for each cut, looks only at the calls on
    the client's side (`keras_split.cut_candidates` does this).

    Args:
        call: one `keras_split.graph.Call` of `read_graph(model).calls`.
        dropout: as for `exportable`.
    """
    return _why_not(call, _options(dropout)) is not None


def exportable(model: keras.Model, dropout: str | None = None) -> tuple[bool, str | None]:
    """Whether `model` (a client half) can be exported for on-device training,
    and if not, the name of the first layer (in graph order) that stops it.

    Cheap: it reads each layer's class and configuration and builds nothing, so
    a cut table can ask it for every candidate cut. `ClientProgram(model)` (which
    every export builds first) raises the full reason for the same layer.

    Args:
        model: a functional or Sequential Keras model (`split.client`).
        dropout: as for `export_client`: None refuses a Dropout with a rate,
            "inference" lets the device train with Dropout off.

    Returns:
        `(True, None)`, or `(False, layer_name)`; `(False, None)` for a model
        without a readable layer graph (a subclassed model).

    Example:

    ```python
    split = keras_split.split(model, "block_2_add")
    ok, layer = keras_split.export.exportable(split.client)
    ```
    """
    if not is_graph_model(model):
        return False, None
    call, _ = _blocking(model, _options(dropout))
    return (True, None) if call is None else (False, call.layer.name)


def _options(dropout) -> dict:
    if dropout not in (None, "inference"):
        raise ValueError(f"`dropout` must be None or 'inference'; received {dropout!r}.")
    return {"dropout": dropout}


def _checked_rule(call, options) -> str:
    """The name of `call`'s rule in `ClientProgram`, after its configuration
    check (a static `_check_<Kind>`, which refuses what the rule cannot do)."""
    operation = call.layer
    name = _rule_name(operation)
    if name is None or not hasattr(ClientProgram, name):
        _refuse(operation, f"there is no device rule for {type(operation).__name__}")
    check = getattr(ClientProgram, f"_check{name}", None)
    if check is not None:
        check(operation, call, options)
    return name


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

    def __init__(self, model: keras.Model, dropout: str | None = None):
        self.options = _options(dropout)
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
        # Refuse unsupported layers now, not on the device.
        _, error = _blocking(model, self.options)
        if error is not None:
            raise error
        if model.losses:
            raise UnsupportedLayerError(
                "The client half has regularization losses (kernel_regularizer, "
                "activity_regularizer, add_loss); the device export has no rule for them. "
                "Remove them from the client's layers before exporting.")
        self._rules = {id(call): getattr(self, _checked_rule(call, self.options))
                       for call in self.graph.calls if not call.is_input}
        self._relu_deferred, self._relu_pools = self._relu_before_max_pool()
        self.check()

    def _relu_before_max_pool(self):
        """Calls whose ReLU moves after the MaxPooling2D that alone reads them.

        `max_pool(relu(x)) == relu(max_pool(x))`, ties included, and the
        gradient is the same; after the pool the ReLU and its mask work on a
        quarter of the values (2x2 windows), and the pool's gradient needs no
        mask of its own at full size. Returns (ids of the calls that skip
        their ReLU, ids of the pooling calls that apply it).
        """
        outputs = {tensor_key(t) for t in self.outputs}
        deferred, pools = set(), set()
        for call in self.graph.calls:
            if not isinstance(call.layer, keras.layers.MaxPooling2D):
                continue
            key = tensor_key(call.inputs[0])
            producer = self.graph.producer[key]
            if key in outputs or len(self.graph.consumers.get(key, [])) != 1:
                continue
            if _ends_with_relu(producer.layer):
                deferred.add(id(producer))
                pools.add(id(call))
        return deferred, pools

    def check(self) -> None:
        """Run once on a zero batch, in both modes: anything the configuration
        checks missed fails here, at export, not on the device."""
        params = [tf.convert_to_tensor(v.value) for v in self.trainable]
        state = [tf.convert_to_tensor(v.value) for v in self.state]
        inputs = [tf.zeros([1, *t.shape[1:]], t.dtype) for t in self.inputs]
        for training in (True, False):
            self.run(params, state, inputs, training)

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
            result = self._rules[id(call)](call, arguments, training)
            for tensor, value in zip(call.outputs, result, strict=True):
                values[tensor_key(tensor)] = value
        outputs = [values[tensor_key(t)] for t in self.outputs]
        new_state = [self._new_state[id(v)] for v in self.state]
        return outputs, new_state

    def _p(self, variable):
        if id(variable) in self._params:
            return self._params[id(variable)]
        return self._state[id(variable)]  # a frozen (non-trainable) weight

    # -- rules, one per Keras layer class ----------------------------------------
    # Each `_<Kind>(call, args, training)` returns the call's outputs; each
    # static `_check_<Kind>(layer, call)` refuses, from the configuration alone,
    # what its rule cannot express (`exportable` runs only the checks).

    def _Rescaling(self, call, args, training):  # noqa: N802 - named after the class
        layer = call.layer
        x = tf.cast(args[0], tf.float32)
        return [x * float(layer.scale) + float(layer.offset)]

    @staticmethod
    def _check_Rescaling(layer, call, options):  # noqa: N802
        for name in ("scale", "offset"):
            if np.ndim(getattr(layer, name)) != 0:
                _refuse(layer, f"a per-channel {name} is not supported (only a number)")

    @staticmethod
    def _check_Normalization(layer, call, options):  # noqa: N802
        if layer.invert:
            _refuse(layer, "invert=True is not supported")

    def _Normalization(self, call, args, training):  # noqa: N802
        # Keras's arithmetic; mean and variance from the adapted (non-trainable)
        # weights when the layer has them, so set_weights reaches them.
        layer = call.layer
        if getattr(layer, "adapt_mean", None) is not None:
            shape = layer._broadcast_shape
            mean = tf.reshape(self._p(layer.adapt_mean), shape)
            variance = tf.reshape(self._p(layer.adapt_variance), shape)
        else:
            mean = tf.constant(keras.ops.convert_to_numpy(layer.mean))
            variance = tf.constant(keras.ops.convert_to_numpy(layer.variance))
        epsilon = float(keras.config.epsilon())
        x = tf.cast(args[0], tf.float32)
        return [(x - mean) / tf.maximum(tf.sqrt(variance), epsilon)]

    @staticmethod
    def _check_Conv2D(layer, call, options):  # noqa: N802
        _check_channels_last(layer)
        if tuple(layer.dilation_rate) != (1, 1) or layer.groups != 1:
            _refuse(layer, "dilated and grouped convolutions are not supported")
        _check_padding(layer)
        _activation(layer)

    def _Conv2D(self, call, args, training):  # noqa: N802
        layer = call.layer
        bias = self._p(layer.bias) if layer.use_bias else None
        y = ops.conv2d(args[0], self._p(layer.kernel), layer.strides, layer.padding, bias)
        return [self._finish(call, y, biased=True)]

    def _finish(self, call, y, biased=False):
        layer = call.layer
        if layer.use_bias and not biased:
            y = ops.bias_add(y, self._p(layer.bias))
        if id(call) in self._relu_deferred:
            return y
        return _apply_activation(_activation(layer), y)

    @staticmethod
    def _check_DepthwiseConv2D(layer, call, options):  # noqa: N802
        _check_channels_last(layer)
        if tuple(layer.dilation_rate) != (1, 1):
            _refuse(layer, "dilated convolutions are not supported")
        _check_padding(layer)
        _activation(layer)

    def _DepthwiseConv2D(self, call, args, training):  # noqa: N802
        layer = call.layer
        y = ops.depthwise_conv2d(args[0], self._p(layer.kernel), layer.strides, layer.padding)
        return [self._finish(call, y)]

    _check_SeparableConv2D = _check_DepthwiseConv2D  # noqa: N815

    def _SeparableConv2D(self, call, args, training):  # noqa: N802
        # Keras's separable convolution: depthwise, then a 1x1 convolution.
        layer = call.layer
        y = ops.depthwise_conv2d(args[0], self._p(layer.depthwise_kernel), layer.strides,
                                 layer.padding)
        y = ops.conv2d(y, self._p(layer.pointwise_kernel), (1, 1), "VALID")
        return [self._finish(call, y)]

    @staticmethod
    def _check_Dense(layer, call, options):  # noqa: N802
        rank = len(call.inputs[0].shape)
        if rank != 2:
            _refuse(layer, f"it takes a rank-{rank} input; add a Flatten before it")
        _activation(layer)

    def _Dense(self, call, args, training):  # noqa: N802
        layer = call.layer
        return [self._finish(call, ops.matmul(args[0], self._p(layer.kernel)))]

    @staticmethod
    def _check_MaxPooling2D(layer, call, options):  # noqa: N802
        _check_channels_last(layer)

    _check_AveragePooling2D = _check_MaxPooling2D  # noqa: N815
    _check_GlobalAveragePooling2D = _check_MaxPooling2D  # noqa: N815

    def _MaxPooling2D(self, call, args, training):  # noqa: N802
        layer = call.layer
        return [ops.max_pool(args[0], layer.pool_size, layer.strides, layer.padding,
                             relu=id(call) in self._relu_pools)]

    def _AveragePooling2D(self, call, args, training):  # noqa: N802
        layer = call.layer
        return [ops.average_pool(args[0], layer.pool_size, layer.strides, layer.padding)]

    def _GlobalAveragePooling2D(self, call, args, training):  # noqa: N802
        return [ops.global_average_pool(args[0], call.layer.keepdims)]

    @staticmethod
    def _check_ZeroPadding2D(layer, call, options):  # noqa: N802
        _check_channels_last(layer)

    def _ZeroPadding2D(self, call, args, training):  # noqa: N802
        return [ops.zero_pad(args[0], call.layer.padding)]

    def _Flatten(self, call, args, training):  # noqa: N802
        return [ops.flatten(args[0])]

    @staticmethod
    def _check_Reshape(layer, call, options):  # noqa: N802
        if any(d is None for d in call.outputs[0].shape[1:]):
            _refuse(layer, "the output shape must be fully known")

    def _Reshape(self, call, args, training):  # noqa: N802
        return [ops.reshape(args[0], call.outputs[0].shape[1:])]

    def _ReLU(self, call, args, training):  # noqa: N802
        layer = call.layer
        if id(call) in self._relu_deferred:
            return [args[0]]
        return [ops.keras_relu(args[0], layer.negative_slope, layer.max_value, layer.threshold)]

    @staticmethod
    def _check_Activation(layer, call, options):  # noqa: N802
        _activation(layer)

    def _Activation(self, call, args, training):  # noqa: N802
        if id(call) in self._relu_deferred:
            return [args[0]]
        return [_apply_activation(_activation(call.layer), args[0])]

    @staticmethod
    def _check_Add(layer, call, options):  # noqa: N802
        _check_broadcast(layer, call, "additions")

    def _Add(self, call, args, training):  # noqa: N802
        return [ops.add(args)]

    _check_Multiply = _check_Add  # noqa: N815

    def _Multiply(self, call, args, training):  # noqa: N802
        return [ops.multiply(args)]

    @staticmethod
    def _check_Concatenate(layer, call, options):  # noqa: N802
        if layer.axis % len(call.inputs[0].shape) == 0:
            _refuse(layer, "concatenating along the batch axis is not supported")

    def _Concatenate(self, call, args, training):  # noqa: N802
        return [ops.concatenate(args, call.layer.axis % len(args[0].shape))]

    @staticmethod
    def _check_Dropout(layer, call, options):  # noqa: N802
        # The device's `train` recomputes the forward pass, so a random mask
        # would differ from the one `forward` sent (and from TensorFlow's).
        if layer.rate and options.get("dropout") != "inference":
            _refuse(layer, "a training Dropout needs the same random mask in the device's "
                           "forward and train calls, which the export does not provide. "
                           "Export with dropout='inference' to train on the device with "
                           "Dropout off (as at inference)")

    def _Dropout(self, call, args, training):  # noqa: N802
        # The identity: at inference, and in training when rate is 0 or the
        # export asked for inference-mode Dropout.
        return [args[0]]

    def _BatchNormalization(self, call, args, training):  # noqa: N802
        layer = call.layer
        x = args[0]
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

    @staticmethod
    def _check_BatchNormalization(layer, call, options):  # noqa: N802
        if layer.axis not in (-1, len(call.inputs[0].shape) - 1):
            _refuse(layer, "only normalization over the last (channels) axis is supported")
        if getattr(layer, "renorm", False) or getattr(layer, "synchronized", False):
            _refuse(layer, "batch renormalization and synchronized statistics are not supported")

    # -- keras.ops operations (Python arithmetic on symbolic tensors) -------------

    @staticmethod
    def _check_arithmetic(operation, call, options):
        arguments = _node(call).arguments
        if arguments.kwargs or len(arguments.args) != 2:
            _refuse(operation, "only two positional operands are supported")
        tensors = [a for a in arguments.args if isinstance(a, keras.KerasTensor)]
        constants = [a for a in arguments.args if not isinstance(a, keras.KerasTensor)]
        if constants and not all(isinstance(c, (int, float)) for c in constants):
            _refuse(operation, "only a Python number as the constant operand is supported")
        kind = _ARITHMETIC[type(operation).__name__]
        if len(tensors) == 2:
            if kind not in ("add", "multiply"):
                _refuse(operation, f"{kind} of two tensors is not supported (only with a "
                                   "number)")
            _check_broadcast(operation, call, kind)

    _check_op_Add = _check_op_Subtract = _check_op_Multiply = _check_arithmetic  # noqa: N815
    _check_op_Divide = _check_op_TrueDivide = _check_arithmetic  # noqa: N815

    def _op_arithmetic(self, call, args, training):
        kind = _ARITHMETIC[type(call.layer).__name__]
        if len(args) == 2:
            return [ops.add(args) if kind == "add" else ops.multiply(args)]
        first = _node(call).arguments.args[0]
        constant_first = not isinstance(first, keras.KerasTensor)
        constant = first if constant_first else _node(call).arguments.args[1]
        return [ops.scalar(args[0], kind, constant, constant_first)]

    _op_Add = _op_Subtract = _op_Multiply = _op_Divide = _op_TrueDivide = _op_arithmetic


def _ends_with_relu(layer) -> bool:
    """A plain ReLU is the last thing `layer` computes."""
    if isinstance(layer, keras.layers.ReLU):
        return layer.max_value is None and not layer.negative_slope and not layer.threshold
    if not _is_keras_class(layer) or not hasattr(layer, "activation"):
        return False
    return isinstance(layer, (keras.layers.Activation, keras.layers.Conv2D, keras.layers.Dense,
                              keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)) \
        and _activation_name(layer) == "relu"


def _check_channels_last(layer):
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        _refuse(layer, "only channels_last data is supported")


def _check_padding(layer):
    if layer.padding not in ("valid", "same"):
        _refuse(layer, f"padding {layer.padding!r} is not supported")


def _check_broadcast(operation, call, what):
    shapes = [tuple(t.shape) for t in call.inputs]
    if len({len(s) for s in shapes}) != 1:
        _refuse(operation, f"{what} of tensors of different ranks are not supported")
    for axis in range(1, len(shapes[0])):
        sizes = {s[axis] for s in shapes} - {1}
        if len(sizes) > 1 or None in sizes:
            _refuse(operation, f"{what} must broadcast along known axes of size 1 (shapes "
                               f"{shapes})")
