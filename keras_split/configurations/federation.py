"""Many clients: round-robin split learning and SplitFed.

**Round-robin** (Gupta & Raskar 2018): K clients, each with its own data, train
in turn against one server. Before its turn a client receives the latest client
half, either peer to peer from the previous client (`handoff="peer"`: only
clients ever see client weights) or through the server (`handoff="server"`:
simpler to run, but the server then sees the client half's weights). With a
stateless optimizer (SGD) K clients in turn are exactly centralized training on
their data in the same order.

**SplitFed** (Thapa et al. 2022): in each round the K clients train from the
same client half, in parallel in principle; the client halves are then averaged
(FedAvg, weighted by sample counts). SFLv1 keeps one copy of the server half per
client and averages those too; SFLv2 trains one shared server half, the clients'
steps in sequence.

**Dropouts**: a client whose link fails during its turn (`ConnectionError`,
`TimeoutError`) is skipped for the round: its partial client update is
discarded, the round completes with the others, and it takes part again in the
next round. (Server steps it completed before failing stay applied, as they
would on a real server; SFLv1 discards that client's server copy instead.)

Whose turn it is, what a client starts from, the
FedAvg and who is dropped are decided by
`keras_split.configurations.policy.RoundPolicy`, the same policy that
`keras_split.configurations.rounds.RoundCoordinator` runs for client processes;
here it is called one event at a time (the round starts, client i goes, client
i reports or fails, the round ends), and `self.policy` is the last `fit`'s. A
report the policy refuses (non-finite weights after a diverged step, say) is a
dropout like a failed link.

Every client is the one split step of `protocol`: a `ClientRole` and a
transport to a `ServerRole`. Here all parties run in one process.

**Bytes.** Each round's entry in `history` has `"bytes"`: per client, what
it sent (`"up"`) and received (`"down"`) in the round: its link's split steps
(activations, labels, gradients, as its transport counts them) plus the
client-half hand-offs (`"handoff_up"`, `"handoff_down"`, also included in the
totals), as the hand-offs would cross between processes: the client half's
weights once each way per turn (round-robin, and the optimizer's state too
with `handoff_optimizer=True`) or per round (SplitFed: the round's client
half down, the trained one up for FedAvg). A dropped client's row counts
what it sent and received before it dropped. `keras_split.plan` predicts the
same figures (`tests/test_plan.py` checks them equal).
"""

from __future__ import annotations

import logging
import time

import keras
import numpy as np

from keras_split.configurations.policy import RoundError, RoundPolicy, fedavg
from keras_split.roles import ServerRole
from keras_split.split_model import SplitModel
from keras_split.transport import InProcessTransport, Transport

__all__ = ["FAILURES", "RoundRobin", "SplitFed", "fedavg"]

logger = logging.getLogger("keras_split.configurations.federation")
FAILURES = (ConnectionError, TimeoutError)


def _nbytes(arrays) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays))


def _clone(model: keras.Model) -> keras.Model:
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


