"""The device's training loop: forward on the device, the cut gradient from the
server, backward and update on the device.

One training step:

1. the device runs the client half forward on a batch (`ExportedModel.forward`);
2. the link sends the cut tensors and labels and receives the cut gradient
   (`ServerLink.exchange`); the server applies its half of the step first;
3. the device runs backward from that gradient and updates its weights
   (`ExportedModel.train`);
4. with a `state_dir`, the device saves its weights, optimizer state and its
   progress (session, step, position in the data) in one file, atomically.

Two things do not end a session:

- A batch the server refuses for its content (a label outside the classes,
  say: `keras_split_wire.rpc.RejectedError`) is reported, counted in the
  history under "refused" and skipped; neither side applied anything for it,
  and the step number is not consumed. Refusals of who we are or of the
  session (`CredentialsError`, other `ServerError`s) still stop the fit.
- A device that crashed resumes: a new `EdgeClient` on the same `state_dir`
  restores the weights and optimizer, reopens its session at its saved step
  (the server may hold one step more, applied before the crash but never
  saved here: the device resends that batch and the server answers it from
  its cache without applying it twice), and `fit` with the same data and
  arguments goes on from the next batch in the same shuffled order.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import numpy as np

from keras_split_edge.link import ServerLink, evaluate_batches
from keras_split_edge.runtime import ExportedModel, load, saved_progress
from keras_split_wire.rpc import CredentialsError, LinkDownError, RejectedError, ServerError

logger = logging.getLogger("keras_split_edge")

PROGRESS_VERSION = 1
_PROGRESS_KEYS = {"version", "session_id", "step", "data", "fit", "order_seed", "epoch", "batch",
                  "epoch_logs", "history", "finished"}


def fingerprint(x: np.ndarray, y: np.ndarray) -> dict:
    """What identifies a fit's data: sample count, shapes, dtypes and a SHA-256 of the bytes."""
    digest = hashlib.sha256()
    for array in (x, y):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return {"samples": len(x), "x": [x.dtype.name, list(x.shape[1:])],
            "y": [y.dtype.name, list(y.shape[1:])], "sha256": digest.hexdigest()}


def _describe(data: dict) -> str:
    return f"{data['samples']} samples, sha256 {data['sha256'][:12]}"


