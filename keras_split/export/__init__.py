"""Export a client half so that phones and IoT devices train it themselves.

`export_client(client, "client.tflite", optimizer="adam")` writes a LiteRT model
whose signatures run the forward pass, the backward pass from the server's cut
gradient and the optimizer update on the device (see `device.DeviceModule`),
using builtin ops only. `export_client(client, "client.onnx", ...)` writes the
same as stateless ONNX graphs for plain onnxruntime (see `onnx_export`).
`export_inference(client, "client.int8.tflite", quantize="int8")` writes
inference-only variants.

Every export is checked before it is written: the converted model's weights
are read back and one training step is compared with the TensorFlow client's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from keras_split.export import onnx_export, ops, tflite
from keras_split.export.device import DeviceModule
from keras_split.export.optimizers import SGD, UnsupportedOptimizerError, from_keras
from keras_split.export.program import ClientProgram, UnsupportedLayerError
from keras_split.export.tflite import ExportError
from keras_split_wire import device_names

__all__ = [
    "ClientProgram",
    "ExportError",
    "ExportReport",
    "UnsupportedLayerError",
    "UnsupportedOptimizerError",
    "export_client",
    "export_inference",
    "ops",
]

FORMATS = {".tflite": "tflite", ".onnx": "onnx"}
CHECK_ATOL = 1e-5


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
    """Inputs to check an export with: pixel-like integers or unit normals."""
    rng = np.random.default_rng(seed)
    values = []
    for tensor in model.inputs:
        shape = (batch, *tensor.shape[1:])
        dtype = np.dtype(tensor.dtype)
        if dtype.kind in "iu":
            values.append(rng.integers(0, 256, shape).astype(dtype))
        else:
            values.append(rng.normal(size=shape).astype(dtype))
    return values


def reference_step(model: keras.Model, optimizer, objective=None):
    """The TensorFlow client's own step, on a clone: forward, backward, update
    (with the client's objective, NoPeek, as `ClientRole` applies it)."""
    from keras_split.roles import ClientRole

    def step(x, grads):
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        role = ClientRole(clone, optimizer, objective=objective)
        role.build()
        context = role.forward(x[0] if len(x) == 1 else list(x))
        role.backward(context, grads)
        return clone.get_weights()

    return step


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
                  check_batch: int = 4, objective=None) -> ExportReport:
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
    program = ClientProgram(model)
    update = from_keras(optimizer)
    keras_optimizer = keras.optimizers.get(optimizer) if isinstance(optimizer, str) else optimizer
    x = sample_inputs(model, check_batch)
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=(check_batch, *t.shape[1:])).astype("float32") * 1e-2
             for t in model.outputs]
    reference = reference_step(model, keras_optimizer, objective)
    path.parent.mkdir(parents=True, exist_ok=True)
    tolerance = _check_tolerance(update, rule)
    if format == "tflite":
        module = DeviceModule(program, update, rule)
        data = tflite.convert(module, list(module.functions))
        error = tflite.run_train_check(data, module, reference, x, grads, tolerance)
        path.write_bytes(data)
        return ExportReport([path], "tflite", list(module.functions), len(data), error)
    return onnx_export.export(program, update, path, reference, x, grads, tolerance, rule)


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
