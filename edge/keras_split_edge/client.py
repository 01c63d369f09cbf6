"""The device's training loop: forward on the device, the cut gradient from the
server, backward and update on the device."""

from __future__ import annotations

import math

import numpy as np

from keras_split_edge.link import ServerLink
from keras_split_edge.runtime import ExportedModel, load


class EdgeClient:
    """Train an exported client half against a keras_split server.

    Args:
        model: an `ExportedModel` or the path of a `.tflite` / `.onnx` export.
        server: "host:port" of the `SplitServer`.
        state_dir: where the device keeps its weights and optimizer state
            between runs; restored on creation if present, saved after every
            epoch of `fit`.
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
        self.state_dir = state_dir
        self.restored = state_dir is not None and self.model.restore(state_dir)
        self.link = ServerLink(server, **link_options)
        self.link.open(self.model.cut_specs)

    def _batches(self, n, batch_size, order):
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]

    def fit(self, x, y, batch_size=32, epochs=1, shuffle=True, seed=None, verbose=1):
        """Train; returns {"loss": [...], ...} per epoch, with bytes_up/bytes_down."""
        x, y = np.asarray(x), np.asarray(y)
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same number of samples, received "
                             f"{len(x)} vs. {len(y)}.")
        rng = np.random.default_rng(seed)  # the same order as keras_split's fit(seed=...)
        history: dict[str, list] = {}
        steps = math.ceil(len(x) / batch_size)
        for epoch in range(epochs):
            order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
            up, down = self.link.bytes_up, self.link.bytes_down
            logs = {}
            for index, batch in enumerate(self._batches(len(x), batch_size, order)):
                activations = self.model.forward([x[batch]])
                gradients, logs = self.link.exchange("train", activations, y[batch],
                                                     reset_metrics=index == 0)
                self.model.train([x[batch]], gradients)
            logs = {**logs, "bytes_up": self.link.bytes_up - up,
                    "bytes_down": self.link.bytes_down - down}
            for key, value in logs.items():
                history.setdefault(key, []).append(value)
            if self.state_dir is not None:
                self.model.save(self.state_dir)
            if verbose:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in logs.items())
                print(f"epoch {epoch + 1}/{epochs} ({steps} steps): {shown}", flush=True)
        return history

    def evaluate(self, x, y, batch_size=256):
        """The server's loss and metrics on (x, y), with inference-mode activations."""
        logs = {}
        x, y = np.asarray(x), np.asarray(y)
        for index, start in enumerate(range(0, len(x), batch_size)):
            activations = self.model.infer([x[start:start + batch_size]])
            _, logs = self.link.exchange("evaluate", activations, y[start:start + batch_size],
                                         reset_metrics=index == 0)
        return logs

    def close(self):
        self.link.close()
