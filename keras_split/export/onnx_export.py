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
kernel (which ONNX lacks) appears in the graph.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from keras_split.export.device import input_names
from keras_split.export.optimizers import initial_slots
from keras_split.export.tflite import ExportError

OPSET = 17


def _specs(program, update):
    names = input_names(program)
    x = [tf.TensorSpec([None, *t.shape[1:]], t.dtype, name=n)
         for t, n in zip(program.inputs, names, strict=True)]
    grads = [tf.TensorSpec([None, *t.shape[1:]], tf.float32, name=f"grad_{i}")
             for i, t in enumerate(program.outputs)]
    params = [tf.TensorSpec(v.shape, tf.float32, name=f"p{i:03d}")
              for i, v in enumerate(program.trainable)]
    state = [tf.TensorSpec(v.shape, tf.float32, name=f"b{i:03d}")
             for i, v in enumerate(program.state)]
    slots = [tf.TensorSpec(s.shape, tf.float32, name=f"o{i:03d}")
             for i, s in enumerate(initial_slots(update, program.trainable))]
    step = tf.TensorSpec([], tf.float32, name="step")
    return x, grads, params, state, slots, step


def functions(program, update):
    """The three graphs as tf.functions over explicit tensors."""
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
        return {f"cut_{i}": tf.identity(t, name=f"cut_{i}") for i, t in enumerate(outputs)}

    def infer(*arguments):
        inputs, p, b, _ = split(arguments, nx, np_, ns)
        return cuts(program.run(p, b, inputs, training=False)[0])

    def forward(*arguments):
        inputs, p, b, _ = split(arguments, nx, np_, ns)
        return cuts(program.run(p, b, inputs, training=True)[0])

    def train(*arguments):
        inputs, g, p, b, rest = split(arguments, nx, ng, np_, ns)
        o, (s,) = rest[:-1], rest[-1:]
        with tf.GradientTape() as tape:
            tape.watch(p)
            outputs, new_b = program.run(p, b, inputs, training=True)
        gradients = tape.gradient(outputs, p, output_gradients=g)
        new_p, new_o = update.apply(p, gradients, o, s)
        result = {f"new_p{i:03d}": tf.identity(v) for i, v in enumerate(new_p)}
        result.update({f"new_b{i:03d}": tf.identity(v) for i, v in enumerate(new_b)})
        result.update({f"new_o{i:03d}": tf.identity(v) for i, v in enumerate(new_o)})
        result["new_step"] = s + 1.0
        return result

    return {
        "infer": (tf.function(infer), x + params + state),
        "forward": (tf.function(forward), x + params + state),
        "train": (tf.function(train), x + grads + params + state + slots + [step]),
    }


def _convert(function, signature, path):
    import onnx
    import tf2onnx

    try:
        model, _ = tf2onnx.convert.from_function(function, input_signature=signature,
                                                 opset=OPSET, output_path=str(path))
    except Exception as error:  # tf2onnx raises several unrelated types
        raise ExportError(f"tf2onnx could not convert the client half: {error}") from None
    onnx.checker.check_model(model)
    return model


def initial_state(program, update) -> dict[str, np.ndarray]:
    arrays = {f"p{i:03d}": np.asarray(v.numpy(), np.float32)
              for i, v in enumerate(program.trainable)}
    arrays.update({f"b{i:03d}": np.asarray(v.numpy(), np.float32)
                   for i, v in enumerate(program.state)})
    arrays.update({f"o{i:03d}": s for i, s in enumerate(initial_slots(update, program.trainable))})
    arrays["step"] = np.zeros((), np.float32)
    # Where each of model.get_weights() lives: [0, i] = p[i], [1, i] = b[i].
    index = {id(v): (0, i) for i, v in enumerate(program.trainable)}
    index.update({id(v): (1, i) for i, v in enumerate(program.state)})
    arrays["weight_order"] = np.array([index[id(v)] for v in program.weights], np.int64)
    return arrays


def paths(path):
    stem = str(path)[: -len(".onnx")]
    return {"infer": path, "forward": f"{stem}.forward.onnx", "train": f"{stem}.train.onnx",
            "state": f"{stem}.state.npz"}


def session(path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def export(program, update, path, reference, x, grads, atol):
    from keras_split.export import ExportReport

    targets = paths(path)
    graphs = functions(program, update)
    for name, (function, signature) in graphs.items():
        _convert(function, signature, targets[name])
    state = initial_state(program, update)
    np.savez(targets["state"], **state)
    # The export-time check: one train step in onnxruntime against TensorFlow's.
    names = input_names(program)
    feed = {**dict(zip(names, x, strict=True)),
            **{f"grad_{i}": g for i, g in enumerate(grads)},
            **{k: v for k, v in state.items() if k != "weight_order"}}
    train = session(targets["train"])
    wanted = {i.name for i in train.get_inputs()}
    outputs = dict(zip([o.name for o in train.get_outputs()],
                       train.run(None, {k: v for k, v in feed.items() if k in wanted}),
                       strict=True))
    groups = {0: "new_p", 1: "new_b"}
    after = [outputs[f"{groups[g]}{i:03d}"] for g, i in state["weight_order"]]
    want = reference(x, grads)
    error = max(float(np.abs(a - w).max()) for a, w in zip(after, want, strict=True))
    if error > atol:
        raise ExportError(f"The ONNX train step differs from TensorFlow's by {error:.3g} "
                          f"(tolerance {atol}).")
    files = [targets[k] for k in ("infer", "forward", "train", "state")]
    size = sum(os.path.getsize(f) for f in files)
    return ExportReport([type(path)(f) for f in files], "onnx", list(graphs), size, error)
