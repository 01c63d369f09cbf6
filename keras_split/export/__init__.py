"""Export a client half so that phones and IoT devices train it themselves.

`export_client(client, "client.tflite", optimizer="adam")` writes a LiteRT model
whose signatures run the forward pass, the backward pass from the server's cut
gradient and the optimizer update on the device (see `device.DeviceModule`),
using builtin ops only. `export_client(client, "client.onnx", ...)` writes the
same as stateless ONNX graphs for plain onnxruntime (see `onnx_export`).
`export_inference(client, "client.int8.tflite", quantize="int8")` writes
inference-only variants. `exportable(client)` says, from the layers'
configurations alone, whether a client half can be exported and if not which
layer stops it.

Every export is checked before it is written: the converted model's weights
are read back and one training step is compared with the TensorFlow client's
(see `_check` for what "equal" means for a deep ReLU network).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from keras_split.export import onnx_export, ops, tflite
from keras_split.export.device import DeviceModule
from keras_split.export.optimizers import SGD, UnsupportedOptimizerError, from_keras
from keras_split.export.program import ClientProgram, UnsupportedLayerError, exportable
from keras_split.export.tflite import ExportError
from keras_split.graph import read_graph, tensor_key
from keras_split_wire import device_names

__all__ = [
    "ClientProgram",
    "ExportError",
    "ExportReport",
    "UnsupportedLayerError",
    "UnsupportedOptimizerError",
    "export_client",
    "export_inference",
    "exportable",
    "ops",
]

FORMATS = {".tflite": "tflite", ".onnx": "onnx"}
CHECK_ATOL = 1e-5
# Relative to the size of TensorFlow's step of each weight tensor: float32
# sums over thousands of positions, rounded differently by each runtime's
# kernels, differ by up to ~2e-4 of the step (MobileNetV2 at 96x96).
CHECK_RTOL = 1e-3
# A pre-activation within rounding of a ReLU kink can fall on different sides
# in TensorFlow and in the runtime: the step then differs by that one value's
# share (a few percent of a tensor's step, once in several hundred thousand
# activations). A wrong conversion fails every batch; a kink, one now and then.
CHECK_ATTEMPTS = 3


@dataclass
class ExportReport:
    """What an export wrote and how it checked out."""

    files: list[Path]
    format: str
    signatures: list[str]
    bytes: int
    train_step_error: float | None = None
    inference_error: float | None = None


def _format_for(path: Path, format: str | None) -> str:
    if format is None:
        if path.suffix not in FORMATS:
            raise ValueError(
                f"Cannot tell the export format from {path.name!r}: expected a path ending in "
                f"{' or '.join(FORMATS)}, or pass format='tflite' / format='onnx'.")
        return FORMATS[path.suffix]
    if format not in FORMATS.values():
        raise ValueError(f"`format` must be 'tflite' or 'onnx', received {format!r}.")
    expected = {v: k for k, v in FORMATS.items()}[format]
    if path.suffix != expected:
        raise ValueError(f"A {format} export must be written to a path ending in {expected!r}; "
                         f"received {path.name!r}.")
    return format


def _require_runtimes(format: str) -> None:
    """Import the converter and runtime of `format` now: a missing one fails before any work."""
    if format == "tflite":
        tflite.require_runtime()
    else:
        onnx_export.require_converter()
        onnx_export.require_runtime()


def sample_inputs(model: keras.Model, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Inputs to check an export with: pixel-like values for integer inputs and
    for float inputs that go straight into a `Rescaling` (an image in pixel
    units: unit normals there would be a nearly constant image, whose
    BatchNorm statistics divide by almost nothing), unit normals otherwise."""
    rng = np.random.default_rng(seed)
    graph = read_graph(model)
    values = []
    for tensor in model.inputs:
        shape = (batch, *tensor.shape[1:])
        dtype = np.dtype(tensor.dtype)
        readers = graph.consumers.get(tensor_key(tensor), [])
        pixels = any(isinstance(c.layer, keras.layers.Rescaling) for c in readers)
        if dtype.kind in "iu":
            values.append(rng.integers(0, 256, shape).astype(dtype))
        elif pixels:
            values.append(rng.uniform(0, 255, shape).astype(dtype))
        else:
            values.append(rng.normal(size=shape).astype(dtype))
    return values


