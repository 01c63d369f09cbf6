"""Beside Flower: Flower runs the rounds, keras_split's gRPC carries every split step.

Flower (flwr) is the engine many federated deployments already run: its
SuperLink and SuperNodes manage the nodes (who is connected, who takes part)
and authenticate them. Here Flower runs round-robin or SplitFed rounds of
split learning, and each node's training steps travel, as always, over
keras_split's own gRPC to one `SplitServer`:

- **The ServerApp** (`SplitRounds.server_app()`) starts a `SplitServer` with the
  shared server half (SplitFed v2 / vanilla split learning) in its own process,
  once, and stops it at the end. It makes one bearer token per node. Each
  round it sends each node, as a Flower Message, the round's client half
  (SplitFed: the FedAvg of the last round's client halves; round-robin: the
  previous client's, the nodes in turn), the split server's address, the
  node's token and, with `handoff_optimizer`, the client optimizer's state. It
  takes the replies (weights and sample count) and aggregates them: FedAvg
  weighted by samples (SplitFed), or passes them on (round-robin).
- **The ClientApp** (`client_app(...)`) loads the node's shard, builds the client
  half, sets the weights, restores its optimizer's state, trains with
  `SplitClient.fit` over keras_split's gRPC (TLS unless told otherwise), and
  replies with its weights and sample count.

A Flower Message per split step is no option: on loopback a 100 kB round trip
costs about 100 ms in Flower's simulation engine and 3-9 s through a SuperLink,
against 1.7 ms for a keras_split step. So Flower carries one message each way
per node and round; the steps never touch it.

**Who decides.** Whose turn it is, what a node starts from, the FedAvg and who is
dropped are decided by `keras_split.configurations.policy.RoundPolicy`, the
policy of the in-process `RoundRobin`/`SplitFed` and of the network
`RoundCoordinator`: the nodes are its members in the order they were first
seen (node ids ascending within a round), a node that replies with an error,
does not reply within `round_timeout`, or is not connected when its turn comes
is dropped for that turn (round-robin) or round (SplitFed) and takes part again
in the next one; a reply the policy refuses (non-finite weights, wrong shapes)
is a dropout too.

**The client optimizer's state** (Adam's moments and step count) is kept on the
node, in Flower's `Context.state`, across rounds: each node's optimizer goes on
from where its last round left it, as each client's does in the in-process
`SplitFed` and `RoundRobin` (it never leaves the node). With
`handoff_optimizer=True` (round-robin) it travels with the client half instead,
through the ServerApp, as `RoundRobin(handoff_optimizer=True)` hands it over.

**Equal to the in-process drivers.** Round-robin, and SplitFed with
`sequential=True` (the nodes one after another, in node-id order, as the
in-process `SplitFed` trains them), run the same steps in the same order as
`keras_split.RoundRobin` / `keras_split.SplitFed(version=2)` on the shards in
that order, so they give the same weights (tests/test_flower.py, with Adam, in
Flower's simulation engine). By default SplitFed sends every node its message
at once: the nodes train concurrently, their steps interleaved on the shared
server half in arrival order, as SFLv2 runs on a real server.

Limits:

- The SuperNodes must reach the split server's port (`advertise`), besides the
  SuperLink's: the steps do not go through Flower.
- Only nodes connected when the ServerApp starts get a token and take part
  (a `SplitServer`'s tokens are fixed when it starts); a later node is left out
  with a warning.
- Each node opens one session per round on the split server, so the server is
  started with `max_sessions_per_client=rounds + 1` unless told otherwise.
- Through a SuperLink, a node's ClientApp may run in a fresh process each round
  (SuperNode's process isolation): TensorFlow then starts, and the client
  half is built, once per round. The simulation engine keeps its actors' processes.
- Tokens and client weights cross Flower's channel, so the SuperLink (and
  whoever runs it) can read them, as it reads the model of any FedAvg.
- SFLv1 (one server copy per client, averaged) is not offered here; use the
  network `RoundCoordinator` with a `PerClientRole` for it.

See docs/flower.md for running it with a real SuperLink and SuperNodes.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from keras_split_wire.optional import require

require("flwr", "keras_split.flower", "keras-split[flower]")

from flwr.app import (  # noqa: E402 (after the check that says how to install it)
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from keras_split.configurations.policy import RoundError, RoundPolicy  # noqa: E402

__all__ = ["MESSAGE_TYPE", "SplitRounds", "client_app"]

logger = logging.getLogger("keras_split.flower")

# The Flower message type of a split-learning turn (category "train", action "split").
MESSAGE_TYPE = "train.split"
# Where the ClientApp keeps its optimizer's state between rounds (Context.state).
STATE_KEY = "keras-split.optimizer"
MODES = ("splitfed", "round_robin")


def _halves(split):
    """(client half, server half) from a SplitModel, a pair, or a callable returning either."""
    if callable(split) and not hasattr(split, "client"):
        split = split()
    if hasattr(split, "client") and hasattr(split, "server"):
        return split.client, split.server
    client, server = split
    return client, server


def _pem(value) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class SplitRounds:
    """The ServerApp's side: Flower's rounds around one `SplitServer`; see the module doc.

    Args:
        split: the model cut in two: a `SplitModel` (`keras_split.split(...)`),
            a `(client_half, server_half)` pair, or a callable returning one
            (called when the ServerApp starts, so the ServerApp's process builds
            it). The client half gives the first round's weights; the server
            half is trained in place by the `SplitServer`.
        loss, optimizer, metrics: the server half's, as in `SplitServer`.
        mode: "splitfed" (every node trains from the round's client half, then
            FedAvg) or "round_robin" (the nodes in turn, each from the previous
            one's client half).
        rounds: how many rounds.
        min_nodes: how many nodes must be connected before the first round;
            the ServerApp waits up to `wait_for_nodes` seconds for them.
        sequential: SplitFed only: send the nodes their turn one after another
            (node-id order), as the in-process `SplitFed` trains them, instead
            of all at once. Round-robin is always one at a time.
        handoff_optimizer: round-robin only: hand the client optimizer's state
            to the next node with the weights (through the ServerApp), as
            `RoundRobin(handoff_optimizer=True)`; otherwise each node keeps its own.
        address: where the split server listens ("host:port"; port 0 picks one).
        advertise: the "host:port" the nodes connect to; by default the
            listening host (127.0.0.1 for 0.0.0.0) and the actual port.
        certificate, private_key: the split server's TLS certificate and key
            (PEM bytes or paths). TLS is on unless `insecure=True`.
        root_certificates: the CA (PEM bytes or path) that signed the split
            server's certificate, sent to the nodes with each turn; nodes given
            their own (`client_app(root_certificates=...)`) use theirs.
        insecure: serve the split steps without TLS (loopback tests only).
        round_timeout: seconds to wait for a node's reply (None: no limit); a
            node that does not reply in time is dropped for the turn or round.
        on_round_end: `f(record, weights)` called after each round with the
            round's entry of `history` and the client half the next round starts from.
        **server_options: passed on to `SplitServer` (max_batch_size,
            max_workers, checkpoint_dir, allowed_compression, ...).

    Attributes:
        history: one dict per round: "round", "trained" (node ids in the
            order they reported), "dropped", "samples" and "loss" (per node id),
            "metrics" (each reply's metrics, per node id).
        weights: the client half after the last round.
        server_model: the server half (trained in place).
        nodes: the node ids that took part, in turn order.
        address: the address the nodes were sent (once started).
    """

    def __init__(self, split, loss=None, optimizer="rmsprop", metrics=None, *,
                 mode: str = "splitfed", rounds: int = 1, min_nodes: int = 1,
                 wait_for_nodes: float = 60.0, sequential: bool = False,
                 handoff_optimizer: bool = False, address: str = "127.0.0.1:0",
                 advertise: str | None = None, certificate=None, private_key=None,
                 root_certificates=None, insecure: bool = False,
                 round_timeout: float | None = None,
                 on_round_end: Callable[[dict, list], None] | None = None, **server_options):
        if mode not in MODES:
            raise ValueError(f"`mode` must be 'splitfed' or 'round_robin', received {mode!r}.")
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"`rounds` must be a positive integer, received {rounds!r}.")
        if not isinstance(min_nodes, int) or min_nodes < 1:
            raise ValueError(f"`min_nodes` must be a positive integer, received {min_nodes!r}.")
        if handoff_optimizer and mode != "round_robin":
            raise ValueError("`handoff_optimizer` is for round-robin: in SplitFed every node "
                             "keeps its own optimizer state.")
        if not insecure and (certificate is None or private_key is None):
            raise ValueError("TLS is on by default: pass the split server's `certificate` and "
                             "`private_key` (and `root_certificates` for the nodes), or "
                             "insecure=True for loopback tests.")
        self.split, self.loss, self.optimizer, self.metrics = split, loss, optimizer, metrics
        self.mode, self.rounds, self.min_nodes = mode, rounds, min_nodes
        self.wait_for_nodes, self.sequential = wait_for_nodes, sequential
        self.handoff_optimizer = handoff_optimizer
        self.listen, self.advertise = address, advertise
        self.certificate, self.private_key = certificate, private_key
        self.root_certificates = _pem(root_certificates)
        self.insecure, self.round_timeout = insecure, round_timeout
        self.on_round_end = on_round_end
        self.server_options = server_options
        self.history: list[dict] = []
        self.weights: list[np.ndarray] | None = None
        self.server_model = None
        self.nodes: list[int] = []
        self.address: str | None = None
        self.policy: RoundPolicy | None = None

    def server_app(self) -> ServerApp:
        """A Flower `ServerApp` whose main runs these rounds."""
        app = ServerApp()
        app.main()(self.main)
        return app

    # -- the ServerApp's main ------------------------------------------------------

    def main(self, grid: Grid, context: Context) -> None:
        """The ServerApp's main: start the split server, run the rounds, stop it."""
        from keras_split.network.server import SplitServer

        client_half, server_half = _halves(self.split)
        self.server_model = server_half
        nodes = self._wait_for_nodes(grid)
        tokens = {node: secrets.token_urlsafe(32) for node in nodes}
        options = {"max_sessions_per_client": self.rounds + 1, **self.server_options}
        server = SplitServer(server_half, self.loss, self.optimizer, self.metrics,
                             tokens={token: f"node-{node}" for node, token in tokens.items()},
                             address=self.listen, certificate=self.certificate,
                             private_key=self.private_key, insecure=self.insecure,
                             **options).start()
        try:
            self.address = self.advertise or _advertised(self.listen, server.port)
            logger.info("Split server on %s for Flower nodes %s (%s, %d rounds).",
                        self.address, nodes, self.mode, self.rounds)
            self._run(grid, client_half.get_weights(), nodes, tokens)
        finally:
            server.stop()
        context.state["keras-split.weights"] = ArrayRecord(list(self.weights))

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.wait_for_nodes
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.min_nodes:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} Flower nodes connected within "
                                   f"{self.wait_for_nodes:g} s; min_nodes={self.min_nodes}.")
            time.sleep(0.2)

    def _run(self, grid: Grid, weights, nodes: list[int], tokens: dict[int, str]) -> None:
        self.nodes = list(nodes)
        policy = RoundPolicy(weights, self.mode, self.rounds, clients=len(nodes))
        self.policy = policy
        for node in nodes:
            policy.join(node, time.monotonic())
        optimizer_state: list[np.ndarray] | None = None
        for number in range(1, self.rounds + 1):
            connected = set(grid.get_node_ids())
            late = sorted(connected - set(tokens))
            if late:
                logger.warning("Flower nodes %s connected after the split server started; "
                               "they have no token and do not take part.", late)
            record = {"round": number, "trained": [], "dropped": [], "samples": {},
                      "loss": {}, "metrics": {}}
            if self.mode == "splitfed":
                self._splitfed_round(grid, policy, number, connected, tokens, record)
            else:
                optimizer_state = self._round_robin_round(grid, policy, number, connected,
                                                          tokens, record, optimizer_state)
            (ended,) = policy.take_round_ends()
            record["dropped"] = list(policy.history[number - 1].dropped)
            self.weights = [np.array(w) for w in ended.weights]
            self.history.append(record)
            logger.info("Round %d: trained %s, dropped %s.", number, record["trained"],
                        record["dropped"])
            if self.on_round_end is not None:
                self.on_round_end(record, self.weights)

    def _message(self, grid: Grid, node: int, number: int, weights, token: str,
                 optimizer_state=None) -> Message:
        config = {"server": self.address, "token": token, "round": number,
                  "insecure": self.insecure, "handoff-optimizer": self.handoff_optimizer}
        if self.root_certificates is not None:
            config["root-certificates"] = self.root_certificates
        content = RecordDict({"weights": ArrayRecord([np.asarray(w) for w in weights]),
                              "split": ConfigRecord(config)})
        if optimizer_state is not None:
            content["optimizer"] = ArrayRecord(list(optimizer_state))
        return Message(content, dst_node_id=node, message_type=MESSAGE_TYPE,
                       group_id=str(number))

    def _exchange(self, grid: Grid, messages: list[Message]) -> dict[int, Message]:
        replies = grid.send_and_receive(messages, timeout=self.round_timeout)
        return {reply.metadata.src_node_id: reply for reply in replies}

    def _take(self, policy: RoundPolicy, node: int, number: int, reply: Message | None,
              record: dict) -> Message | None:
        """Report `node`'s reply to the policy, or drop the node; the reply if taken."""
        now = time.monotonic()
        if reply is None or reply.has_error():
            why = "no reply" if reply is None else reply.error.reason
            logger.warning("Node %d dropped out of round %d: %s", node, number, why)
            policy.fail(node, now)
            return None
        try:
            metrics = dict(reply.content["metrics"])
            samples = metrics["num-examples"]
            weights = reply.content["weights"].to_numpy_ndarrays()
            policy.report(node, number, weights, samples, now)
        except (KeyError, TypeError, RoundError) as error:
            logger.warning("Node %d dropped out of round %d: its reply was refused: %s",
                           node, number, error)
            policy.fail(node, now)
            return None
        record["trained"].append(node)
        record["samples"][node] = int(samples)
        record["loss"][node] = metrics.get("loss")
        record["metrics"][node] = metrics
        return reply

    def _splitfed_round(self, grid, policy, number, connected, tokens, record) -> None:
        going = {}
        for node in list(policy.members):
            turn = policy.turn(node, number, time.monotonic())
            if node not in connected:
                policy.fail(node, time.monotonic())
                logger.warning("Node %d dropped out of round %d: not connected.", node, number)
            elif turn.go:
                going[node] = self._message(grid, node, number, turn.weights, tokens[node])
        if self.sequential:
            for node, message in going.items():
                self._take(policy, node, number, self._exchange(grid, [message]).get(node),
                           record)
        else:
            replies = self._exchange(grid, list(going.values()))
            for node in going:
                self._take(policy, node, number, replies.get(node), record)

    def _round_robin_round(self, grid, policy, number, connected, tokens, record,
                           optimizer_state):
        for node in list(policy.members):
            turn = policy.turn(node, number, time.monotonic())
            if not turn.go:  # called in the policy's order, so never
                raise RuntimeError(f"Internal error: the round policy did not let node {node} "
                                   f"train in round {number} ({policy!r}).")
            if node not in connected:
                policy.fail(node, time.monotonic())
                logger.warning("Node %d dropped out of round %d: not connected.", node, number)
                continue
            message = self._message(grid, node, number, turn.weights, tokens[node],
                                    optimizer_state if self.handoff_optimizer else None)
            reply = self._take(policy, node, number, self._exchange(grid, [message]).get(node),
                               record)
            if reply is not None and self.handoff_optimizer and "optimizer" in reply.content:
                optimizer_state = reply.content["optimizer"].to_numpy_ndarrays()
        return optimizer_state


