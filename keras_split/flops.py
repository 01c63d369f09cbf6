"""Forward FLOPs of one layer call, counted by TensorFlow's graph profiler.

Counting from the traced graph, rather than from a table of formulas per layer
type, covers custom layers, nested models and Keras operations (`keras.ops.*`
nodes) too. Ops without registered statistics (ReLU, reshapes) count as zero,
as in TensorFlow's own profiler.
"""

from __future__ import annotations

import logging

import tensorflow as tf

from keras_split.graph import Call


def call_flops(call: Call) -> int:
    """FLOPs of one sample through `call` (batch size 1)."""
    if call.is_input or not call.inputs:
        return 0
    # One placeholder per distinct tensor: a tensor read twice (`mha(x, x)`) is
    # one input of the traced function.
    tensors = list({id(t): t for t in call.inputs}.values())
    specs = []
    for t in tensors:
        shape = (1,) + tuple(t.shape[1:])
        if any(d is None for d in shape):
            return 0  # Unknown sizes have no FLOP count; treat the layer as free.
        specs.append(tf.TensorSpec(shape, t.dtype))
    operation = call.layer

    def run(*values):
        if call.node is None:
            args = values[0] if len(values) == 1 else list(values)
            return operation(args, training=False)
        # The node's recorded arguments re-create the call as the model makes
        # it: keyword tensors (masks) and non-tensor arguments included.
        by_id = {id(t): v for t, v in zip(tensors, values, strict=True)}
        args, kwargs = call.node.arguments.fill_in(by_id)
        if call.is_layer:
            # Inference mode, as Keras propagates it; operations take no `training`.
            kwargs.setdefault("training", False)
        return operation(*args, **kwargs)

    try:
        graph = tf.function(run).get_concrete_function(*specs).graph
    except (TypeError, ValueError):
        # A call that cannot be re-traced on its own (a layer that reads
        # Python state of the original call) is counted as free rather than
        # failing the whole table.
        return 0
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    # The profiler logs a v1 deprecation notice on every call; it says nothing
    # a user of cut_candidates can act on.
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        return int(tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops)
    finally:
        tf_logger.setLevel(level)

