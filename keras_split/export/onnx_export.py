"""ONNX export of a client half as stateless graphs, for plain onnxruntime.

onnxruntime without its training build cannot keep variables, so every graph
takes the device's state as inputs and returns the new state as outputs:

- `<stem>.onnx` (`infer`): inputs, `p000...` (parameters), `b000...`
  (BatchNorm moving statistics) -> `cut_i`, in inference mode.
- `<stem>.forward.onnx`: the same in training mode (what the device sends).
- `<stem>.train.onnx`: inputs, `grad_i`, `p...`, `b...`, `o000...`
  (optimizer slots), `step` -> `new_p...`, `new_b...`, `new_o...`, `new_step`.
- `<stem>.state.npz`: the initial values of all of them, and the order of the
  model's weights (`weight_order`: index into p/b), read without pickle.

The gradients are the forward-op rules of `ops`, so no TensorFlow gradient
kernel (which ONNX lacks) appears in the graph. Each graph is written in a
canonical form (`canonical`), so exporting the same client twice gives the
same bytes.
"""

from __future__ import annotations

import hashlib
import heapq
import os

import numpy as np
import tensorflow as tf

from keras_split.export import ops
from keras_split.export.device import input_names
from keras_split.export.optimizers import initial_slots
from keras_split.export.tflite import ExportError
from keras_split_wire import device_names
from keras_split_wire.optional import require

OPSET = 17


def _specs(program, update):
    names = input_names(program)
    x = [tf.TensorSpec([None, *t.shape[1:]], t.dtype, name=n)
         for t, n in zip(program.inputs, names, strict=True)]
    grads = [tf.TensorSpec([None, *t.shape[1:]], tf.float32, name=device_names.cut_gradient(i))
             for i, t in enumerate(program.outputs)]
    params = [tf.TensorSpec(v.shape, tf.float32, name=device_names.onnx_parameter(0, i))
              for i, v in enumerate(program.trainable)]
    state = [tf.TensorSpec(v.shape, tf.float32, name=device_names.onnx_parameter(1, i))
             for i, v in enumerate(program.state)]
    slots = [tf.TensorSpec(s.shape, tf.float32, name=device_names.onnx_slot(i))
             for i, s in enumerate(initial_slots(update, program.trainable))]
    step = tf.TensorSpec([], tf.float32, name=device_names.STEP)
    return x, grads, params, state, slots, step


def functions(program, update, extra_gradients=None):
    """The three graphs as tf.functions over explicit tensors (`extra_gradients`:
    as in `DeviceModule`, NoPeek's term added to the cut gradients in `train`)."""
    x, grads, params, state, slots, step = _specs(program, update)
    nx, ng, np_, ns = len(x), len(grads), len(params), len(state)

    def split(arguments, *sizes):
        parts, start = [], 0
        for size in sizes:
            parts.append(list(arguments[start:start + size]))
            start += size
        parts.append(list(arguments[start:]))
        return parts

    def cuts(outputs):
        names = [device_names.cut(i) for i in range(len(outputs))]
        return {n: tf.identity(t, name=n) for n, t in zip(names, outputs, strict=True)}

    # Every graph is traced with the ops written for onnxruntime (ops.runtime).
    def infer(*arguments):
        inputs, p, b, _ = split(arguments, nx, np_, ns)
        with ops.runtime("onnx"):
            return cuts(program.run(p, b, inputs, training=False)[0])

    def forward(*arguments):
        inputs, p, b, _ = split(arguments, nx, np_, ns)
        with ops.runtime("onnx"):
            return cuts(program.run(p, b, inputs, training=True)[0])

    def train(*arguments):
        inputs, g, p, b, rest = split(arguments, nx, ng, np_, ns)
        o, (s,) = rest[:-1], rest[-1:]
        with ops.runtime("onnx"):
            with tf.GradientTape() as tape:
                tape.watch(p)
                outputs, new_b = program.run(p, b, inputs, training=True)
            extra = None if extra_gradients is None else extra_gradients(inputs, outputs)
            if extra is not None:
                g = [a + e for a, e in zip(g, extra, strict=True)]
            gradients = tape.gradient(outputs, p, output_gradients=g)
        new_p, new_o = update.apply(p, gradients, o, s)
        new = device_names.new
        result = {new(device_names.onnx_parameter(0, i)): tf.identity(v)
                  for i, v in enumerate(new_p)}
        result.update({new(device_names.onnx_parameter(1, i)): tf.identity(v)
                       for i, v in enumerate(new_b)})
        result.update({new(device_names.onnx_slot(i)): tf.identity(v)
                       for i, v in enumerate(new_o)})
        result[new(device_names.STEP)] = s + 1.0
        return result

    return {
        device_names.INFER: (tf.function(infer, autograph=False), x + params + state),
        device_names.FORWARD: (tf.function(forward, autograph=False), x + params + state),
        device_names.TRAIN: (tf.function(train, autograph=False),
                             x + grads + params + state + slots + [step]),
    }


