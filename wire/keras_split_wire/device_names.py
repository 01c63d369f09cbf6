"""Names an exported client half uses, written by the exporter and read by the device.

The TensorFlow exporter (`keras_split.export`) writes them into `.tflite`
signatures and `.onnx` graphs; the device runtime (`keras_split_edge`) finds
inputs, outputs and state by them. One copy here keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Iterable

# Signatures of a `train` export (an inference export has INFER only).
INFER = "infer"
FORWARD = "forward"
TRAIN = "train"
GET_WEIGHTS = "get_weights"
SET_WEIGHTS = "set_weights"
GET_OPTIMIZER = "get_optimizer"
SET_OPTIMIZER = "set_optimizer"
TRAIN_SIGNATURES = (INFER, FORWARD, TRAIN, GET_WEIGHTS, SET_WEIGHTS, GET_OPTIMIZER,
                    SET_OPTIMIZER)

STEP = "step"
"""The optimizer's step counter (float32 scalar), in and out of the optimizer signatures."""

NEW_PREFIX = "new_"
"""ONNX `train` graphs return each updated state array as `new_<name>`."""

WEIGHT_ORDER = "weight_order"
"""ONNX state: (group, index) pairs giving Keras's `get_weights()` order."""

ONNX_STATE = "state"
"""The key of the initial-state file (`.state.npz`) in `onnx_files`."""

DEVICE_STATE_FILE = "device_state.npz"
"""What the device saves between sessions: weights and optimizer state."""


# Prefixes of the numbered names below, for the side that reads them back.
INPUT_PREFIX = "x"
CUT_PREFIX = "cut_"
GRADIENT_PREFIX = "grad_"
WEIGHT_PREFIX = "w"
SLOT_PREFIX = "s"
ONNX_SLOT_PREFIX = "o"
ONNX_PARAMETER_PREFIXES = ("p", "b")


def _numbered(prefix: str, index: int, width: int = 3) -> str:
    return f"{prefix}{index:0{width}d}"


def model_input(index: int) -> str:
    """The model's inputs in order: x0, x1, ..."""
    return f"{INPUT_PREFIX}{index}"


def cut(index: int) -> str:
    """The cut tensors in order: cut_0, cut_1, ..."""
    return f"{CUT_PREFIX}{index}"


def cut_gradient(index: int) -> str:
    """The server's gradient for cut tensor `index`: grad_0, grad_1, ..."""
    return f"{GRADIENT_PREFIX}{index}"


def weight(index: int) -> str:
    """Weights in `get_weights()` order: w000, w001, ..."""
    return _numbered(WEIGHT_PREFIX, index)


def slot(index: int) -> str:
    """Optimizer slots (LiteRT export and device state): s000, s001, ..."""
    return _numbered(SLOT_PREFIX, index)


def onnx_slot(index: int) -> str:
    """Optimizer slots in an ONNX state file: o000, o001, ..."""
    return _numbered(ONNX_SLOT_PREFIX, index)


def onnx_parameter(group: int, index: int) -> str:
    """ONNX state arrays: trainable parameters p000.. (group 0), buffers b000.. (group 1)."""
    return _numbered(ONNX_PARAMETER_PREFIXES[group], index)


def new(name: str) -> str:
    """What an ONNX `train` graph calls the updated value of state array `name`."""
    return f"{NEW_PREFIX}{name}"


def is_numbered(name: str, prefix: str) -> bool:
    """Whether `name` is `prefix` followed by digits only (x0, s012, ...)."""
    return name.startswith(prefix) and name[len(prefix):].isdigit()


def numbered(names: Iterable[str], prefix: str) -> list[str]:
    """The names that are `prefix` + digits, in index order (w2 before w10)."""
    return sorted((n for n in names if is_numbered(n, prefix)), key=lambda n: int(n[len(prefix):]))


def onnx_files(stem: str) -> dict[str, str]:
    """The files of an ONNX train export whose inference graph is `stem + '.onnx'`."""
    return {INFER: f"{stem}.onnx", FORWARD: f"{stem}.forward.onnx",
            TRAIN: f"{stem}.train.onnx", ONNX_STATE: f"{stem}.state.npz"}