def reference_step(model: keras.Model, optimizer, objective=None, start=None,
                   dropout=None):
    """The TensorFlow client's own step, on a clone: forward, backward, update
    (with the client's objective, NoPeek, as `ClientRole` applies it).

    `start`: (slots, step) to start Adam from, in the device's slot order (all
    first moments, then all second moments). `dropout="inference"`: the clone's
    Dropout layers are off, as on a device exported that way.
    """
    from keras_split.roles import ClientRole

    def clone_layer(layer):
        config = layer.get_config()
        if dropout == "inference" and isinstance(layer, keras.layers.Dropout):
            config["rate"] = 0.0
        return type(layer).from_config(config)

    def step(x, grads):
        clone = keras.models.clone_model(model, clone_function=clone_layer)
        clone.set_weights(model.get_weights())
        role = ClientRole(clone, optimizer, objective=objective)
        role.build()
        if start is not None:
            slots, count = start
            moments = role.optimizer._momentums + role.optimizer._velocities
            for variable, value in zip(moments, slots, strict=True):
                variable.assign(value)
            role.optimizer.iterations.assign(int(count))
        context = role.forward(x[0] if len(x) == 1 else list(x))
        role.backward(context, grads)
        return clone.get_weights()

    return step


def check_start(update, program):
    """Where the export-time check starts the optimizer: (slots, step), or None
    for fresh slots.

    Adam from fresh slots moves every weight by about the learning rate in the
    direction of its gradient's sign, however small the gradient. A parameter
    whose true gradient is exactly zero (a BatchNormalization offset under a
    1x1 convolution and another BatchNormalization, as in every MobileNetV2
    block) then steps along float32 rounding noise, which differs between any
    two implementations. From second moments of 1 (and a late step, so that
    the bias corrections are near 1) Adam's update is about
    0.08 * learning_rate * gradient: the same arithmetic, linear in the
    gradient, so rounding moves the weights by rounding.
    """
    if update.name != "adam":
        return None
    shapes = [tuple(v.shape) for v in program.trainable]
    slots = [np.zeros(s, np.float32) for s in shapes] + [np.ones(s, np.float32) for s in shapes]
    return slots, 1000.0


def _device_objective(objective):
    """The cut-gradient term an exported `train` adds for the client's objective.

    The objective brings its own device rule: a method `cut_gradients(inputs,
    cut_tensors)` written with forward ops, returning one gradient per cut
    tensor, or None when it adds nothing (as `keras_split.privacy.NoPeek`
    has). Export never imports a defence: the core's `export_client` reaches
    this module, and the core does not depend on the privacy layer.
    """
    if objective is None:
        return None
    rule = getattr(objective, "cut_gradients", None)
    if not callable(rule):
        raise ExportError(
            f"The client's objective {objective!r} has no device rule (a `cut_gradients("
            "inputs, cut_tensors)` method with forward ops, as keras_split.privacy.NoPeek "
            "has), so the device could not train with it. Export with objective=None (the "
            "device then trains without that term), or compile the client without it.")
    return rule


def _check_tolerance(update, extra_gradients) -> float:
    """How far the export-time check lets the device's step be from TensorFlow's."""
    if extra_gradients is None or update.name != "adam":
        return CHECK_ATOL
    # Loosened for an objective (NoPeek) with Adam, and why: dCor's gradient
    # on the small check batch (dCor near 1, where A - (C / Vz) B cancels)
    # carries float32 rounding of about 1e-10 to 1e-9 into weight gradients,
    # and TensorFlow's kernels and the device's round differently. Adam's
    # first step is lr * g / (|g| + epsilon): for a gradient below epsilon
    # (1e-7) a rounding difference d moves the weight by up to lr * d /
    # epsilon, about 1e-2 * lr (measured: up to 3e-5 at lr=1e-2, alpha=10). A
    # wrong conversion moves weights by about lr. SGD exports keep CHECK_ATOL
    # (tests: 5 steps within 1e-5).
    return CHECK_ATOL + 1e-2 * update.learning_rate


