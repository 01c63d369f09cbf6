"""One step of split learning, written as its protocol.

1. The client runs its half on a batch, under its own gradient tape, and sends
   the cut tensors (values only) with the labels to the server.
2. The server runs its half and the loss under its own tape, updates its
   weights, and replies with the gradient of the loss at the cut.
3. The client finishes backpropagation from that gradient
   (`tape.gradient(..., output_gradients=...)`) and updates its weights.

The server never sees raw inputs, the client's weights or its graph; the client
never sees the server's weights. Only the cut tensors, the labels and the cut
gradients cross, through the transport, which counts their bytes.

Each function returns the server's reply and the client's own regularization
loss: the loss Keras reports includes every layer's regularization, and only
the client can compute its share.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_split.messages import Activations, Reply, payload_bytes
from keras_split.roles import ClientRole
from keras_split.transport import InProcessTransport, Transport


def _values(tensors) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(t) for t in tensors)


def train_step(client: ClientRole, transport: Transport, step: int, x, y, sample_weight=None,
               reset_metrics: bool = False) -> tuple[Reply, float]:
    """One training step across the cut; returns the server's reply."""
    if isinstance(client, ClientRole) and isinstance(transport, InProcessTransport) \
            and transport.fuses:
        return _fused_train_step(client, transport, step, x, y, sample_weight, reset_metrics)

    def send(activations):                                             # 2 (at the cut)
        return transport.exchange(Activations(step, "train", activations, labels=y,
                                              sample_weight=sample_weight,
                                              reset_metrics=reset_metrics))

    # 1 and 3: the client's forward and backward, compiled as one call that
    # runs `send` when the forward pass reaches the cut.
    return client.step(x, send)


def separate_train_step(client: ClientRole, transport: Transport, step: int, x, y,
                        sample_weight=None, reset_metrics: bool = False) -> tuple[Reply, float]:
    """The same step with the client's halves as two calls (see `ClientRole`)."""
    context = client.forward(x)                                        # 1
    message = Activations(step, "train", _values(context.activations), labels=y,
                          sample_weight=sample_weight, reset_metrics=reset_metrics)
    reply = transport.exchange(message)                                # 2
    client.backward(context, reply.gradients)                          # 3
    return reply, float(context.regularization)


def evaluate_step(client: ClientRole, transport: Transport, step: int, x, y, sample_weight=None,
                  reset_metrics: bool = False) -> tuple[Reply, float]:
    """Forward only: the server updates its metrics and replies with them."""
    activations, regularization = client.infer(x)
    message = Activations(step, "evaluate", _values(activations),
                          labels=y, sample_weight=sample_weight, reset_metrics=reset_metrics)
    return transport.exchange(message), float(regularization)


def predict_step(client: ClientRole, transport: Transport, step: int, x) -> Reply:
    """Forward only: the server replies with the model outputs."""
    activations, _ = client.infer(x)
    return transport.exchange(Activations(step, "predict", _values(activations)))


def _fused_train_step(client, transport, step, x, y, sample_weight, reset_metrics):
    """`train_step` with both halves in one compiled call (in process, no codec).

    The same bytes are counted as if the message and its reply had crossed:
    the cut values up with the labels and sample weights, their gradients down.
    """
    batch = len(keras.tree.flatten(x)[0])
    placeholder = (np.empty((batch, 0), np.float32),)
    message = Activations(step, "train", placeholder, labels=y, sample_weight=sample_weight,
                          reset_metrics=reset_metrics)
    reply, regularization = client.fused_step(x, transport.server, message)
    if reply.step == step:
        cut = batch * sum(int(np.prod(o.shape[1:])) * np.dtype(o.dtype).itemsize
                          for o in client.model.outputs)
        transport.bytes.up += cut + payload_bytes(y, sample_weight)
        transport.bytes.down += cut
    return reply, regularization
