"""Read the layer graph of a functional or Sequential Keras model.

The partitioner reasons about *calls* of layers (Keras "nodes") and the
tensors between them. Everything here walks back from `model.outputs` through
each tensor's `_keras_history`, which records the call that produced it. That
history belongs to the model's own graph, so it stays correct even after other
models (such as the two halves of a split) have re-used the same layers.
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
    """One call of a layer in the graph, with its input and output tensors."""

    layer: keras.Layer
    inputs: list
    outputs: list
    parents: list[Call] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def is_input(self) -> bool:
        return isinstance(self.layer, keras.layers.InputLayer)


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
                layer=operation, inputs=list(node.input_tensors), outputs=list(node.outputs)
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