def export_client(model: keras.Model, path, format: str | None = None, optimizer="sgd",
                  check_batch: int = 2, objective=None, dropout: str | None = None
                  ) -> ExportReport:
    """Export a client half for on-device training.

    Args:
        model: the client half (`split.client`), functional or Sequential.
        path: where to write: `*.tflite`, or `*.onnx` (then `*.forward.onnx`,
            `*.train.onnx` and `*.state.npz` are written beside it).
        format: "tflite" or "onnx"; taken from the suffix when omitted.
        optimizer: the device's optimizer: a `keras.optimizers.SGD` or `Adam`
            (constant learning rate), or "sgd"/"adam".
        check_batch: batch size of the export-time check.
        objective: the client's own term of the loss, as given to `ClientRole`:
            `keras_split.privacy.NoPeek(alpha)` (what `compile(nopeek=...)`
            sets; `SplitModel.export_client` passes it on). The device's
            `train` then adds the gradient of `alpha * dCor(inputs, cut)` to
            the server's cut gradient, with builtin ops; the signatures and
            what the device sends are unchanged. Any objective with a
            `cut_gradients(inputs, cut_tensors)` device rule may be passed.

    Returns:
        An `ExportReport`.

    Raises:
        UnsupportedLayerError, UnsupportedOptimizerError: before converting,
            naming the layer or setting.
        ExportError: the converter needs non-builtin ops, the converted
            model's step differs from TensorFlow's, or `objective` has no
            device rule.
        ImportError: the converter or runtime of the format is not installed
            (they come with `pip install 'keras-split[export]'`).
    """
    path = Path(path)
    format = _format_for(path, format)
    rule = _device_objective(objective)
    _require_runtimes(format)
    program = ClientProgram(model, dropout=dropout)
    update = from_keras(optimizer)
    keras_optimizer = keras.optimizers.get(optimizer) if isinstance(optimizer, str) else optimizer
    start = check_start(update, program)
    reference = reference_step(model, keras_optimizer, objective, start, dropout)
    path.parent.mkdir(parents=True, exist_ok=True)
    tolerance = _check_tolerance(update, rule)

    def check(device_step):
        return _check(model, device_step, reference, check_batch, tolerance, format)

    if format == "tflite":
        module = DeviceModule(program, update, rule)
        data = tflite.convert(module, list(module.functions))
        error = check(tflite.device_step(data, module, start))
        path.write_bytes(data)
        return ExportReport([path], "tflite", list(module.functions), len(data), error)
    return onnx_export.export(program, update, path, check, rule, start)


def _check(model, device_step, reference, batch, atol, format) -> float:
    """The export-time check: one device step against TensorFlow's, on up to
    `CHECK_ATTEMPTS` random batches; returns the passing step's largest error.

    A weight tensor passes within `atol + CHECK_RTOL * (TensorFlow's step of
    that tensor)`.
    """
    before = model.get_weights()
    failures = []
    for attempt in range(CHECK_ATTEMPTS):
        x = sample_inputs(model, batch, seed=attempt)
        rng = np.random.default_rng(attempt + 1)
        grads = [rng.normal(size=(batch, *t.shape[1:])).astype("float32") * 1e-2
                 for t in model.outputs]
        got, want = device_step(x, grads), reference(x, grads)
        errors = [float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)]
        allowed = [atol + CHECK_RTOL * float(np.abs(w - b).max()) if w.size else atol
                   for w, b in zip(want, before, strict=True)]
        if all(e <= a for e, a in zip(errors, allowed, strict=True)):
            return max(errors, default=0.0)
        worst = int(np.argmax([e / a for e, a in zip(errors, allowed, strict=True)]))
        failures.append(f"{errors[worst]:.3g} in {model.weights[worst].path} "
                        f"(allowed {allowed[worst]:.3g})")
    runtime = "LiteRT" if format == "tflite" else "onnxruntime"
    raise ExportError(
        f"The converted model's train step in {runtime} differs from TensorFlow's on "
        f"{CHECK_ATTEMPTS} random batches (largest errors: {'; '.join(failures)}); the "
        "export is not trustworthy for this model.")


def export_inference(model: keras.Model, path, quantize: str | None = None,
                     check_batch: int = 16) -> ExportReport:
    """Export `infer` only, optionally quantized ("float16", or "int8" dynamic range).

    The report's `inference_error` is the largest difference from Keras's own
    output on a sample batch.
    """
    import tensorflow as tf

    path = Path(path)
    if path.suffix != ".tflite":
        raise ValueError(f"Inference exports are TFLite files ending in '.tflite'; received "
                         f"{path.name!r}.")
    options = {None: {}, "float16": {"optimizations": [tf.lite.Optimize.DEFAULT],
                                     "supported_types": [tf.float16]},
               "int8": {"optimizations": [tf.lite.Optimize.DEFAULT]}}
    if quantize not in options:
        raise ValueError(f"`quantize` must be None, 'float16' or 'int8'; received {quantize!r}.")
    _require_runtimes("tflite")
    module = DeviceModule(ClientProgram(model), SGD(0.0))
    with ops.frozen_weights():
        data = tflite.convert(module, [device_names.INFER], **options[quantize])
    x = sample_inputs(model, check_batch)
    runner = tflite.interpreter(data).get_signature_runner(device_names.INFER)
    got = runner(**dict(zip(module.names, x, strict=True)))
    want = model(x[0] if len(x) == 1 else x, training=False)
    want = want if isinstance(want, (list, tuple)) else [want]
    error = max(float(np.abs(got[device_names.cut(i)] - np.asarray(w)).max())
                for i, w in enumerate(want))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return ExportReport([path], "tflite", [device_names.INFER], len(data),
                        inference_error=error)