class _Federation:
    def __init__(self, client: keras.Model, server: keras.Model, clients: int):
        if not isinstance(clients, int) or clients < 1:
            raise ValueError(f"`clients` must be a positive integer, received {clients!r}.")
        self.client_model, self.server_model, self.count = client, server, clients
        self.clients: list[SplitModel] = []
        self.history: list[dict] = []
        self.wrap = None
        self.transports = None
        self.policy: RoundPolicy | None = None

    def _start(self, weights, mode: str, rounds: int) -> RoundPolicy:
        """A policy for one `fit`, every client a member in index order (the
        turn order), so the first round starts at once."""
        self.policy = RoundPolicy(weights, mode, rounds, clients=self.count)
        for index in range(self.count):
            self.policy.join(index, time.monotonic())
        return self.policy

    def _go(self, index: int, number: int):
        turn = self.policy.turn(index, number + 1, time.monotonic())
        if not turn.go:  # the drivers call the policy in its order, so never
            raise RuntimeError(f"Internal error: the round policy did not let client {index} "
                               f"train in round {number + 1} ({self.policy!r}).")
        return turn.weights

    def _train(self, index: int, number: int, party: SplitModel, x, y, *, received: int,
               counts: dict, **options):
        """Client `index`'s turn: `party.fit(x, y, **options)`, reported to the
        policy. A failed link or a refused report drops the client. Its bytes
        this turn go into `counts[index]`: the link's, plus the `received`
        bytes handed to it before the turn and the client half (and
        `_handoff_extra`) it hands on after it.

        Returns:
            The fit's `History`, or None if the client was dropped.
        """
        counter = party.transport.bytes
        before = (counter.up, counter.down)
        sent = 0
        try:
            history = party.fit(x, y, **options)
            weights = party.client.get_weights()
            self.policy.report(index, number + 1, weights, len(x), time.monotonic())
            sent = _nbytes(weights) + self._handoff_extra(party)
        except (*FAILURES, RoundError) as error:
            logger.warning("Client %d dropped out of round %d: %s", index, number + 1, error)
            self.policy.fail(index, time.monotonic())
            history = None
        counts[index] = {"up": counter.up - before[0] + sent,
                         "down": counter.down - before[1] + received,
                         "handoff_up": sent, "handoff_down": received}
        return history

    def _handoff_extra(self, party) -> int:
        """Bytes handed on after a turn besides the client half's weights."""
        return 0

    @staticmethod
    def _round_bytes(counts: dict) -> dict:
        return dict(sorted(counts.items()))

    def _ended(self):
        (ended,) = self.policy.take_round_ends()
        return ended, self.policy.history[ended.round - 1]

    def _link(self, index: int, role) -> Transport:
        transport = self.transports[index] if self.transports else InProcessTransport(role)
        return self.wrap(index, transport) if self.wrap else transport

    def _set_transports(self, transports, loss):
        if transports is None and loss is None:
            raise ValueError("`compile` needs a `loss` for the server half (or `transports` "
                             "to a remote server that has one).")
        if transports is not None and len(transports) != self.count:
            raise ValueError(f"Give one transport per client: {self.count} clients, received "
                             f"{len(transports)}.")
        self.transports = transports

    def bytes_per_client(self) -> dict[int, dict[str, int]]:
        """Each client's bytes over every round of `history` (see the module doc)."""
        total: dict[int, dict[str, int]] = {}
        for entry in self.history:
            for index, row in entry["bytes"].items():
                into = total.setdefault(index, dict.fromkeys(row, 0))
                for key, value in row.items():
                    into[key] += value
        return total

    def _check_shards(self, shards):
        if len(shards) != self.count:
            raise ValueError(f"Give one (x, y) shard per client: {self.count} clients, "
                             f"received {len(shards)} shards.")


class RoundRobin(_Federation):
    """K clients in turn against one server; see the module doc.

    Args:
        client, server: the two halves (`split.client`, `split.server`); each
            client trains its own copy of the client half.
        clients: K.
        handoff: "peer" or "server".
        handoff_optimizer: also hand over the client optimizer's state (Adam's
            moments, step count), so that K clients in turn equal centralized
            training with any optimizer; otherwise each client keeps its own.
    """

    def __init__(self, client, server, clients: int, handoff: str = "peer",
                 handoff_optimizer: bool = False):
        super().__init__(client, server, clients)
        if handoff not in ("peer", "server"):
            raise ValueError(f"`handoff` must be 'peer' or 'server', received {handoff!r}.")
        self.handoff, self.handoff_optimizer = handoff, handoff_optimizer
        self.weights_seen_by: set[str] = set()
        self.latest_optimizer = None

    def compile(self, optimizer="sgd", loss=None, metrics=None, transport_wrapper=None,
                transports=None, nopeek=None):
        """Args:
            optimizer, loss, metrics: as in `SplitModel.compile`.
            nopeek: a `keras_split.privacy.NoPeek(alpha)` every client applies
                to its own batches (see `SplitModel.compile`).
            transport_wrapper: `f(index, transport)` may wrap each client's link
                (to observe it, or to simulate failures).
            transports: one open transport per client to a remote server (e.g.
                `GrpcTransport`s, one session each); the server half and loss
                then live there. By default all run in this process.
        """
        self.wrap = transport_wrapper
        self._set_transports(transports, loss)
        self.server_role = None if transports else ServerRole(self.server_model, optimizer,
                                                              loss, metrics)
        self.clients = []
        for index in range(self.count):
            party = SplitModel(client=_clone(self.client_model), server=self.server_model)
            party.compile(optimizer, transport=self._link(index, self.server_role),
                          nopeek=nopeek)
            self.clients.append(party)
        self.latest = self.client_model.get_weights()

    def fit(self, shards, rounds=1, batch_size=32, shuffle=False, seed=None, verbose=0):
        """Each round, every client trains one epoch on its shard, in turn."""
        self._check_shards(shards)
        self._start(self.latest, "round_robin", rounds)
        for number in range(rounds):
            losses, counts = {}, {}
            for index, (party, (x, y)) in enumerate(zip(self.clients, shards, strict=True)):
                # The hand-off: the latest client half reaches this client.
                self.weights_seen_by.add("server" if self.handoff == "server" else "clients")
                weights = self._go(index, number)
                party.client.set_weights(weights)
                received = _nbytes(weights)
                optimizer = party.client_role.optimizer
                if self.handoff_optimizer and self.latest_optimizer is not None:
                    for variable, value in zip(optimizer.variables, self.latest_optimizer,
                                               strict=True):
                        variable.assign(value)
                    received += _nbytes(self.latest_optimizer)
                history = self._train(index, number, party, x, y, received=received,
                                      counts=counts, batch_size=batch_size,
                                      epochs=1, shuffle=shuffle, seed=seed, verbose=verbose)
                if history is None:
                    continue
                self.latest = self.policy.weights
                if self.handoff_optimizer:
                    self.latest_optimizer = [v.numpy() for v in optimizer.variables]
                losses[index] = history.history["loss"][-1]
            _, record = self._ended()
            self.history.append({"round": number + 1, "dropped": list(record.dropped),
                                 "loss": losses, "bytes": self._round_bytes(counts)})
        self.client_model.set_weights(self.latest)
        return self.history

    def _handoff_extra(self, party) -> int:
        if not self.handoff_optimizer:
            return 0
        return _nbytes([v.numpy() for v in party.client_role.optimizer.variables])


