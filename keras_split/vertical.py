"""Vertically partitioned data: several parties hold different features (or
modalities) of the same patients, aligned by sample; the server merges their
cut activations and holds the labels.

`split_vertical(model, cuts)` takes a multi-input model and one cut per input
branch (the branches must not mix before their cuts) and gives each party the
branch from its input to its cut. A step is the one split step: each party's
`ClientRole` runs its forward pass, the server receives all cut tensors of the
batch in one message, and each party finishes backpropagation from its own
slice of the server's cut gradients. The merge (concatenate, sum, mean, ...)
is the model's own layer after the cuts, on the server.

Here all parties run in one process (`fit` takes one input array per party,
rows aligned); each party sees only its own inputs, weights and gradients.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_split import trainer
from keras_split.graph import read_graph, tensor_key
from keras_split.partition import build_halves
from keras_split.roles import ClientRole, ServerRole
from keras_split.transport import InProcessTransport


class PartiesRole:
    """Several parties' `ClientRole`s acting as one client of the server."""

    def __init__(self, roles: list[ClientRole]):
        self.roles = roles

    @property
    def optimizer(self):
        return self.roles[0].optimizer

    def build(self) -> None:
        for role in self.roles:
            role.build()

    def step(self, inputs, send):
        contexts = [role.forward(x) for role, x in zip(self.roles, inputs, strict=True)]
        activations = tuple(np.asarray(a) for c in contexts for a in c.activations)
        reply = send(activations)
        start = 0
        for role, context in zip(self.roles, contexts, strict=True):
            count = len(context.activations)
            role.backward(context, reply.gradients[start:start + count])
            start += count
        return reply, float(sum(float(c.regularization) for c in contexts))

    def infer(self, inputs):
        results = [role.infer(x) for role, x in zip(self.roles, inputs, strict=True)]
        activations = tuple(a for acts, _ in results for a in acts)
        return activations, sum(float(r) for _, r in results)


class VerticalSplit(trainer.LoopOwner):
    """One branch per party and a merging server; see `split_vertical`."""

    def __init__(self, parties: list[keras.Model], server: keras.Model, cut_specs):
        super().__init__()
        self.parties, self.server, self.cut_specs = parties, server, cut_specs
        self.server_role = None

    @property
    def layers(self):
        return [layer for party in self.parties for layer in party.layers]

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, loss_weights=None):
        if loss is None:
            raise ValueError("`compile` needs a `loss`: the server computes it.")
        self.server_role = ServerRole(self.server, optimizer, loss, metrics, loss_weights)
        self.client_role = PartiesRole([ClientRole(p, optimizer) for p in self.parties])
        self.client_role.build()
        self.transport = InProcessTransport(self.server_role)

    def merge(self) -> keras.Model:
        inputs = [p.inputs[0] for p in self.parties]
        return keras.Model(inputs, self.server([p(i) for p, i in zip(self.parties, inputs,
                                                                      strict=True)]))


def split_vertical(model: keras.Model, cuts) -> VerticalSplit:
    """Cut a multi-input model at one layer per input branch.

    Args:
        model: a functional model with one input per party.
        cuts: one layer name per input, in `model.inputs` order.
    """
    if len(cuts) != len(model.inputs):
        raise ValueError(f"Give one cut per input: the model has {len(model.inputs)} inputs "
                         f"({[t.name for t in model.inputs]}), received {len(cuts)} cuts.")
    client, server, specs = build_halves(model, list(cuts))
    graph = read_graph(client)
    parties = []
    for number, (inp, out) in enumerate(zip(client.inputs, client.outputs, strict=True)):
        needed = graph.ancestors([out])
        sources = [t.name for t in client.inputs
                   if id(graph.producer[tensor_key(t)]) in needed]
        if sources != [inp.name]:
            raise ValueError(
                f"Cut {cuts[number]!r} must depend on input {inp.name!r} only (one branch per "
                f"party), but it depends on {sources}. Cut each branch before branches mix.")
        parties.append(keras.Model(inp, out, name=f"party_{number}"))
    return VerticalSplit(parties, server, specs)
