"""Partition an existing Keras model at a cut.

A *cut* is a set of layers whose outputs, together, separate the model's inputs
from its outputs: everything the layers after the cut need is either one of the
cut tensors or computed after the cut. The client half computes the cut tensors
from the inputs; the server half computes the outputs from the cut tensors.
Both halves are built with the public functional API and share the original
layer objects, so their weights are the original model's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

from keras_split.graph import Call, Graph, is_graph_model, read_graph, tensor_key
from keras_split_wire.tensors import CutSpec


@dataclass(frozen=True)
class CutCandidate:
    """A layer at which a single cut separates the model.

    Attributes:
        layer: the layer's name (pass it as `cut=`).
        bytes_per_sample: bytes the client sends per sample at this cut.
        client_params: parameters (trainable and not) the client holds.
        client_flops_fraction: the client's share of the forward FLOPs.
    """

    layer: str
    bytes_per_sample: int | None
    client_params: int
    client_flops_fraction: float


def spec_of(name: str, tensor) -> CutSpec:
    """The `CutSpec` of a Keras tensor."""
    return CutSpec.of(name, keras.backend.standardize_dtype(tensor.dtype), tuple(tensor.shape))


def check_graph_model(model) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"Expected a keras.Model (functional or Sequential), received an object of "
            f"type {type(model).__name__}."
        )
    if isinstance(model, keras.Sequential) and not model.built:
        raise ValueError(
            f"The Sequential model '{model.name}' has no input shape yet, so its layer graph "
            "does not exist. Start it with keras.Input(shape=...) or call model.build(...) "
            "before splitting it."
        )
    if not is_graph_model(model):
        raise TypeError(
            f"Cannot split '{model.name}' (a subclassed model of type "
            f"{type(model).__name__}): its layer graph is Python code that Keras does not "
            "record. Split a functional or Sequential model instead, or write the two halves "
            "yourself and pass them as keras_split.SplitModel(client=..., server=...)."
        )


def _layer_names(model) -> str:
    return ", ".join(repr(layer.name) for layer in model.layers)


def _resolve_cut(model, graph: Graph, cut) -> list[Call]:
    if isinstance(cut, str):
        names = [cut]
    elif isinstance(cut, Sequence) and cut and all(isinstance(n, str) for n in cut):
        names = list(cut)
    else:
        raise TypeError(
            "`cut` must be a layer name or a non-empty list of layer names, received "
            f"{cut!r}. Existing layers are: [{_layer_names(model)}]."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"`cut` names a layer more than once: {names}.")
    output_keys = {tensor_key(t) for t in graph.outputs}
    calls = []
    for name in names:
        layer = next((lay for lay in model.layers if lay.name == name), None)
        if layer is None:
            raise ValueError(
                f"No such layer: {name!r}. Existing layers are: [{_layer_names(model)}]."
            )
        if isinstance(layer, keras.layers.InputLayer):
            raise ValueError(
                f"Cannot cut at {name!r}: it is an input layer, so the client would send the "
                "raw inputs to the server. Cut after a layer that transforms them, e.g. "
                f"{_first_candidate_hint(model, graph)}."
            )
        layer_calls = graph.calls_of(layer)
        if len(layer_calls) != 1:
            raise ValueError(
                f"Cannot cut at {name!r}: the layer is called {len(layer_calls)} times in "
                "the model (a shared layer), so its output is ambiguous. Cut at a layer that "
                "is called once."
            )
        call = layer_calls[0]
        if any(tensor_key(t) in output_keys for t in call.outputs):
            raise ValueError(
                f"Cannot cut at {name!r}: it is an output layer, and every model output must "
                "be computed by the server half. Cut at an earlier layer."
            )
        calls.append(call)
    return calls


def _first_candidate_hint(model, graph: Graph) -> str:
    for call in graph.calls:
        if not call.is_input and _problem(graph, [call], suggest=False) is None:
            return f"cut={call.name!r}"
    return "a layer after the inputs"


def _cut_tensors(calls: list[Call]) -> list:
    return [t for call in calls for t in call.outputs]


def _sides(graph: Graph, cut_calls: list[Call]) -> tuple[set[int], list[Call]]:
    client = graph.ancestors(_cut_tensors(cut_calls))
    server = [c for c in graph.calls if id(c) not in client]
    return client, server


def _problem(graph: Graph, cut_calls: list[Call], suggest: bool = True) -> str | None:
    """Why `cut_calls` is not a valid cut, or None when it is.

    With `suggest`, a skip connection's message names the next valid cut
    downstream; that search asks this function again with `suggest=False`, so
    the two never call each other forever (parallel branches, as in a ResNet
    block with a projection shortcut, each bypass the other)."""
    client, server = _sides(graph, cut_calls)
    cut_keys = {tensor_key(t) for t in _cut_tensors(cut_calls)}
    names = [c.name for c in cut_calls]
    shown = repr(names[0]) if len(names) == 1 else repr(names)

    for out in graph.outputs:
        producer = graph.producer[tensor_key(out)]
        if id(producer) in client:
            return (
                f"Cut at {shown} leaves the model output of layer {producer.name!r} on the "
                "client side. Every output must be computed after the cut; cut at layers "
                "that come before it."
            )
    for call in server:
        if call.is_input:
            readers = graph.consumers.get(tensor_key(call.outputs[0]), [])
            reader = readers[0].name if readers else "no layer"
            return (
                f"Cut at {shown} does not separate the graph: model input {call.name!r} does "
                f"not reach the cut, and layer {reader!r} (after the cut) reads it directly. "
                f"Add a layer of that input's branch to the cut, e.g. cut={names + [reader]!r}, "
                "so the server never sees raw inputs."
            )
    server_ids = {id(c) for c in server}
    crossing = []  # (tensor, producer, reader) for every client tensor read after the cut
    for call in server:
        for t in call.inputs:
            producer = graph.producer[tensor_key(t)]
            if id(producer) in client and tensor_key(t) not in cut_keys:
                crossing.append((t, producer, call))
    raw = [(p, r) for _, p, r in crossing if p.is_input]
    if raw:
        producer, reader = raw[0]
        return (
            f"Cut at {shown} does not separate the graph: layer {reader.name!r} (after the "
            f"cut) reads the model input {producer.name!r} directly, so the server would "
            "receive raw inputs. Every path from the inputs to the outputs must pass through "
            f"the cut: add a layer on the path from {producer.name!r} to {reader.name!r}."
        )
    if crossing:
        _, producer, reader = crossing[0]
        needed = list(dict.fromkeys(names + [p.name for _, p, _ in crossing]))
        later = _next_single_cut(graph, cut_calls, server) if suggest else None
        fix = f"Cut after {later!r} instead, or pass" if later else "Pass"
        return (
            f"Cut at {shown} does not separate the graph: layer {reader.name!r} (after the "
            f"cut) also reads {producer.name!r} (before the cut) through a skip connection. "
            f"{fix} cut={needed!r} to send all of these tensors."
        )
    for call in cut_calls:
        readers = [
            c
            for t in call.outputs
            for c in graph.consumers.get(tensor_key(t), [])
            if id(c) in server_ids
        ]
        if not readers:
            return (
                f"Cut at {shown} is not minimal: no layer after the cut reads the output of "
                f"{call.name!r}, which only feeds other client layers. Remove {call.name!r} "
                "from the cut."
            )
    return None


def _next_single_cut(graph: Graph, cut_calls, server) -> str | None:
    """The first single-layer cut downstream of the given one, if any."""
    downstream = graph.descendants(_cut_tensors(cut_calls))
    outputs = _output_keys(graph)
    for call in server:
        if (call.is_input or id(call) not in downstream
                or any(tensor_key(t) in outputs for t in call.outputs)):
            continue
        if _problem(graph, [call], suggest=False) is None:
            return call.name
    return None


def _output_keys(graph: Graph) -> set:
    return {tensor_key(t) for t in graph.outputs}


def analyse_cut(model, cut):
    """Validate `cut` on `model`; return (graph, cut calls, cut tensors, specs)."""
    check_graph_model(model)
    graph = read_graph(model)
    cut_calls = _resolve_cut(model, graph, cut)
    problem = _problem(graph, cut_calls)
    if problem is not None:
        raise ValueError(problem)
    client, server = _sides(graph, cut_calls)
    shared = {id(c.layer) for c in server} & {id(c.layer) for c in graph.calls if id(c) in client}
    if shared:
        layer = next(c.layer for c in server if id(c.layer) in shared)
        raise ValueError(
            f"Layer {layer.name!r} is called on both sides of the cut, so client and server "
            "would both own its weights. Move the cut so every call of a shared layer falls "
            "on one side."
        )
    tensors, specs = [], []
    for call in cut_calls:
        for i, t in enumerate(call.outputs):
            name = call.name if len(call.outputs) == 1 else f"{call.name}:{i}"
            tensors.append(t)
            specs.append(spec_of(name, t))
    return graph, tensors, specs


def io_structure(model) -> tuple:
    """The model's symbolic inputs and outputs in the user's structure."""
    if isinstance(model, keras.Sequential):
        # A Sequential model has exactly one input and one output.
        return model.inputs[0], model.outputs[0]
    return model.input, model.output


def build_halves(model, cut):
    """Return (client, server, cut_specs) for a validated cut."""
    _, tensors, specs = analyse_cut(model, cut)
    single = len(tensors) == 1
    # `model.input` / `model.output` keep the user's structure (a tensor, a
    # list or a dict), so data and losses shaped for the model fit the halves.
    inputs, outputs = io_structure(model)
    client = keras.Model(inputs, tensors[0] if single else tensors, name=f"{model.name}_client")
    server = keras.Model(tensors[0] if single else tensors, outputs, name=f"{model.name}_server")
    # Keras names the new inputs after the cut tensors ("keras_tensor_3CLONE");
    # the cut layer's name is what a user reads in summaries and errors.
    input_layers = [t._keras_history.operation for t in server.inputs]
    for layer, spec in zip(input_layers, specs, strict=True):
        layer.name = spec.name.replace(":", "_")
    return client, server, specs


def _count_params(layers) -> int:
    return int(sum(np.prod(w.shape) for layer in layers for w in layer.weights))


def cut_candidates(model) -> list[CutCandidate]:
    """List every layer at which a single cut separates inputs from outputs.

    Use it to choose a cut: a phone wants few client parameters and FLOPs, the
    network wants few bytes per sample. Candidates come in graph order.

    Args:
        model: a functional or Sequential `keras.Model`.

    Returns:
        A list of `CutCandidate`.

    Example:

    ```python
    for c in keras_split.cut_candidates(model):
        print(c.layer, c.bytes_per_sample, c.client_params, f"{c.client_flops_fraction:.0%}")
    ```
    """
    from keras_split.flops import call_flops

    check_graph_model(model)
    graph = read_graph(model)
    flops = {id(c): call_flops(c) for c in graph.calls}
    total = sum(flops.values()) or 1
    out_keys = _output_keys(graph)
    result = []
    for call in graph.calls:
        if call.is_input or any(tensor_key(t) in out_keys for t in call.outputs):
            continue
        if (len(graph.calls_of(call.layer)) != 1
                or _problem(graph, [call], suggest=False) is not None):
            continue
        client, _ = _sides(graph, [call])
        client_calls = [c for c in graph.calls if id(c) in client]
        layers = list({id(c.layer): c.layer for c in client_calls}.values())
        per_sample = [spec_of(call.name, t).bytes_per_sample for t in call.outputs]
        result.append(
            CutCandidate(
                layer=call.name,
                bytes_per_sample=None if None in per_sample else sum(per_sample),
                client_params=_count_params(layers),
                client_flops_fraction=sum(flops[id(c)] for c in client_calls) / total,
            )
        )
    return result
