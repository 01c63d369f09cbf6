"""Forward FLOPs of one layer call, counted by TensorFlow's graph profiler.

Counting from the traced graph, rather than from a table of formulas per layer
type, covers custom layers and nested models too. Ops without registered
statistics (ReLU, reshapes) count as zero, as in TensorFlow's own profiler.
"""

from __future__ import annotations

import logging

import tensorflow as tf

from keras_split.graph import Call


def call_flops(call: Call) -> int:
    """FLOPs of one sample through `call` (batch size 1)."""
    if call.is_input or not call.inputs:
        return 0
    specs = []
    for t in call.inputs:
        shape = (1,) + tuple(t.shape[1:])
        if any(d is None for d in shape):
            return 0  # Unknown sizes have no FLOP count; treat the layer as free.
        specs.append(tf.TensorSpec(shape, t.dtype))
    layer = call.layer

    def run(*args):
        return layer(args[0] if len(args) == 1 else list(args), training=False)

    try:
        graph = tf.function(run).get_concrete_function(*specs).graph
    except (TypeError, ValueError):
        # Layers whose call signature differs from a single tensor or list
        # (keyword-only inputs) cannot be re-traced in isolation.
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
