"""The two messages of split learning, as plain values.

A message holds numpy arrays and Python scalars only: it is what a transport
puts on the wire, and nothing in it can carry code or a model. Byte counts are
the payload bytes of the tensors (`ndarray.nbytes`), which is what a wire
format that sends raw tensor bytes carries; framing and the scalar fields are
not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import keras
import numpy as np

Mode = Literal["train", "evaluate", "predict"]
MODES = ("train", "evaluate", "predict")
MAX_TRACE = 64


@dataclass(frozen=True)
class Activations:
    """Client to server: the cut tensors of one batch.

    Attributes:
        step: the client's step counter (monotonic within a session).
        mode: "train" (server updates and returns gradients), "evaluate"
            (server updates metrics only) or "predict" (server returns outputs).
        tensors: one array per cut tensor, in cut-spec order.
        labels: the batch's labels, a nested structure of arrays, or None
            when the server does not need them (predict, U-shaped setups).
        sample_weight: per-sample weights or None.
        reset_metrics: the server resets its metric state before this batch
            (first batch of an epoch or of an evaluation).
        trace: an opaque id the sender gives this step. Middle parties
            renumber `step` for their own sessions but pass `trace` on
            unchanged, so a party further down can match a message to state
            its sender kept for that step (U-shaped label keeping), with any
            number of steps in flight. Empty when nobody needs it.
    """

    step: int
    mode: Mode
    tensors: tuple[np.ndarray, ...]
    labels: Any = None
    sample_weight: np.ndarray | None = None
    reset_metrics: bool = False
    trace: str = ""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, received {self.mode!r}.")
        if len(self.trace) > MAX_TRACE or not self.trace.isascii():
            raise ValueError(f"`trace` must be at most {MAX_TRACE} ASCII characters, received "
                             f"{self.trace[:80]!r}.")

    @property
    def nbytes(self) -> int:
        return payload_bytes(self.tensors, self.labels, self.sample_weight)


@dataclass(frozen=True)
class Reply:
    """Server to client: the answer to one `Activations` message.

    Attributes:
        step: the step this answers.
        gradients: one array per cut tensor (train mode), else empty.
        logs: the server's running loss and metric values.
        outputs: the model outputs (predict mode), a nested structure of arrays.
    """

    step: int
    gradients: tuple[np.ndarray, ...] = ()
    logs: dict[str, float] = field(default_factory=dict)
    outputs: Any = None

    @property
    def nbytes(self) -> int:
        return payload_bytes(self.gradients, self.outputs)


def payload_bytes(*structures) -> int:
    total = 0
    for structure in structures:
        if structure is None:
            continue
        for leaf in keras.tree.flatten(structure):
            if leaf is not None:
                total += int(np.asarray(leaf).nbytes)
    return total
