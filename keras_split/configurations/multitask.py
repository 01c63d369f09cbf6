"""Multi-task split learning: one client body, several server heads.

`split_multitask(model, cut)` cuts a multi-output model: the client keeps the
body up to the cut; each output becomes a head, possibly on its own server,
with its own labels, loss and optimizer. A training step is the one split step
with a `FanOut` transport: the cut activations go to every head with that
head's labels, and the client receives the sum of the heads' cut gradients
(the gradient of the sum of the losses, as the unsplit model's).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_split import trainer
from keras_split.messages import Activations, Reply
from keras_split.partition import build_halves
from keras_split.roles import ClientRole, ServerRole
from keras_split.transport import InProcessTransport, Transport


class FanOut(Transport):
    """Sends each message to several heads; sums their cut gradients.

    `labels` of a message must be a dict with one entry per head. Logs come
    back as `loss` (the sum of the heads' losses) and `<head>_<name>` for each
    head's own loss and metrics; predictions as a dict by head.
    """

    def __init__(self, heads: dict[str, Transport]):
        super().__init__()
        if not heads:
            raise ValueError("`heads` must name at least one head transport.")
        self.heads = dict(heads)

    def _exchange(self, message: Activations):
        gradients, logs, outputs = None, {"loss": 0.0}, {}
        sent = received = 0
        for name, transport in self.heads.items():
            labels = None
            if message.labels is not None:
                if not isinstance(message.labels, dict) or name not in message.labels:
                    raise ValueError(f"Multi-task labels must be a dict with an entry for each "
                                     f"head {sorted(self.heads)}; received "
                                     f"{type(message.labels).__name__}.")
                labels = message.labels[name]
            up, down = transport.bytes.snapshot()
            reply = transport.exchange(dataclasses.replace(message, labels=labels))
            sent += transport.bytes.up - up
            received += transport.bytes.down - down
            if reply.gradients:
                gradients = reply.gradients if gradients is None else tuple(
                    np.add(a, b) for a, b in zip(gradients, reply.gradients, strict=True))
            for key, value in reply.logs.items():
                logs[f"{name}_{key}"] = value
            logs["loss"] += reply.logs.get("loss", 0.0)
            outputs[name] = reply.outputs
        if message.mode == "predict":
            logs = {}
        reply = Reply(step=message.step, gradients=gradients or (), logs=logs,
                      outputs=outputs if message.mode == "predict" else None)
        return reply, sent, received


class MultiTaskSplit(trainer.LoopOwner):
    """A client body and named heads; see `split_multitask`."""

    def __init__(self, client: keras.Model, heads: dict[str, keras.Model], cut_specs):
        super().__init__()
        self.client, self.heads, self.cut_specs = client, dict(heads), cut_specs
        self.head_roles: dict[str, ServerRole] = {}

    @property
    def layers(self):
        return list(self.client.layers)

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, transports=None):
        """`loss` and `metrics`: dicts by head name (or one loss for all heads).
        `transports`: dict by head name of transports to remote heads; heads not
        named there run in this process."""
        if loss is None:
            raise ValueError("`compile` needs a `loss`: a dict by head name, or one for all.")
        losses = loss if isinstance(loss, dict) else {name: loss for name in self.heads}
        metrics = metrics if isinstance(metrics, dict) else {n: metrics for n in self.heads}
        unknown = set(losses) - set(self.heads)
        if unknown or set(self.heads) - set(losses):
            raise ValueError(f"`loss` must name every head {sorted(self.heads)}; received "
                             f"{sorted(losses)}.")
        remote = dict(transports or {})
        links = {}
        for name, head in self.heads.items():
            if name in remote:
                links[name] = remote[name]
                continue
            self.head_roles[name] = ServerRole(head, optimizer, losses[name], metrics.get(name))
            links[name] = InProcessTransport(self.head_roles[name])
        self.client_role = ClientRole(self.client, optimizer)
        self.client_role.build()
        self.transport = FanOut(links)


def split_multitask(model: keras.Model, cut) -> MultiTaskSplit:
    """Cut a multi-output model into a client body and one head per output.

    The heads may not share layers after the cut (each head is trained by its
    own party); outputs are named by the model's output names.
    """
    client, server, specs = build_halves(model, cut)
    # Dict outputs keep their keys as head names; list outputs use the names of
    # the layers that produce them.
    structure = server._outputs_struct
    if isinstance(structure, dict):
        names, outputs = list(structure), list(structure.values())
    else:
        outputs = list(server.outputs)
        names = [t._keras_history[0].name for t in outputs]
    if len(outputs) < 2:
        raise ValueError(f"Multi-task learning needs a model with several outputs; this one "
                         f"has {len(outputs)}. Use `split` for a single task.")
    heads, owners = {}, {}
    for name, output in zip(names, outputs, strict=True):
        inputs = server.inputs[0] if len(server.inputs) == 1 else server.inputs
        head = keras.Model(inputs, output, name=f"head_{name}")
        for layer in head.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if id(layer) in owners:
                raise ValueError(f"Layer {layer.name!r} is shared by heads {owners[id(layer)]!r} "
                                 f"and {name!r}; each head must own its layers. Cut after it.")
            owners[id(layer)] = name
        heads[name] = head
    return MultiTaskSplit(client, heads, specs)