class EdgeClient:
    """Train an exported client half against a keras_split server.

    Args:
        model: an `ExportedModel` or the path of a `.tflite` / `.onnx` export.
        server: "host:port" of the `SplitServer`.
        state_dir: where the device keeps its weights, optimizer state and
            progress; saved after every batch of `fit`. A client created on a
            `state_dir` that holds them restores the weights and reopens the
            saved session, and `fit` resumes where the last one stopped.
        **link_options: token, root_certificates, certificate, private_key,
            insecure, compression, timeout, retry_for, tls_hint (see `ServerLink`).

    Example:

    ```python
    client = EdgeClient("client.tflite", "server:50051", token="s3cret",
                        root_certificates="ca.pem", state_dir="device-state")
    history = client.fit(x, y, batch_size=32, epochs=1)
    ```
    """

    def __init__(self, model, server: str, state_dir=None, **link_options):
        self.model: ExportedModel = load(model) if not isinstance(model, ExportedModel) \
            else model
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.restored = self.state_dir is not None and self.model.restore(self.state_dir)
        # The saved progress of a fit: None without one (a fresh device, or a
        # state saved by a version that kept weights only).
        self.progress: dict | None = saved_progress(self.state_dir) if self.restored else None
        if self.progress is not None and (self.progress.get("version") != PROGRESS_VERSION
                                          or not _PROGRESS_KEYS <= set(self.progress)):
            raise ValueError(
                f"The device state in {self.state_dir} holds progress this version cannot read "
                f"(version {self.progress.get('version')!r}, keys {sorted(self.progress)}; "
                f"expected version {PROGRESS_VERSION}). Use another state_dir.")
        self.link = ServerLink(server, **link_options)
        self._pending = False  # the server holds a step this device has not applied
        if self.progress is None:
            self.link.open(self.model.cut_specs)
            return
        session, step = self.progress["session_id"], self.progress["step"]
        try:
            last = self.link.open(self.model.cut_specs, resume=(session, step))
        except (CredentialsError, LinkDownError):
            raise
        except ServerError as error:
            raise ServerError(
                f"Cannot resume session {session} at step {step}, saved in {self.state_dir}: "
                f"{error} If the server lost its state, the device's state cannot be lined "
                f"up with it: start with another state_dir.") from None
        self._pending = last > step

    def _position(self, progress: dict) -> str:
        fit = progress["fit"]
        steps = math.ceil(progress["data"]["samples"] / fit["batch_size"])
        return (f"epoch {progress['epoch'] + 1}/{fit['epochs']}, batch "
                f"{progress['batch'] + 1}/{steps} (session {progress['session_id'][:8]}, "
                f"step {progress['step']}, state in {self.state_dir})")

    def _start(self, data: dict, arguments: dict, restart: bool, verbose: int):
        """The progress to train from, and whether it resumes a saved fit."""
        saved = self.progress
        fresh = {"version": PROGRESS_VERSION, "data": data, "fit": arguments,
                 "order_seed": arguments["seed"] if arguments["seed"] is not None
                 else np.random.SeedSequence().entropy,
                 "epoch": 0, "batch": 0, "epoch_logs": {}, "history": {}, "finished": False}
        if saved is None or restart:
            return fresh, False
        same = saved["data"] == data and saved["fit"] == arguments
        if saved["finished"]:
            if not same:
                self._say(verbose, f"The fit saved in {self.state_dir} finished; starting a "
                                   "new fit from its weights.")
                return fresh, False
            return saved, True
        if saved["data"] != data:
            raise ValueError(
                f"Cannot resume the fit saved in {self.state_dir}: it was trained on other "
                f"data (saved: {_describe(saved['data'])}; now: {_describe(data)}). Pass the "
                "same x and y to resume, or restart=True (--restart) to start a new fit from "
                "the saved weights.")
        if saved["fit"] != arguments:
            raise ValueError(
                f"Cannot resume the fit saved in {self.state_dir} with other arguments (saved: "
                f"{saved['fit']}; now: {arguments}); the batches would not line up. Pass the "
                "same arguments to resume, or restart=True (--restart) to start a new fit "
                "from the saved weights.")
        return saved, True

    @staticmethod
    def _say(verbose, text, level=logging.INFO):
        if verbose:
            print(text, flush=True)
        else:
            logger.log(level, text)

    @staticmethod
    def _orders(progress, samples):
        """The order of the samples in each epoch: keras_split's fit(seed=...) order."""
        rng = np.random.default_rng(progress["order_seed"])
        while True:
            yield rng.permutation(samples) if progress["fit"]["shuffle"] else np.arange(samples)

    @staticmethod
    def _batch(progress, order, index):
        size = progress["fit"]["batch_size"]
        return order[index * size:(index + 1) * size]

    def _step(self, x, y, reset_metrics):
        """One training step; returns the server's logs, or the refusal."""
        up, down = self.link.bytes_up, self.link.bytes_down
        activations = self.model.forward([x])
        try:
            gradients, logs = self.link.exchange("train", activations, y,
                                                 reset_metrics=reset_metrics)
        except RejectedError as error:
            return None, error, 0, 0
        self._pending = False
        self.model.train([x], gradients)
        return logs, None, self.link.bytes_up - up, self.link.bytes_down - down

    def _save(self, progress):
        if self.state_dir is None:
            return
        progress.update(session_id=self.link.session_id, step=self.link.step)
        self.model.save(self.state_dir, progress=progress)
        self.progress = progress

    def _finish_pending(self, x, y, data):
        """Apply the step the server took for the saved fit before the device crashed."""
        saved = self.progress
        if saved["data"] != data:
            raise ValueError(
                f"The server applied step {saved['step'] + 1} of the fit saved in "
                f"{self.state_dir}, but the device crashed before applying it, and the data "
                f"differs (saved: {_describe(saved['data'])}; now: {_describe(data)}). Call "
                "fit with the saved fit's data first (restart=True may change the data once "
                "that step is applied).")
        orders = self._orders(saved, len(x))
        for _ in range(saved["epoch"] + 1):
            order = next(orders)
        batch = self._batch(saved, order, saved["batch"])
        _, refused, _, _ = self._step(x[batch], y[batch], reset_metrics=False)
        if refused is not None:
            raise RuntimeError(f"The server refused to resend step {saved['step'] + 1}: "
                               f"{refused}")
        saved.update(batch=saved["batch"] + 1)
        self._save(saved)

    def fit(self, x, y, batch_size=32, epochs=1, shuffle=True, seed=None, verbose=1,
            restart=False):
        """Train on (x, y); returns the history, one value per epoch for each key.

        The keys are the server's logs ("loss", metrics), "refused" (batches
        the server refused and the device skipped), "bytes_up" and
        "bytes_down". With a `state_dir`, a fit that stopped part-way resumes
        from the next batch when called again with the same data and
        arguments; one that finished returns its history at once and trains
        nothing more, unless `restart=True` (which starts a new fit from the
        saved weights).
        """
        x, y = np.asarray(x), np.asarray(y)
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same number of samples, received "
                             f"{len(x)} vs. {len(y)}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, received {batch_size}.")
        data = fingerprint(x, y)
        arguments = {"batch_size": batch_size, "epochs": epochs, "shuffle": bool(shuffle),
                     "seed": seed}
        if self._pending and restart:
            self._finish_pending(x, y, data)
        progress, resumed = self._start(data, arguments, restart, verbose)
        if progress["finished"]:
            self._say(verbose, f"The fit saved in {self.state_dir} already finished ({epochs} "
                               f"epoch(s), step {progress['step']}); nothing to train. Pass "
                               "restart=True (--restart) to train again.")
            return progress["history"]
        if resumed:
            self._say(verbose, f"Resuming the fit at {self._position(progress)}.")
        steps = math.ceil(len(x) / batch_size)
        history = progress["history"]
        orders = self._orders(progress, len(x))
        for epoch in range(epochs):
            order = next(orders)
            if epoch < progress["epoch"]:
                continue
            logs = progress["epoch_logs"]
            counts = {key: logs.pop(key, 0) for key in ("refused", "bytes_up", "bytes_down")}
            for index in range(progress["batch"], steps):
                batch = self._batch(progress, order, index)
                # The server resets its metrics with the epoch's first accepted step.
                step_logs, refused, up, down = self._step(x[batch], y[batch],
                                                          reset_metrics=not logs)
                if refused is not None:
                    counts["refused"] += 1
                    self._say(verbose, f"epoch {epoch + 1}/{epochs}, batch {index + 1}/{steps}: "
                                       f"skipped. {refused}", logging.WARNING)
                else:
                    logs = step_logs
                counts["bytes_up"] += up
                counts["bytes_down"] += down
                progress.update(epoch=epoch, batch=index + 1, epoch_logs={**logs, **counts})
                self._save(progress)
            logs = {**logs, **counts}
            for key in {*history, *logs}:
                history.setdefault(key, [math.nan] * epoch).append(logs.get(key, math.nan))
            progress.update(epoch=epoch + 1, batch=0, epoch_logs={},
                            finished=epoch + 1 == epochs)
            self._save(progress)
            if verbose:
                # Counters (bytes, refused steps) as integers, metrics as numbers.
                shown = ", ".join(f"{k} {int(v):,}" if k in counts else f"{k} {v:.4g}"
                                  for k, v in logs.items())
                print(f"epoch {epoch + 1}/{epochs} ({steps} steps): {shown}", flush=True)
        if not progress["finished"]:  # epochs=0, or every epoch already done
            progress["finished"] = True
            self._save(progress)
        return history

    def evaluate(self, x, y, batch_size=256):
        """The server's loss and metrics on (x, y), with inference-mode activations."""
        if self._pending:
            raise RuntimeError(
                f"The server applied training step {self.progress['step'] + 1} before the "
                f"device crashed; call fit with the same data and arguments to apply it here "
                "too before evaluating.")
        return evaluate_batches(self.model, self.link, x, y, batch_size)

    def close(self):
        self.link.close()
