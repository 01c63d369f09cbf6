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

import dataclasses
import threading

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
        logs = {}
        for number, (role, context) in enumerate(zip(self.roles, contexts, strict=True)):
            count = len(context.activations)
            role.backward(context, reply.gradients[start:start + count])
            start += count
            # Each party's own objective logs (NoPeek's dCor of its inputs), by party.
            logs.update({f"{name}_party_{number}": float(value)
                         for name, value in context.logs.items()})
        if logs:
            reply = dataclasses.replace(reply, logs={**reply.logs, **logs})
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

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, loss_weights=None,
                nopeek=None):
        """Configure the parties and the server, in process.

        Args:
            optimizer: each party and the server get their own copy.
            loss, metrics, loss_weights: computed by the server.
            nopeek: a `keras_split.privacy.NoPeek(alpha)`: each party also
                minimises the distance correlation between its own inputs and
                its own cut activations (it never sees another party's).
        """
        if loss is None:
            raise ValueError("`compile` needs a `loss`: the server computes it.")
        self.server_role = ServerRole(self.server, optimizer, loss, metrics, loss_weights)
        self.client_role = PartiesRole([ClientRole(p, optimizer, objective=nopeek)
                                        for p in self.parties])
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


class GatherRole:
    """The server of vertically partitioned training over the network.

    Each party opens its own session and sends, for every step, its own cut
    tensors and the batch's sample IDs (in the labels field: the parties hold
    no labels). When every party's message for a step has arrived, the server
    checks that they describe the same samples, looks up the labels it holds by
    sample ID, runs its `ServerRole` once on all the cut tensors, and answers
    each party with its own slice of the cut gradients. A party that does not
    show up within `timeout` seconds fails the step for all (ABORTED).

    A step is a transaction, as the `ServerRole`'s: sample IDs that are not
    rows of the label table, a party sending other than its share of the cut,
    or anything its `ServerRole` refuses fails the step for every party and
    changes nothing.

    Args:
        role: the `ServerRole` of the server half (inputs in party order).
        parties: the client ids of the parties, in the order of the server
            half's inputs; `shares[i]` cut tensors belong to party i (one each
            by default).
        labels: the labels, indexed by sample ID (an array, or a dict of arrays
            for several outputs).
    """

    def __init__(self, role: ServerRole, parties: list[str], labels, shares=None,
                 timeout: float = 60.0):
        self.role, self.parties, self.labels, self.timeout = role, list(parties), labels, timeout
        self.shares = list(shares or [1] * len(parties))
        self.starts = [sum(self.shares[:i]) for i in range(len(self.shares))]
        self._condition = threading.Condition()
        self._pending: dict[tuple, dict] = {}
        self._done: dict[tuple, object] = {}

    @property
    def model(self):
        return self.role.model

    def _slot(self, client_id) -> int:
        if client_id not in self.parties:
            raise ValueError(f"Client {client_id!r} is not one of this server's parties "
                             f"{self.parties}.")
        return self.parties.index(client_id)

    def specs_for(self, client_id, specs):
        slot = self._slot(client_id)
        return specs[self.starts[slot]: self.starts[slot] + self.shares[slot]]

    def _lookup(self, ids):
        # The IDs come from the parties: refuse anything but row numbers of the
        # label table (a negative ID would silently pick a row from the end).
        ids = np.asarray(ids).reshape(-1)
        rows = len(keras.tree.flatten(self.labels)[0])
        if ids.dtype.kind not in "iuf" or not np.all(np.isfinite(ids)) or (
                ids.size and (ids.min() < 0 or ids.max() >= rows
                              or not np.array_equal(ids, np.floor(ids)))):
            shown = ids[:8].tolist() if ids.dtype.kind in "biuf" else ids.dtype.name
            raise ValueError(f"The sample IDs (sent in `labels`) must be integers in [0, {rows}), "
                             f"the rows of the server's labels; received {shown}.")
        index = ids.astype(np.int64)
        return keras.tree.map_structure(lambda table: np.asarray(table)[index], self.labels)

    def handle_from(self, client_id, message):
        slot = self._slot(client_id)
        key = (message.mode, message.step)
        with self._condition:
            arrived = self._pending.setdefault(key, {})
            arrived[slot] = message
            if len(arrived) == len(self.parties):
                del self._pending[key]
                self._done[key] = self._run(arrived)
                self._condition.notify_all()
            elif not self._condition.wait_for(lambda: key in self._done, self.timeout):
                self._pending.pop(key, None)
                missing = [self.parties[i] for i in range(len(self.parties))
                           if i not in arrived]
                raise TimeoutError(f"Step {message.step} ({message.mode}) is missing parties "
                                   f"{missing} after {self.timeout:g} s.")
            outcome = self._done[key]
            outcome["left"] -= 1
            if not outcome["left"]:
                del self._done[key]
        if isinstance(outcome["reply"], Exception):
            raise outcome["reply"]
        reply = outcome["reply"]
        start, share = self.starts[slot], self.shares[slot]
        return dataclasses.replace(reply, gradients=tuple(reply.gradients[start:start + share]))

    def _run(self, arrived):
        messages = [arrived[i] for i in range(len(self.parties))]
        first = messages[0]
        try:
            for party, message, share in zip(self.parties, messages, self.shares, strict=True):
                if len(message.tensors) != share:
                    raise ValueError(f"Party {party!r} sent {len(message.tensors)} cut tensors; "
                                     f"expected its share of {share}.")
            ids = [None if m.labels is None else np.asarray(m.labels).reshape(-1)
                   for m in messages]
            if first.mode != "predict":
                if any(i is None for i in ids) or any(not np.array_equal(ids[0], i)
                                                      for i in ids[1:]):
                    raise ValueError("The parties sent different sample IDs for one step: "
                                     "their batches are not aligned.")
            labels = None if first.mode == "predict" else self._lookup(ids[0])
            tensors = tuple(t for m in messages for t in m.tensors)
            reply = self.role.handle(dataclasses.replace(
                first, tensors=tensors, labels=labels, sample_weight=None,
                reset_metrics=any(m.reset_metrics for m in messages)))
        except Exception as error:  # every waiting party gets the same error
            reply = error
        return {"reply": reply, "left": len(self.parties)}

    def state(self):
        return self.role.state()

    def restore(self, arrays, path) -> None:
        self.role.restore(arrays, path)
