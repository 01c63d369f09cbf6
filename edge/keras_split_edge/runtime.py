"""Run an exported client half: forward, backward and update, on the device.

`load(path)` opens a `.tflite` export in the LiteRT interpreter or an `.onnx`
export in onnxruntime. Both give the same interface:

- `forward(inputs) -> cut tensors` in training mode (what the device sends),
- `infer(inputs) -> cut tensors` in inference mode,
- `train(inputs, gradients)`: backward from the server's cut gradients and the
  optimizer update, inside the exported model,
- `get_weights()` / `set_weights(weights)`: the model's weights, in the order of
  Keras's `model.get_weights()` (to hand them to the next client),
- `save(folder, progress)` / `restore(folder)`: weights and optimizer state
  on local storage, between app sessions, with the training loop's progress
  (`.npz`, replaced atomically, read without pickle; `saved_progress(folder)`
  reads the progress back).

Neither TensorFlow nor keras_split is imported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from keras_split_wire import device_names as names
from keras_split_wire.optional import require

STATE_FILE = names.DEVICE_STATE_FILE
PROGRESS = "progress"  # the key of the progress record in the state file


class ExportedModel:
    """What both runtimes provide; see the module doc."""

    input_names: list[str]
    input_shapes: list[tuple]  # without the batch axis
    cut_specs: list[tuple[str, tuple]]  # (dtype, shape with -1 for the batch)

    def save(self, folder, progress: dict | None = None) -> Path:
        """Write weights, optimizer state and `progress` (a JSON-able dict) to `folder`.

        One file, replaced atomically and flushed to storage before the
        replace: a crash at any moment leaves the previous save or this one,
        never weights from one and progress from the other.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {names.weight(i): w for i, w in enumerate(self.get_weights())}
        slots, step = self.get_optimizer()
        arrays.update({names.slot(i): s for i, s in enumerate(slots)})
        arrays[names.STEP] = np.asarray(step, np.float32)
        if progress is not None:
            # A unicode array, read back without pickle.
            arrays[PROGRESS] = np.asarray(json.dumps(progress, allow_nan=True))
        path = folder / STATE_FILE
        temporary = folder / (STATE_FILE + ".partial")
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)  # a crash leaves the old file or the new one
        _sync_folder(folder)
        return path

    def restore(self, folder) -> bool:
        """Load the state saved in `folder`; False if there is none."""
        path = Path(folder) / STATE_FILE
        if not path.exists():
            return False
        with np.load(path, allow_pickle=False) as data:
            weights = [data[k] for k in names.numbered(data.files, names.WEIGHT_PREFIX)]
            slots = [data[k] for k in names.numbered(data.files, names.SLOT_PREFIX)]
            step = float(data[names.STEP])
        self.set_weights(weights)
        self.set_optimizer(slots, step)
        return True


def saved_progress(folder) -> dict | None:
    """The progress saved with the state in `folder` (see `ExportedModel.save`), or None."""
    path = Path(folder) / STATE_FILE
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        if PROGRESS not in data.files:
            return None
        return json.loads(str(data[PROGRESS]))


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX; elsewhere the replace is enough)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _check(values, expected, what):
    if len(values) != len(expected):
        raise ValueError(f"{what}: {len(values)} arrays, the model has {len(expected)}.")
    for i, (value, shape) in enumerate(zip(values, expected, strict=True)):
        if tuple(np.shape(value)) != tuple(shape):
            raise ValueError(f"{what}[{i}] has shape {np.shape(value)}, the model expects "
                             f"{tuple(shape)}.")


class LiteRTModel(ExportedModel):
    """A `.tflite` export in the LiteRT interpreter."""

    def __init__(self, path):
        litert = require("ai_edge_litert.interpreter", "Running a .tflite export",
                         "keras-split-edge[litert]")
        self.path = Path(path)
        self._interpreter = litert.Interpreter(model_path=str(path))
        signatures = self._interpreter.get_signature_list()
        missing = set(names.TRAIN_SIGNATURES) - set(signatures)
        if missing:
            raise ValueError(f"{path} lacks the signatures {sorted(missing)}; export it with "
                             "keras_split.export.export_client (not export_inference).")
        self._runners = {name: self._interpreter.get_signature_runner(name)
                         for name in signatures}
        self.input_names = names.numbered(signatures[names.FORWARD]["inputs"],
                                          names.INPUT_PREFIX)
        details = self._runners[names.FORWARD].get_input_details()
        self._input_dtypes = {n: details[n]["dtype"] for n in self.input_names}
        self.input_shapes = [tuple(int(d) for d in details[n]["shape_signature"][1:])
                             for n in self.input_names]
        outputs = self._runners[names.FORWARD].get_output_details()
        self._cut_names = names.numbered(outputs, names.CUT_PREFIX)
        self.cut_specs = [(np.dtype(outputs[n]["dtype"]).name,
                           (-1, *[int(d) for d in outputs[n]["shape_signature"][1:]]))
                          for n in self._cut_names]
        self._weight_shapes = [tuple(v.shape) for v in self.get_weights()]

    def _inputs(self, inputs):
        return {n: np.asarray(x, self._input_dtypes[n])
                for n, x in zip(self.input_names, inputs, strict=True)}

    def _cuts(self, result):
        return [result[n] for n in self._cut_names]

    def forward(self, inputs):
        return self._cuts(self._runners[names.FORWARD](**self._inputs(inputs)))

    def infer(self, inputs):
        return self._cuts(self._runners[names.INFER](**self._inputs(inputs)))

    def train(self, inputs, gradients):
        grads = {names.cut_gradient(i): np.asarray(g, np.float32)
                 for i, g in enumerate(gradients)}
        self._runners[names.TRAIN](**self._inputs(inputs), **grads)

    def get_weights(self):
        result = self._runners[names.GET_WEIGHTS]()
        return [result[k] for k in names.numbered(result, names.WEIGHT_PREFIX)]

    def set_weights(self, weights):
        _check(weights, self._weight_shapes, "weights")
        self._runners[names.SET_WEIGHTS](**{names.weight(i): np.asarray(w, np.float32)
                                            for i, w in enumerate(weights)})

    def get_optimizer(self):
        result = self._runners[names.GET_OPTIMIZER]()
        slots = [result[k] for k in names.numbered(result, names.SLOT_PREFIX)]
        return slots, float(result[names.STEP])

    def set_optimizer(self, slots, step):
        arguments = {names.slot(i): np.asarray(s, np.float32) for i, s in enumerate(slots)}
        arguments[names.STEP] = np.asarray(step, np.float32)
        self._runners[names.SET_OPTIMIZER](**arguments)


