"""Rounds on the device: take part in a server's round-robin or SplitFed rounds.

A `keras-split serve --rounds N` server (a `SplitServer` with a
`keras_split.configurations.rounds.RoundCoordinator`) decides who trains when
and what from. A device takes part exactly as the TensorFlow client does
(`SplitClient.train_rounds`), with the same messages:

1. `Turn(round)`: ask to train in `round` or later; the server answers "go"
   with the client half to start from (round-robin: the previous client's
   hand-off; SplitFed: the round's FedAvg), "ask again" after its long poll,
   or "finished".
2. Load those weights into the exported client half (`set_weights`; they
   arrive as float32 arrays in `get_weights()` order, as the device takes
   them), then train on the device's shard for `epochs_per_turn` epochs with
   `Step` calls: the batches in the order `fit(seed=...)` gives them, the
   server's cut gradient applied by the device's own optimizer, whose state
   (Adam's moments) carries over from turn to turn as the TensorFlow client's
   does.
3. `Report(round, weights, samples)`: hand the trained client half back with
   the number of training samples (its FedAvg weight).

`RoundClient.run()` loops over turns until the rounds are over, like
`SplitClient.train_rounds`; `turn`, `train` and `report` are the three steps
one at a time, for a driver that schedules many clients in one process (see
benchmarks/many_clients.py). Each `TurnResult` says what a turn cost the
device: steps, samples, seconds of device compute, bytes.

No TensorFlow, Keras or keras_split here: numpy, gRPC and the device runtime.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from keras_split_edge.link import ServerLink, evaluate_batches
from keras_split_edge.runtime import ExportedModel, load


@dataclass
class TurnResult:
    """One turn of one client.

    Attributes:
        round: the round it trained in.
        steps: training steps sent (batches).
        samples: the sample count reported (the shard's size).
        compute_seconds: CPU seconds of this thread in the device runtime
            (forward, backward and update; `set_weights`/`get_weights`).
        wall_seconds: from "go" to the end of the report.
        bytes_up, bytes_down: the turn's steps and its report, serialized.
        logs: the server's logs of the last step (loss, metrics).
    """

    round: int
    steps: int = 0
    samples: int = 0
    compute_seconds: float = 0.0
    wall_seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    logs: dict = field(default_factory=dict)


class RoundClient:
    """One device taking part in the server's rounds; see the module doc.

    Args:
        model: an `ExportedModel` (or the path of a `.tflite`/`.onnx` export):
            the device's client half, with its optimizer.
        link: a `ServerLink` to the rounds server, or its "host:port" (then
            `link_options`: token, root_certificates, insecure, timeout, ...).
            The session is opened here if the link has none.
        x, y: the device's shard.
        batch_size, epochs_per_turn, shuffle, seed: how each turn trains, as
            `SplitClient.fit(x, y, batch_size, epochs=epochs_per_turn,
            shuffle, seed)` does in `train_rounds`: with a seed, the same batch
            order every turn.
    """

    def __init__(self, model, link, x, y, batch_size: int = 32, epochs_per_turn: int = 1,
                 shuffle: bool = True, seed=None, **link_options):
        self.model: ExportedModel = model if isinstance(model, ExportedModel) else load(model)
        self.link = link if isinstance(link, ServerLink) else ServerLink(link, **link_options)
        if self.link.session_id is None:
            self.link.open(self.model.cut_specs)
        self.x, self.y = np.asarray(x), np.asarray(y)
        if len(self.x) != len(self.y) or not len(self.x):
            raise ValueError(f"x and y must hold the same, positive number of samples; "
                             f"received {len(self.x)} and {len(self.y)}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, received {batch_size}.")
        self.batch_size, self.epochs_per_turn = batch_size, epochs_per_turn
        self.shuffle, self.seed = shuffle, seed
        # The most elements the handed-out client half may hold: the device's own.
        self.max_elements = sum(int(w.size) for w in self.model.get_weights()) or 1
        self.results: list[TurnResult] = []

    # -- the three steps of a turn ---------------------------------------------------

    def turn(self, ready_for: int, timeout: float | None = None):
        """One `Turn` call (see `ServerLink.turn`): `(go, round, weights, finished)`."""
        return self.link.turn(ready_for, self.max_elements, timeout)

    def wait_for_turn(self, ready_for: int):
        """Ask until told to go (`(round, weights)`) or that no rounds are left (None)."""
        while True:
            go, round_, weights, finished = self.turn(ready_for)
            if finished:
                return None
            if go:
                return round_, weights

    def train(self, round_: int, weights) -> TurnResult:
        """Load the handed-out `weights` and train the turn on the shard."""
        result = TurnResult(round=round_, samples=len(self.x))
        started = time.monotonic()
        up, down = self.link.bytes_up, self.link.bytes_down
        compute = time.thread_time()
        self.model.set_weights(weights)
        result.compute_seconds += time.thread_time() - compute
        steps = math.ceil(len(self.x) / self.batch_size)
        rng = np.random.default_rng(self.seed)  # keras_split's fit(seed=...) order
        for _ in range(self.epochs_per_turn):
            order = rng.permutation(len(self.x)) if self.shuffle else np.arange(len(self.x))
            for index in range(steps):
                batch = order[index * self.batch_size:(index + 1) * self.batch_size]
                x = self.x[batch]
                compute = time.thread_time()
                activations = self.model.forward([x])
                result.compute_seconds += time.thread_time() - compute
                gradients, result.logs = self.link.exchange("train", activations, self.y[batch],
                                                            reset_metrics=index == 0)
                compute = time.thread_time()
                self.model.train([x], gradients)
                result.compute_seconds += time.thread_time() - compute
                result.steps += 1
        result.bytes_up = self.link.bytes_up - up
        result.bytes_down = self.link.bytes_down - down
        result.wall_seconds = time.monotonic() - started
        return result

    def report(self, result: TurnResult) -> int:
        """Hand the trained client half back for `result.round`; returns the
        server's round now. Adds the report's bytes and time to `result`."""
        up, down = self.link.round_bytes_up, self.link.round_bytes_down
        started = time.monotonic()
        compute = time.thread_time()
        weights = self.model.get_weights()
        result.compute_seconds += time.thread_time() - compute
        round_now = self.link.report(result.round, weights, result.samples)
        result.bytes_up += self.link.round_bytes_up - up
        result.bytes_down += self.link.round_bytes_down - down
        result.wall_seconds += time.monotonic() - started
        self.results.append(result)
        return round_now

    # -- the whole loop --------------------------------------------------------------

    def run(self, on_turn=None, ready_for: int = 1) -> list[int]:
        """Take part until the rounds are over; returns the rounds trained in.

        `on_turn(round)` is called as each turn starts (as in
        `SplitClient.train_rounds`).
        """
        trained = []
        while (turn := self.wait_for_turn(ready_for)) is not None:
            round_, weights = turn
            if on_turn is not None:
                on_turn(round_)
            self.report(self.train(round_, weights))
            trained.append(round_)
            ready_for = round_ + 1
        return trained

    def evaluate(self, weights, x, y, batch_size: int = 256) -> dict:
        """The server's loss and metrics for client half `weights` on (x, y), with
        inference-mode activations (`Step` in "evaluate" mode: nothing trains).
        Loads `weights` into the device; train the turn after, from them."""
        self.model.set_weights(weights)
        return evaluate_batches(self.model, self.link, x, y, batch_size)

    def close(self) -> None:
        self.link.close()


__all__ = ["RoundClient", "TurnResult"]
