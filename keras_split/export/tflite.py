"""TFLite (LiteRT) export of a client half, with on-device training signatures."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile

import numpy as np
import tensorflow as tf

from keras_split.export.device import DeviceModule
from keras_split_wire import device_names
from keras_split_wire.optional import require


class ExportError(RuntimeError):
    """The converter or the export-time check refused the model."""


def _converter_for(module: DeviceModule, folder: str, keys):
    signatures = {k: module.functions[k].get_concrete_function() for k in keys}
    # The gradients are already in the graphs (written with forward ops): no
    # need to save the custom gradients' own functions, which takes most of
    # the time of a save for a large client half.
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    tf.saved_model.save(module, folder, signatures=signatures, options=options)
    with _quiet_loader():
        converter = tf.lite.TFLiteConverter.from_saved_model(folder,
                                                             signature_keys=list(keys))
    # Builtin ops only: the plain LiteRT runtime (no Flex delegate) runs it.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.experimental_enable_resource_variables = True
    return converter


@contextlib.contextmanager
def _quiet_loader():
    """The loader warns, once per signature, that the saved functions lack their
    custom gradients; nothing asks for them (see `_converter_for`)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def convert(module: DeviceModule, keys, optimizations=None, supported_types=None) -> bytes:
    """Convert the named signatures in one call, so they share variables."""
    with tempfile.TemporaryDirectory() as folder:
        converter = _converter_for(module, os.path.join(folder, "saved"), keys)
        if optimizations:
            converter.optimizations = optimizations
        if supported_types:
            converter.target_spec.supported_types = supported_types
        try:
            with _quiet_loader():
                return converter.convert()
        except Exception as error:  # the converter raises several unrelated types
            text = str(error)
            needed = [line.split(":", 1)[1].strip() for line in text.splitlines()
                      if line.startswith("TF Select ops:")]
            if needed:
                raise ExportError(
                    f"This client half needs TensorFlow ops outside LiteRT's builtin set "
                    f"({', '.join(needed)}); the plain LiteRT runtime has no Flex delegate "
                    "to run them. A layer or gradient rule uses them: cut before it."
                ) from None
            raise ExportError(f"The TFLite converter failed: {text.splitlines()[:5]}") \
                from None


def require_runtime():
    """The LiteRT interpreter class: every export is checked in the runtime a phone uses."""
    litert = require("ai_edge_litert.interpreter", "LiteRT export", "keras-split[export]")
    return litert.Interpreter


def interpreter(model: bytes):
    """A LiteRT interpreter for `model` (the runtime a phone uses)."""
    return require_runtime()(model_content=model)


def device_step(model: bytes, module: DeviceModule, start=None):
    """One `train` step of the converted model in LiteRT, as a function
    `(x, grads) -> weights after`, from fresh variables each time.

    `start`: (slots, step) the optimizer starts from, as `reference_step`'s.
    Each fresh interpreter first reads its weights back: a converted model
    whose variables did not keep their values fails here.
    """

    def step(x, grads):
        runner = interpreter(model)
        weights = runner.get_signature_runner(device_names.GET_WEIGHTS)()
        for i, variable in enumerate(module.weights):
            got = weights[device_names.weight(i)]
            if not np.allclose(got, variable.numpy(), atol=1e-6, rtol=0):
                raise ExportError(f"Weight {i} reads back wrong from the converted model "
                                  f"(largest error {np.abs(got - variable.numpy()).max():.3g}).")
        if start is not None:
            slots, count = start
            runner.get_signature_runner(device_names.SET_OPTIMIZER)(
                **{device_names.slot(i): s for i, s in enumerate(slots)},
                **{device_names.STEP: np.asarray(count, np.float32)})
        inputs = dict(zip(module.names, x, strict=True))
        gradients = {device_names.cut_gradient(i): g for i, g in enumerate(grads)}
        runner.get_signature_runner(device_names.TRAIN)(**inputs, **gradients)
        after = runner.get_signature_runner(device_names.GET_WEIGHTS)()
        return [after[device_names.weight(i)] for i in range(len(module.weights))]

    return step
