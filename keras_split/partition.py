"""Partition an existing Keras model at a cut.

A *cut* is a set of layers whose outputs, together, separate the model's inputs
from its outputs: everything the layers after the cut need is either one of the
cut tensors or computed after the cut. The client half computes the cut tensors
from the inputs; the server half computes the outputs from the cut tensors.
Both halves are built with the public functional API and share the original
layer objects, so their weights are the original model's weights.

A cut must also not hand the server the raw inputs: an input layer is no cut,
and neither is a layer whose client half has no trainable weights (Rescaling,
ZeroPadding2D or Normalization right after the input only rescale, pad or
normalize the data the server would then read).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace

import keras
import numpy as np

from keras_split.graph import Call, Graph, is_graph_model, operations, read_graph, tensor_key
from keras_split_wire.tensors import CutSpec


@dataclass(frozen=True)
class CutCandidate:
    """A layer at which a single cut separates the model: one row of the cut table.

    Attributes:
        layer: the layer's name (pass it as `cut=`). A row that stands for several
            cuts (see `layers`) names the first of them, the layer that makes
            the tensor; the others only follow up on it.
        bytes_per_sample: bytes the client sends per sample at this cut (None
            when a dimension other than the batch is unknown).
        client_params: parameters (trainable and not) the client holds.
        client_flops_fraction: the client's share of the forward FLOPs.
        client_flops: forward FLOPs per sample of the client half.
        total_flops: forward FLOPs per sample of the whole model.
        layers: the consecutive cuts this row stands for, in graph order, when
            `cut_candidates` collapsed cuts that send the same number of bytes
            (Conv→BatchNorm→ReLU); `(layer,)` otherwise. Each is a valid cut; the
            row's numbers are those of the first.
        refused: None for a cut `split()` accepts; otherwise why it refuses it
            (listed only with `cut_candidates(model, include_raw=True)`).
        exportable: whether the client half can be exported for training on a
            device (`keras_split.export.export_client`); None when the table
            was made without the export's check (`keras_split.partition.
            cut_candidates` without `device_check`).
        export_blocker: when `exportable` is False, the first layer of the
            client half (in graph order) the export has no rule for.
    """

    # Fields come in the order they were added; new ones (such as whether the
    # client half exports to a device) go last, with a default, so rows built
    # by keyword and code reading the older fields keep working.
    layer: str
    bytes_per_sample: int | None
    client_params: int
    client_flops_fraction: float
    client_flops: int = 0
    total_flops: int = 0
    layers: tuple[str, ...] = ()
    refused: str | None = None
    exportable: bool | None = None
    export_blocker: str | None = None

    def __post_init__(self):
        if not self.layers:
            object.__setattr__(self, "layers", (self.layer,))


class CutTable(list):
    """The rows of `cut_candidates`: a list of `CutCandidate` that prints as a table.

    `repr()` is one short line however large the model; `summary()` (or
    `print(table)`) shows every row with its bytes, parameters and FLOPs.

    Args:
        rows: the `CutCandidate`s, in graph order.
        model_name: the name of the model they cut.
        cuts: how many cuts the rows stand for (more than the rows when
            `cut_candidates` collapsed some); by default one per row.
        total_flops: forward FLOPs per sample of the whole model; by default
            the rows' `total_flops`.

    Example:

    ```python
    table = keras_split.cut_candidates(keras.applications.ResNet50(weights=None))
    table            # CutTable('resnet50': 20 rows for 38 cuts [conv1_conv, pool1_pad, ...])
    table.summary()  # one line per row: bytes, client parameters and FLOPs, share
    ```
    """

    def __init__(self, rows=(), *, model_name: str = "", cuts: int | None = None,
                 total_flops: int | None = None):
        super().__init__(rows)
        self.model_name = model_name  # the model the table describes
        self.cuts = len(self) if cuts is None else cuts  # how many cuts, before collapsing
        if total_flops is None:
            total_flops = self[0].total_flops if self else 0
        self.total_flops = total_flops  # forward FLOPs per sample of the whole model

    def __repr__(self):
        names = [row.layer for row in self]
        if len(names) > 6:
            names = names[:3] + ["…"] + names[-2:]
        collapsed = f" for {self.cuts} cuts" if self.cuts != len(self) else ""
        return (
            f"CutTable({self.model_name!r}: {len(self)} rows{collapsed} "
            f"[{', '.join(names)}]; .summary() prints them)"
        )

    def __str__(self):
        return "\n".join(self._lines())

    def summary(self, print_fn=None) -> None:
        """Print the table, one line per row (`print_fn` as in `keras.Model.summary`)."""
        print_fn = print_fn or print
        for line in self._lines():
            print_fn(line)

    def _lines(self) -> list[str]:
        title = f"Cut candidates of {self.model_name!r}" if self.model_name else "Cut candidates"
        lines = [f"{title}: {self.cuts} cuts in {len(self)} rows"
                 + ("" if self.cuts == len(self) else
                    "; a layer and the kernel-less layers after it that send the same bytes "
                    "share a row (collapse=False lists each)"),
                 f"Forward FLOPs per sample: {_human(self.total_flops)}"]
        header = ["Cut", "Bytes/sample", "Client params", "Client FLOPs", "Share"]
        device = any(row.exportable is not None for row in self)
        if device:
            header.append("Device")
        rows = [
            [
                _shorten(row.layer if len(row.layers) == 1
                         else f"{row.layers[0]} … {row.layers[-1]} ({len(row.layers)} cuts)"),
                "unknown" if row.bytes_per_sample is None else f"{row.bytes_per_sample:,}",
                f"{row.client_params:,}",
                _human(row.client_flops),
                f"{row.client_flops_fraction:.1%}",
            ]
            + ([_device_cell(row)] if device else [])
            + ([f"refused: {row.refused}"] if row.refused else [])
            for row in self
        ]
        columns = len(header)
        widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(columns)]
        rule = "─" * (sum(widths) + 2 * (columns - 1))

        def line(cells):
            text = cells[0].ljust(widths[0]) + "".join(
                "  " + cell.rjust(width)
                for cell, width in zip(cells[1:5], widths[1:5], strict=True)
            )
            if device:
                text += "  " + cells[5].ljust(widths[5])
            return (text + "".join("  " + extra for extra in cells[columns:])).rstrip()

        return lines + [rule, line(header), rule] + [line(r) for r in rows] + [rule]


def _device_cell(row: CutCandidate) -> str:
    if row.exportable is None:
        return "?"
    return "yes" if row.exportable else f"no: {_shorten(row.export_blocker or '?', 30)}"


def _human(flops: int) -> str:
    for size, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if flops >= size:
            return f"{flops / size:.2f}{unit}"
    return str(flops)


def _shorten(text: str, width: int = 60) -> str:
    if len(text) <= width:
        return text
    half = (width - 1) // 2
    return text[:half] + "…" + text[-(width - 1 - half):]


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
    # Keras operations (`keras.ops.*` nodes) are cut at by name like layers.
    candidates = operations(model)
    for name in names:
        layer = next((lay for lay in candidates if lay.name == name), None)
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
    first = _first_cut(graph)
    return f"cut={first!r}" if first else "a layer after the inputs"


def _first_cut(graph: Graph, raw: set[int] | None = None) -> str | None:
    """The first single-layer cut `split()` accepts, in graph order."""
    raw = _raw_calls(graph) if raw is None else raw
    outputs = _output_keys(graph)
    for call in graph.calls:
        if (call.is_input or id(call) in raw
                or any(tensor_key(t) in outputs for t in call.outputs)
                or len(graph.calls_of(call.layer)) != 1):
            continue
        if _problem(graph, [call], suggest=False) is None:
            return call.name
    return None


# Inputs of the server halves built here: a model cut again (the later hops of
# a chain) starts from activations, not from raw inputs.
_CUT_INPUTS: weakref.WeakSet = weakref.WeakSet()


def _trains(call: Call) -> bool:
    """Whether the call's layer has trainable weights, frozen ones included."""
    if not call.is_layer:
        return False  # A Keras operation (keras.ops.*) has no weights.
    if any(w.trainable for w in call.layer.weights):
        return True
    # Freezing a layer (`layer.trainable = False`) marks its weights
    # non-trainable, yet a frozen convolution still transforms the data, unlike
    # the statistics of Normalization, which never train. Keras keeps the
    # weights created trainable in each (sub)layer's `_trainable_variables`,
    # frozen or not.
    flatten = getattr(call.layer, "_flatten_layers", None)
    sublayers = flatten() if flatten else [call.layer]
    return any(getattr(layer, "_trainable_variables", None) for layer in sublayers)


def _raw_calls(graph: Graph) -> set[int]:
    """ids of the calls computed from raw model inputs without any trainable weights."""
    raw: set[int] = set()
    for call in graph.calls:
        if call.is_input:
            if call.layer not in _CUT_INPUTS:
                raw.add(id(call))
        elif call.parents and not _trains(call) and all(id(p) in raw for p in call.parents):
            raw.add(id(call))
    return raw


def _raw_problem(graph: Graph, cut_calls: list[Call], raw: set[int]) -> str | None:
    """Why `cut_calls` would send raw inputs, or None when they would not."""
    call = next((c for c in cut_calls if id(c) in raw), None)
    if call is None:
        return None
    names = [c.name for c in cut_calls]
    shown = repr(names[0]) if len(names) == 1 else repr(names)
    ancestors = graph.ancestors(call.outputs)
    path = [c.name for c in graph.calls if id(c) in ancestors]
    if len(path) > 6:
        path = path[:3] + ["…"] + path[-2:]
    first = _first_cut(graph, raw)
    fix = (f"Cut after a layer with trainable weights, e.g. cut={first!r}, the first cut "
           "whose client half has some" if first and len(names) == 1 else
           "Add a layer with trainable weights (a convolution, a Dense layer) before "
           f"{call.name!r}, or cut after one")
    return (
        f"Cut at {shown} would send raw inputs: the client half up to {call.name!r} "
        f"({' → '.join(path)}) has no trainable weights, so the server would receive the "
        f"model inputs merely rescaled, padded or normalized. {fix}."
    )


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
        if id(reader) in graph.descendants(_cut_tensors(cut_calls)):
            bypass = (f"layer {reader.name!r} (after the cut) also reads {producer.name!r} "
                      "(before the cut) through a skip connection")
        else:
            # Inception-style blocks and projection shortcuts: a sibling of the
            # cut layer reads the block's input, so its branch skips the cut.
            bypass = (f"layer {reader.name!r}, on a branch parallel to the cut, reads "
                      f"{producer.name!r} (before the cut), so its branch bypasses the cut")
        return (
            f"Cut at {shown} does not separate the graph: {bypass}. "
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
                or any(tensor_key(t) in outputs for t in call.outputs)
                or len(graph.calls_of(call.layer)) != 1):
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
    problem = _problem(graph, cut_calls) or _raw_problem(graph, cut_calls, _raw_calls(graph))
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
        _CUT_INPUTS.add(layer)
    return client, server, specs


def _count_params(calls) -> int:
    weights = {id(w): w for call in calls for w in call.weights}
    return int(sum(np.prod(w.shape) for w in weights.values()))


def cut_candidates(model, *, collapse: bool = True, include_raw: bool = False,
                   device_check=None) -> CutTable:
    """List the layers at which a single cut separates inputs from outputs.

    The core's cut table. Users call `keras_split.cut_candidates`
    (`keras_split.planning.cut_candidates`), which adds the export layer's
    device column and documents the rows and options; this function takes
    that column's check as a hook, since the core knows no export rules.

    Args:
        model: a functional or Sequential `keras.Model`.
        collapse, include_raw: as for `keras_split.cut_candidates`.
        device_check: a callable taking one `keras_split.graph.Call` and
            returning True when a device export cannot express it. With it,
            each row says whether its client half exports (`exportable`,
            `export_blocker`); without it those are None and the table
            prints no device column.

    Returns:
        A `CutTable`: a list of `CutCandidate`; `summary()` prints it.
    """
    from keras_split.flops import call_flops

    if not isinstance(collapse, bool) or not isinstance(include_raw, bool):
        raise TypeError(
            f"`collapse` and `include_raw` must be True or False, received "
            f"collapse={collapse!r}, include_raw={include_raw!r}."
        )
    check_graph_model(model)
    graph = read_graph(model)
    raw = _raw_calls(graph)
    flops = {id(c): call_flops(c) for c in graph.calls}
    total = sum(flops.values())
    out_keys = _output_keys(graph)
    blocks: dict[int, bool] = {}

    def blocker(client_calls) -> str | None:
        for c in client_calls:
            if id(c) not in blocks:
                blocks[id(c)] = bool(device_check(c))
            if blocks[id(c)]:
                return c.name
        return None

    rows: list[tuple[CutCandidate, Call]] = []
    for call in graph.calls:
        if call.is_input or any(tensor_key(t) in out_keys for t in call.outputs):
            continue
        if (len(graph.calls_of(call.layer)) != 1
                or _problem(graph, [call], suggest=False) is not None):
            continue
        if id(call) in raw and not include_raw:
            continue
        client, _ = _sides(graph, [call])
        client_calls = [c for c in graph.calls if id(c) in client]
        per_sample = [spec_of(call.name, t).bytes_per_sample for t in call.outputs]
        client_flops = sum(flops[id(c)] for c in client_calls)
        stop = blocker(client_calls) if device_check is not None else None
        row = CutCandidate(
            layer=call.name,
            bytes_per_sample=None if None in per_sample else sum(per_sample),
            client_params=_count_params(client_calls),
            client_flops_fraction=client_flops / total if total else 0.0,
            client_flops=client_flops,
            total_flops=total,
            refused=("sends raw inputs: the client half has no trainable weights"
                     if id(call) in raw else None),
            exportable=None if device_check is None else stop is None,
            export_blocker=stop,
        )
        rows.append((row, call))
    table = [row for row, _ in rows]
    if collapse:
        table = _collapse(rows)
    return CutTable(table, model_name=model.name, cuts=len(rows), total_flops=total)


def _collapse(rows: list[tuple[CutCandidate, Call]]) -> list[CutCandidate]:
    """Merge each run of cuts that only follow up on the run's first layer.

    A cut joins the previous row when it sends the same bytes, its layer reads
    nothing but the previous cut's output, and it has no kernel (weights of
    more than one dimension): BatchNormalization, activations, Dropout,
    Flatten; and when the table has a device column, only when its client
    half exports (or is stopped by the same layer) as the row's first. A
    layer with a kernel (a convolution, even one that keeps the shape, as
    VGG's second convolution of a block) starts a row of its own."""
    groups: list[list[tuple[CutCandidate, Call]]] = []
    for row, call in rows:
        if groups:
            last, last_call = groups[-1][-1]
            sent = {tensor_key(t) for t in last_call.outputs}
            if (row.bytes_per_sample is not None
                    and row.bytes_per_sample == last.bytes_per_sample
                    and row.refused == last.refused
                    and row.export_blocker == last.export_blocker
                    and all(len(w.shape) <= 1 for w in call.weights)
                    and all(tensor_key(t) in sent for t in call.inputs)):
                groups[-1].append((row, call))
                continue
        groups.append([(row, call)])
    # The first cut names the row: it makes the tensor that the others only
    # normalize, activate or reshape, and the names users know (`pool2` rather
    # than the `flatten` after it) are these.
    return [replace(group[0][0], layers=tuple(r.layer for r, _ in group)) for group in groups]
