"""Read the layer graph of a functional or Sequential Keras model.

The partitioner reasons about *calls* of layers (Keras "nodes") and the
tensors between them. Everything here walks back from `model.outputs` through
each tensor's `_keras_history`, which records the call that produced it. That
history belongs to the model's own graph, so it stays correct even after other
models (such as the two halves of a split) have re-used the same layers.

A call is a call of a *layer* or of a Keras *operation*: `keras.ops.*` applied to
symbolic tensors (`ops.multiply(x, mask)`) records a node of an `Operation`
that is not a layer and has no weights. Tensors passed by keyword
(`mha(q, v, attention_mask=m)`, `pool(x, mask=m)`) are inputs of the call like
positional ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras


def is_graph_model(model) -> bool:
    """True for models whose layer graph can be read: functional and Sequential."""
    if isinstance(model, keras.Sequential):
        return True
    # A functional model is the only kind whose `outputs` are symbolic tensors
    # with a recorded history; a subclassed model has no such graph.
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return False
    return bool(outputs) and all(hasattr(t, "_keras_history") for t in outputs)


def tensor_key(tensor) -> tuple[int, int, int]:
    """A hashable identity for a symbolic tensor: (operation, call, output index)."""
    operation, node_index, tensor_index = tensor._keras_history
    return (id(operation), node_index, tensor_index)


@dataclass(eq=False)
class Call:
    """One call of a layer (or a Keras operation) in the graph.

    Attributes:
        layer: the layer or `keras.Operation` called.
        inputs: every symbolic tensor the call reads, positional and keyword
            arguments alike, in Keras's flattened order.
        outputs: the tensors it returns.
        parents: the calls that produce `inputs`.
        node: the Keras node, whose `arguments` re-create the call exactly
            (keyword tensors, non-tensor arguments); None for hand-made calls.
    """

    layer: keras.Operation
    inputs: list
    outputs: list
    parents: list[Call] = field(default_factory=list)
    node: object = None

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def is_input(self) -> bool:
        return isinstance(self.layer, keras.layers.InputLayer)

    @property
    def is_layer(self) -> bool:
        """False for a Keras operation (`keras.ops.*`) recorded in the graph."""
        return isinstance(self.layer, keras.Layer)

    @property
    def weights(self) -> list:
        """The weights of the layer called; an operation has none."""
        return list(self.layer.weights) if self.is_layer else []


@dataclass
class Graph:
    """The calls of a model, in topological (graph) order."""

    calls: list[Call]
    producer: dict  # tensor_key -> Call
    consumers: dict  # tensor_key -> list[Call]
    outputs: list

    def calls_of(self, layer) -> list[Call]:
        return [c for c in self.calls if c.layer is layer]

    def ancestors(self, tensors) -> set[int]:
        """ids of every call needed to compute `tensors` (the producers included)."""
        seen: set[int] = set()
        stack = [self.producer[tensor_key(t)] for t in tensors]
        while stack:
            call = stack.pop()
            if id(call) in seen:
                continue
            seen.add(id(call))
            stack.extend(call.parents)
        return seen

    def descendants(self, tensors) -> set[int]:
        """ids of every call that reads `tensors`, directly or through other calls."""
        seen: set[int] = set()
        stack = [c for t in tensors for c in self.consumers.get(tensor_key(t), [])]
        while stack:
            call = stack.pop()
            if id(call) in seen:
                continue
            seen.add(id(call))
            stack.extend(c for t in call.outputs for c in self.consumers.get(tensor_key(t), []))
        return seen


def operations(model) -> list:
    """The layers and Keras operations of `model` (a Sequential model has layers only)."""
    return list(getattr(model, "operations", None) or model.layers)


def read_graph(model) -> Graph:
    """Return the calls of `model` in topological order."""
    producer: dict = {}
    calls_by_node: dict[int, Call] = {}
    order: list[Call] = []

    def call_of(tensor) -> Call:
        operation, node_index, _ = tensor._keras_history
        node = operation._inbound_nodes[node_index]
        if id(node) not in calls_by_node:
            calls_by_node[id(node)] = Call(
                layer=operation,
                inputs=list(node.input_tensors),
                outputs=list(node.outputs),
                node=node,
            )
        return calls_by_node[id(node)]

    # Iterative post-order depth-first walk: deep models (ResNet-152 and the
    # like) would exceed Python's recursion limit with a recursive one.
    done: set[int] = set()
    roots = list(model.outputs) + list(model.inputs)
    for root in roots:
        stack = [(call_of(root), False)]
        while stack:
            call, expanded = stack.pop()
            if id(call) in done:
                continue
            if expanded:
                call.parents = [call_of(t) for t in call.inputs]
                done.add(id(call))
                order.append(call)
                for t in call.outputs:
                    producer[tensor_key(t)] = call
                continue
            stack.append((call, True))
            for t in reversed(call.inputs):
                parent = call_of(t)
                if id(parent) not in done:
                    stack.append((parent, False))

    consumers: dict = {}
    for call in order:
        for t in call.inputs:
            consumers.setdefault(tensor_key(t), []).append(call)
    return Graph(calls=order, producer=producer, consumers=consumers, outputs=list(model.outputs))