class OnnxModel(ExportedModel):
    """An `.onnx` export (stateless graphs) in plain onnxruntime; the state lives here."""

    def __init__(self, path):
        onnxruntime = require("onnxruntime", "Running an .onnx export", "keras-split-edge[onnx]")
        self.path = Path(path)
        files = names.onnx_files(str(path)[: -len(".onnx")])

        def session(name):
            # Worker threads that spin between operations hold cores a phone
            # shares with its app (and, on a busy CPU, lose them: a train step
            # took 3x as long on a loaded two-core machine); they wait instead.
            options = onnxruntime.SessionOptions()
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return onnxruntime.InferenceSession(name, options,
                                                providers=["CPUExecutionProvider"])

        self._infer, self._forward = session(str(path)), session(files[names.FORWARD])
        self._train = session(files[names.TRAIN])
        with np.load(files[names.ONNX_STATE], allow_pickle=False) as data:
            self._state = {k: data[k] for k in data.files}
        self._order = [tuple(int(v) for v in pair)
                       for pair in self._state.pop(names.WEIGHT_ORDER)]
        inputs = {i.name: i for i in self._forward.get_inputs()}
        self.input_names = names.numbered(inputs, names.INPUT_PREFIX)
        self._input_dtypes = {n: _ONNX_DTYPES[i.type] for n, i in inputs.items()}
        self.input_shapes = [tuple(int(d) for d in inputs[n].shape[1:]) for n in self.input_names]
        outputs = {o.name: o for o in self._forward.get_outputs()}
        self._cut_names = names.numbered(outputs, names.CUT_PREFIX)
        self.cut_specs = [("float32", (-1, *[int(d) for d in outputs[n].shape[1:]]))
                          for n in self._cut_names]

    def _feed(self, session, values):
        wanted = {i.name for i in session.get_inputs()}
        return {k: v for k, v in values.items() if k in wanted}

    def _inputs(self, inputs):
        return {n: np.asarray(x, self._input_dtypes[n])
                for n, x in zip(self.input_names, inputs, strict=True)}

    def _cuts(self, session, inputs):
        return session.run(self._cut_names,
                           self._feed(session, {**self._state, **self._inputs(inputs)}))

    def forward(self, inputs):
        return self._cuts(self._forward, inputs)

    def infer(self, inputs):
        return self._cuts(self._infer, inputs)

    def train(self, inputs, gradients):
        grads = {names.cut_gradient(i): np.asarray(g, np.float32)
                 for i, g in enumerate(gradients)}
        feed = self._feed(self._train, {**self._state, **self._inputs(inputs), **grads})
        outputs = [o.name for o in self._train.get_outputs()]
        for name, value in zip(outputs, self._train.run(None, feed), strict=True):
            self._state[name.removeprefix(names.NEW_PREFIX)] = value

    def get_weights(self):
        return [self._state[names.onnx_parameter(g, i)] for g, i in self._order]

    def set_weights(self, weights):
        _check(weights, [self._state[names.onnx_parameter(g, i)].shape for g, i in self._order],
               "weights")
        for (group, index), value in zip(self._order, weights, strict=True):
            self._state[names.onnx_parameter(group, index)] = np.asarray(value, np.float32)

    def get_optimizer(self):
        slots = [self._state[k] for k in names.numbered(self._state, names.ONNX_SLOT_PREFIX)]
        return slots, float(self._state[names.STEP])

    def set_optimizer(self, slots, step):
        for i, value in enumerate(slots):
            self._state[names.onnx_slot(i)] = np.asarray(value, np.float32)
        self._state[names.STEP] = np.asarray(step, np.float32)


_ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8,
                "tensor(int32)": np.int32, "tensor(int64)": np.int64,
                "tensor(double)": np.float64, "tensor(float16)": np.float16}


def load(path) -> ExportedModel:
    """Open an exported client half by its suffix: `.tflite` or `.onnx`."""
    suffix = Path(path).suffix
    if suffix == ".tflite":
        return LiteRTModel(path)
    if suffix == ".onnx":
        return OnnxModel(path)
    raise ValueError(f"Cannot open {path}: expected a .tflite or .onnx export.")