class SplitFed(_Federation):
    """K clients per round from the same client half, then FedAvg; see the module doc.

    Args:
        client, server: the two halves.
        clients: K.
        version: 1 (a server copy per client, averaged too) or 2 (one shared
            server half, trained by the clients' steps in sequence).
    """

    def __init__(self, client, server, clients: int, version: int = 1):
        super().__init__(client, server, clients)
        if version not in (1, 2):
            raise ValueError(f"`version` must be 1 (SFLv1) or 2 (SFLv2), received {version!r}.")
        self.version = version

    def compile(self, optimizer="sgd", loss=None, metrics=None, transport_wrapper=None,
                transports=None, nopeek=None):
        """As `RoundRobin.compile` (`nopeek` included); `transports` (to one shared remote server)
        is for SFLv2 only: SFLv1 averages the server copies, which must then be
        in this process."""
        self.wrap = transport_wrapper
        if transports is not None and self.version == 1:
            raise ValueError("SFLv1 averages one server copy per client, so it runs its "
                             "server copies in this process; use version=2 with remote "
                             "transports.")
        self._set_transports(transports, loss)
        self.clients, self.server_copies, self.server_roles = [], [], []
        for index in range(self.count):
            server = _clone(self.server_model) if self.version == 1 else self.server_model
            if (self.version == 1 or index == 0) and not transports:
                role = ServerRole(server, optimizer, loss, metrics)
            elif transports:
                role = None
            self.server_copies.append(server)
            self.server_roles.append(role)
            party = SplitModel(client=_clone(self.client_model), server=server)
            party.compile(optimizer, transport=self._link(index, role), nopeek=nopeek)
            self.clients.append(party)

    def fit(self, shards, rounds=1, batch_size=32, local_epochs=1, shuffle=False, seed=None,
            verbose=0):
        """Each round: every client trains `local_epochs` on its shard from the
        round's client half (and server half, SFLv1); then both are averaged."""
        self._check_shards(shards)
        self._start(self.client_model.get_weights(), "splitfed", rounds)
        for number in range(rounds):
            start_server = self.server_model.get_weights()
            # SplitFed: every client goes when the round starts, from the same
            # client half; here they then train one after the other.
            starts = [self._go(index, number) for index in range(self.count)]
            servers, counts = {}, {}
            for index, party in enumerate(self.clients):
                x, y = shards[index]
                party.client.set_weights(starts[index])
                if self.version == 1:
                    self.server_copies[index].set_weights(start_server)
                history = self._train(index, number, party, x, y,
                                      received=_nbytes(starts[index]), counts=counts,
                                      batch_size=batch_size, epochs=local_epochs,
                                      shuffle=shuffle, seed=seed, verbose=verbose)
                if history is not None:
                    servers[index] = self.server_copies[index].get_weights()
            ended, record = self._ended()
            if not ended.counts:
                raise ValueError("No weights to average: every client dropped out of the round.")
            self.client_model.set_weights(ended.weights)
            if self.version == 1:  # the server copies, with the same FedAvg weights
                self.server_model.set_weights(fedavg([servers[i] for i in ended.counts],
                                                     list(ended.counts.values())))
            self.history.append({"round": number + 1, "dropped": list(record.dropped),
                                 "clients": len(ended.counts),
                                 "bytes": self._round_bytes(counts)})
        return self.history