def _advertised(listen: str, port: int) -> str:
    host = listen.rsplit(":", 1)[0]
    if host in ("0.0.0.0", "[::]", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


def _optimizer_factory(optimizer):
    """A picklable recipe for a fresh optimizer: a name, a config, or a callable."""
    if callable(optimizer) and not hasattr(optimizer, "get_config"):
        return optimizer
    if isinstance(optimizer, str):
        return optimizer
    import keras

    return keras.optimizers.serialize(optimizer)


def _make_optimizer(recipe):
    import keras

    if callable(recipe):
        return recipe()
    if isinstance(recipe, str):
        return keras.optimizers.get(recipe)
    return keras.optimizers.deserialize(recipe)


def client_app(client, data, optimizer="rmsprop", *, batch_size: int = 32, epochs: int = 1,
               shuffle: bool = False, seed: int | None = None, compression=None,
               root_certificates=None, certificate=None, private_key=None,
               timeout: float = 30.0, retry_for: float = 60.0) -> ClientApp:
    """A Flower `ClientApp` that trains the client half over keras_split's gRPC.

    For each turn the ServerApp (`SplitRounds`) sends, it builds the client half,
    sets the turn's weights, restores this node's optimizer state (kept in
    `Context.state` between rounds, or handed over with the turn), trains with
    `SplitClient.fit` against the split server named in the turn, and replies
    with the trained weights and metrics "num-examples" and "loss".

    Everything here is pickled to where the ClientApp runs (a Ray actor in the
    simulation engine): give recipes, not live Keras objects.

    Args:
        client: the client half's architecture: a path to a `.keras` file, or
            a callable `f(context) -> keras.Model` (its weights are replaced by
            the turn's).
        data: `f(context) -> (x, y)`: this node's shard (`context.node_config`
            names the node: in the simulation engine, "partition-id").
        optimizer: the client optimizer: a name ("adam"), a Keras optimizer
            (its config is used), or a callable returning a fresh one.
        batch_size, epochs, shuffle, seed: as in `SplitClient.fit`, per turn.
        compression: the codec of the cut tensors (see `GrpcTransport`).
        root_certificates: the CA (PEM bytes or path) of the split server's
            certificate; by default the one the ServerApp sends, else the
            system's roots.
        certificate, private_key: this node's certificate and key, for a split
            server that requires mutual TLS (PEM bytes or paths).
        timeout, retry_for: as in `GrpcTransport`.
    """
    recipe = _optimizer_factory(optimizer)
    own_roots = _pem(root_certificates)
    app = ClientApp()

    @app.train("split")
    def train(message: Message, context: Context) -> Message:
        import keras

        from keras_split.network.client import SplitClient

        config = dict(message.content["split"])
        if isinstance(client, (str, Path)):
            model = keras.models.load_model(client, compile=False)
        else:
            model = client(context)
        model.set_weights(message.content["weights"].to_numpy_ndarrays())
        x, y = data(context)
        insecure = bool(config.get("insecure", False))
        split_client = SplitClient(
            model, server=str(config["server"]), token=str(config["token"]),
            root_certificates=None if insecure else own_roots or config.get("root-certificates"),
            certificate=certificate, private_key=private_key, insecure=insecure,
            timeout=timeout, retry_for=retry_for)
        split_client.compile(_make_optimizer(recipe), compression=compression)
        try:
            variables = split_client.client_role.optimizer.variables
            state = (message.content["optimizer"] if "optimizer" in message.content
                     else context.state[STATE_KEY] if STATE_KEY in context.state else None)
            if state is not None:
                values = state.to_numpy_ndarrays()
                if len(values) != len(variables):
                    raise ValueError(f"The optimizer state holds {len(values)} arrays, this "
                                     f"optimizer has {len(variables)} variables.")
                for variable, value in zip(variables, values, strict=True):
                    variable.assign(value)
            history = split_client.fit(x, y, batch_size=batch_size, epochs=epochs,
                                       shuffle=shuffle, seed=seed, verbose=0)
        finally:
            split_client.transport.close()
        values = [np.array(v.numpy()) for v in variables]
        context.state[STATE_KEY] = ArrayRecord(values)
        metrics = {"num-examples": len(x), "loss": float(history.history["loss"][-1]),
                   "round": int(config["round"])}
        partition = context.node_config.get("partition-id")
        if isinstance(partition, int):
            metrics["partition-id"] = partition
        content = RecordDict({"weights": ArrayRecord(split_client.get_weights()),
                              "metrics": MetricRecord(metrics)})
        if config.get("handoff-optimizer"):
            content["optimizer"] = ArrayRecord(values)
        return Message(content, reply_to=message)

    return app