def require_converter():
    """onnx and tf2onnx, which check and write the graphs (onnx first: tf2onnx needs it)."""
    onnx = require("onnx", "ONNX export", "keras-split[export]")
    return onnx, require("tf2onnx", "ONNX export", "keras-split[export]")


def _convert(function, signature, path, name):
    onnx, tf2onnx = require_converter()
    try:
        model, _ = tf2onnx.convert.from_function(function, input_signature=signature,
                                                 opset=OPSET)
    except Exception as error:  # tf2onnx raises several unrelated types
        raise ExportError(f"tf2onnx could not convert the client half: {error}") from None
    model = canonical(model, name)
    onnx.checker.check_model(model)
    with open(path, "wb") as file:
        file.write(model.SerializeToString(deterministic=True))
    return model


def _digest(*parts) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        hasher.update(len(data).to_bytes(8, "little") + data)
    return hasher.hexdigest()


def _unname_tensors(node):
    """Clear the names of the tensors in `node`'s attributes (tf2onnx's, numbered)."""
    for attribute in node.attribute:
        if attribute.HasField("t"):
            attribute.t.name = ""
        for tensor in attribute.tensors:
            tensor.name = ""


def canonical(model, name: str):
    """`model` with its graph in a canonical form: the same bytes for the same
    function and weights, whatever the process or what it converted before.

    tf2onnx's graphs compute the same thing run to run, but the bytes vary: its
    generated names carry a process-wide counter (`const_starts__569`), the
    graph's doc string names TensorFlow's numbered function
    (`__inference_infer_8228`), and which of two equal constants survives
    deduplication, and the order of independent nodes, follow Python's string
    hashing, which is seeded per process. So every node and value is given a
    digest of what it computes (its operator, its attributes and its inputs'
    digests; an initializer's digest is that of its dtype, shape and values; a
    graph input's, that of its name), the nodes are ordered topologically,
    ties broken by digest, and the values are renamed in that order (`c0...`
    for initializers, `v0...` for node outputs, `n0_<op>...` for nodes), as are
    the symbolic dimensions (tf2onnx's `unk__131`, also counted process-wide,
    become `d0...`). The graph's inputs and outputs keep their names, and
    nothing that changes what the graph computes is touched.
    """
    onnx = require_converter()[0]
    from onnx import numpy_helper

    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for a in node.attribute):
        raise ExportError("The ONNX graph has subgraphs (If/Loop), which the export's "
                          "canonical form does not handle.")
    interface = dict.fromkeys([v.name for v in graph.input] + [v.name for v in graph.output])
    digest = {v.name: _digest("input", v.name) for v in graph.input}
    for tensor in graph.initializer:
        if tensor.name not in interface:
            array = numpy_helper.to_array(tensor)
            digest[tensor.name] = _digest("initializer", array.dtype.str, array.shape,
                                          array.tobytes())
    keys = []
    for node in graph.node:  # ONNX nodes are stored in a topological order
        body = onnx.NodeProto()
        body.CopyFrom(node)
        del body.input[:], body.output[:]
        body.name, body.doc_string = "", ""
        _unname_tensors(body)
        key = _digest("node", body.SerializeToString(deterministic=True),
                      *[digest[i] if i else "" for i in node.input])
        for k, output in enumerate(node.output):
            if output:
                digest[output] = _digest(key, k)
        keys.append(key)

    # Topological order, the ready node with the smallest digest first.
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    waiting = [len({producer[i] for i in node.input if i in producer}) for node in graph.node]
    consumers: dict[int, set[int]] = {}
    for i, node in enumerate(graph.node):
        for source in {producer[v] for v in node.input if v in producer}:
            consumers.setdefault(source, set()).add(i)
    ready = [(keys[i], i) for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for j in sorted(consumers.get(i, ())):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, (keys[j], j))

    nodes = [graph.node[i] for i in order]
    renamed = {n: n for n in interface}  # inputs, then outputs
    initializers = {t.name: t for t in graph.initializer}
    for node in nodes:
        for value in node.input:
            if value in initializers and value not in renamed:
                renamed[value] = f"c{len(renamed) - len(interface)}"
    for value in sorted(set(initializers) - set(renamed), key=digest.__getitem__):
        renamed[value] = f"c{len(renamed) - len(interface)}"  # unused ones, last
    count = 0
    for node in nodes:
        for value in node.output:
            if value and value not in renamed:
                renamed[value] = f"v{count}"
                count += 1
    new = onnx.GraphProto()
    new.CopyFrom(graph)
    del new.node[:], new.initializer[:], new.value_info[:]
    for index, node in enumerate(nodes):
        copy = new.node.add()
        copy.CopyFrom(node)
        copy.name, copy.doc_string = f"n{index}_{node.op_type}", ""
        copy.input[:] = [renamed[v] if v else "" for v in node.input]
        copy.output[:] = [renamed[v] if v else "" for v in node.output]
        _unname_tensors(copy)
    position = {n: i for i, n in enumerate(renamed)}
    for tensor in sorted(graph.initializer, key=lambda t: position[t.name]):
        copy = new.initializer.add()
        copy.CopyFrom(tensor)
        copy.name = renamed[tensor.name]
    for info in sorted((v for v in graph.value_info if v.name in renamed),
                       key=lambda v: position[v.name]):
        copy = new.value_info.add()
        copy.CopyFrom(info)
        copy.name = renamed[info.name]
    # Symbolic dimensions (tf2onnx's `unk__131`, numbered process-wide) as
    # `d0...`, in order of appearance: equal names stay equal, distinct ones distinct.
    dimensions: dict[str, str] = {}
    for info in [*new.input, *new.output, *new.value_info]:
        for dimension in info.type.tensor_type.shape.dim:
            if dimension.HasField("dim_param"):
                dimension.dim_param = dimensions.setdefault(dimension.dim_param,
                                                            f"d{len(dimensions)}")
    new.name, new.doc_string = name, f"keras-split client half: {name}"
    result = onnx.ModelProto()
    result.CopyFrom(model)
    result.graph.CopyFrom(new)
    return result


def initial_state(program, update) -> dict[str, np.ndarray]:
    arrays = {device_names.onnx_parameter(0, i): np.asarray(v.numpy(), np.float32)
              for i, v in enumerate(program.trainable)}
    arrays.update({device_names.onnx_parameter(1, i): np.asarray(v.numpy(), np.float32)
                   for i, v in enumerate(program.state)})
    arrays.update({device_names.onnx_slot(i): s
                   for i, s in enumerate(initial_slots(update, program.trainable))})
    arrays[device_names.STEP] = np.zeros((), np.float32)
    # Where each of model.get_weights() lives: [0, i] = p[i], [1, i] = b[i].
    index = {id(v): (0, i) for i, v in enumerate(program.trainable)}
    index.update({id(v): (1, i) for i, v in enumerate(program.state)})
    arrays[device_names.WEIGHT_ORDER] = np.array([index[id(v)] for v in program.weights],
                                                 np.int64)
    return arrays


def paths(path):
    """The files of an export whose inference graph is `path` (`*.onnx`)."""
    return device_names.onnx_files(str(path)[: -len(".onnx")])


def require_runtime():
    """onnxruntime, which checks every export (the runtime a device uses)."""
    return require("onnxruntime", "ONNX export", "keras-split[export]")


def session(path):
    return require_runtime().InferenceSession(str(path), providers=["CPUExecutionProvider"])


def device_step(program, targets, state, start=None):
    """One step of the `train` graph in onnxruntime, from the initial state, as
    a function `(x, grads) -> weights after` (`start`: see `tflite.device_step`)."""
    names = input_names(program)
    train = session(targets[device_names.TRAIN])
    wanted = {i.name for i in train.get_inputs()}

    def step(x, grads):
        feed = {**dict(zip(names, x, strict=True)),
                **{device_names.cut_gradient(i): g for i, g in enumerate(grads)},
                **{k: v for k, v in state.items() if k != device_names.WEIGHT_ORDER}}
        if start is not None:
            feed.update({device_names.onnx_slot(i): s for i, s in enumerate(start[0])})
            feed[device_names.STEP] = np.asarray(start[1], np.float32)
        outputs = dict(zip([o.name for o in train.get_outputs()],
                           train.run(None, {k: v for k, v in feed.items() if k in wanted}),
                           strict=True))
        return [outputs[device_names.new(device_names.onnx_parameter(g, i))]
                for g, i in state[device_names.WEIGHT_ORDER]]

    return step


def export(program, update, path, check, extra_gradients=None, start=None):
    """Write the graphs and the initial state; `check(device_step)` runs the
    export-time check and returns the step's largest error."""
    from keras_split.export import ExportReport

    targets = paths(path)
    graphs = functions(program, update, extra_gradients)
    for name, (function, signature) in graphs.items():
        _convert(function, signature, targets[name], name)
    state = initial_state(program, update)
    np.savez(targets[device_names.ONNX_STATE], **state)
    error = check(device_step(program, targets, state, start))
    files = list(targets.values())
    size = sum(os.path.getsize(f) for f in files)
    return ExportReport([type(path)(f) for f in files], "onnx", list(graphs), size, error)
