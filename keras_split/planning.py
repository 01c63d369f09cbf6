"""What training will cost, before training: FLOPs and bytes per client and on the server.

`plan(model, samples=..., num_clients=..., epochs=...)` counts, for a cut (or
every candidate cut), what each client computes and sends and receives, and
what the server computes, over a whole training run, for split learning
(vanilla, round-robin, SplitFed), federated learning (FedAvg) and large-batch
synchronous SGD. The forward FLOPs are those of `cut_candidates` (TensorFlow's
graph profiler, through `keras_split.flops`), so a plan and the cut table agree;
bytes are payload bytes, as the library's `ByteCounter`s count them.

Nothing here trains: each layer is traced once for its FLOPs (twice when every
candidate cut is planned), so a plan of ResNet-50 takes a few seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

from keras_split import partition
from keras_split.export.program import blocks_export
from keras_split.flops import call_flops
from keras_split.graph import Graph, read_graph
from keras_split.partition import CutTable, analyse_cut, check_graph_model, spec_of
from keras_split.split_model import SplitModel

__all__ = ["CONFIGURATIONS", "Cost", "CostPlan", "cut_candidates", "plan"]

def cut_candidates(model, *, collapse: bool = True, include_raw: bool = False,
                   dropout: str | None = None) -> CutTable:
    """List the layers at which a single cut separates inputs from outputs,
    with what each costs and whether its client half trains on a device.

    This is `keras_split.cut_candidates`: the core's table
    (`keras_split.partition.cut_candidates`, whose arguments `collapse` and
    `include_raw` it passes on) plus, for every row, whether
    `keras_split.export.export_client` can export its client half for
    on-device training (`exportable`) and if not the first layer it has no
    rule for (`export_blocker`), shown as the table's "Device" column.

    Use it to choose a cut: a phone wants few client parameters and FLOPs and
    an exportable client, the network wants few bytes per sample. Rows come in
    graph order, and each row names a cut `split()` accepts: cuts bypassed by a
    skip connection or a parallel branch are left out (they need several
    tensors; `split()`'s error names them), and so are cuts that would send raw
    inputs (see `include_raw`).

    Args:
        model: a functional or Sequential `keras.Model`.
        collapse: when True (the default), a layer's cut and the cuts right
            after it that send the same number of bytes through layers without
            a kernel (Conv→BatchNorm→ReLU, Pool→Flatten) share one row, named
            after the first of them and listing all in `layers`. False gives
            one row per cut.
        include_raw: also list the cuts whose client half has no trainable
            weights (Rescaling, ZeroPadding2D, Normalization right after the
            input), with `refused` saying why `split()` refuses them.
        dropout: as for `export_client`: None (the default) counts a Dropout
            with a rate as blocking the export; "inference" counts it as
            exportable (the device trains with Dropout off).

    Returns:
        A `CutTable`: a list of `CutCandidate`; `summary()` prints it.

    Example:

    ```python
    table = keras_split.cut_candidates(model)
    table.summary()
    for c in table:
        print(c.layer, c.bytes_per_sample, c.client_params, c.client_flops,
              f"{c.client_flops_fraction:.0%}", c.exportable, c.export_blocker)
    ```
    """
    if dropout not in (None, "inference"):
        raise ValueError(f"`dropout` must be None or 'inference'; received {dropout!r}.")
    return partition.cut_candidates(
        model, collapse=collapse, include_raw=include_raw,
        device_check=lambda call: blocks_export(call, dropout))


CONFIGURATIONS = ("vanilla", "round_robin", "splitfed", "federated", "large_batch_sgd")
SPLIT_CONFIGURATIONS = ("vanilla", "round_robin", "splitfed")
_TITLES = {
    "vanilla": "split learning, vanilla",
    "round_robin": "split learning, round-robin",
    "splitfed": "SplitFed",
    "federated": "federated learning (FedAvg)",
    "large_batch_sgd": "large-batch synchronous SGD",
}


@dataclass(frozen=True)
class Cost:
    """What one configuration costs over the whole training: one row of a `CostPlan`.

    Per-client figures are those of the average client, which holds
    `samples / num_clients` samples. Bytes are payload bytes (tensor bytes, no
    framing), as the library's transports count them.

    Attributes:
        configuration: one of `CONFIGURATIONS`.
        cut: the cut's name for the split-learning configurations; None for
            federated learning and large-batch SGD, where clients hold the whole model.
        num_clients: K.
        client_flops: FLOPs one client computes, forward and backward.
        bytes_up: bytes one client sends.
        bytes_down: bytes one client receives.
        server_flops: FLOPs the server computes, for all clients together
            (the server half's forward and backward passes, and averaging).
        cut_bytes: of one client's bytes, the activations it sends and the
            gradients it receives at the cut.
        label_bytes: of one client's bytes, the labels it sends with its activations.
        weight_bytes: of one client's bytes, the weights (or gradients) it
            receives and sends: hand-offs, FedAvg, gradient exchange.
    """

    configuration: str
    cut: str | None
    num_clients: int
    client_flops: float
    bytes_up: float
    bytes_down: float
    server_flops: float
    cut_bytes: float = 0.0
    label_bytes: float = 0.0
    weight_bytes: float = 0.0

    @property
    def bytes(self) -> float:
        """Bytes one client sends and receives."""
        return self.bytes_up + self.bytes_down

    @property
    def total_client_flops(self) -> float:
        """FLOPs of all clients together."""
        return self.client_flops * self.num_clients

    @property
    def total_bytes(self) -> float:
        """Bytes over all clients' links (a peer-to-peer hand-off counts at both ends)."""
        return self.bytes * self.num_clients

    @property
    def total_flops(self) -> float:
        """FLOPs of all clients and the server."""
        return self.total_client_flops + self.server_flops


@dataclass(frozen=True)
class _Cut:
    """What a plan needs to know of one cut."""

    name: str
    bytes_per_sample: int  # activations sent per sample (gradients come back the same size)
    client_flops: int  # forward FLOPs per sample of the client half
    client_params: int
    client_weight_bytes: int


@dataclass(frozen=True)
class _Whole:
    """What a plan needs to know of the whole model."""

    name: str
    flops: int  # forward FLOPs per sample
    params: int
    weight_bytes: int
    trainable_params: int
    trainable_bytes: int


class CostPlan(list):
    """The rows of `plan`: a list of `Cost` that prints as a table.

    `repr()` is one line; `summary()` (or `print(plan)`) shows the setting, the
    model and one row per configuration (and cut). `get(configuration, cut)`
    picks a row.

    The attributes restate what the plan assumed: `samples`, `num_clients`,
    `epochs`, `batch_size`, `local_epochs`, `label_bytes`, `backward_factor`,
    and of the model, `forward_flops` (per sample), `params`,
    `weight_bytes`.
    """

    def __init__(self, rows, *, whole: _Whole, cuts: Sequence[_Cut], samples: int,
                 num_clients: int, epochs: int, batch_size: int, local_epochs: int,
                 label_bytes: int, backward_factor: float):
        super().__init__(rows)
        self.model_name = whole.name
        self.forward_flops = whole.flops
        self.params = whole.params
        self.weight_bytes = whole.weight_bytes
        self.cuts = tuple(cut.name for cut in cuts)
        self._cuts = tuple(cuts)
        self.samples = samples
        self.num_clients = num_clients
        self.epochs = epochs
        self.batch_size = batch_size
        self.local_epochs = local_epochs
        self.label_bytes = label_bytes
        self.backward_factor = backward_factor

    def get(self, configuration: str, cut: str | None = None) -> Cost:
        """The row of `configuration` (at `cut`, when the plan covers several cuts)."""
        if configuration not in CONFIGURATIONS:
            raise ValueError(f"Unknown configuration {configuration!r}; expected one of "
                             f"{list(CONFIGURATIONS)}.")
        rows = [r for r in self if r.configuration == configuration]
        if not rows:
            raise ValueError(f"This plan has no {configuration!r} row; it covers "
                             f"{sorted({r.configuration for r in self})}.")
        if configuration in SPLIT_CONFIGURATIONS:
            if cut is None and len(self.cuts) > 1:
                raise ValueError(f"This plan covers {len(self.cuts)} cuts; pass cut= one of "
                                 f"{list(self.cuts)}.")
            if cut is not None:
                rows = [r for r in rows if r.cut == cut]
                if not rows:
                    raise ValueError(f"No row for cut {cut!r}; the plan's cuts are "
                                     f"{list(self.cuts)}.")
        return rows[0]

    def __repr__(self):
        return (f"CostPlan({self.model_name!r}: {len(self)} rows, {len(self.cuts)} "
                f"cut{'s' if len(self.cuts) != 1 else ''}, {self.num_clients:,} clients, "
                f"{self.samples:,} samples, {self.epochs} epochs; .summary() prints it)")

    def __str__(self):
        return "\n".join(self._lines())

    def summary(self, print_fn=None) -> None:
        """Print the plan, one line per row (`print_fn` as in `keras.Model.summary`)."""
        print_fn = print_fn or print
        for line in self._lines():
            print_fn(line)

    def _lines(self) -> list[str]:
        per_client = self.samples / self.num_clients
        lines = [
            f"Training cost of {self.model_name!r}: {self.num_clients:,} clients, "
            f"{self.samples:,} samples ({per_client:,.4g} per client), {self.epochs} epochs, "
            f"batch {self.batch_size}"
            + (f", {self.local_epochs} local epochs per round" if self.local_epochs != 1 else ""),
            f"Model: {self.params:,} parameters ({_bytes(self.weight_bytes)}), "
            f"{_flops(self.forward_flops)} forward FLOPs per sample; training counts "
            f"{1 + self.backward_factor:g} x forward (backward = {self.backward_factor:g} x "
            f"forward); labels {self.label_bytes} B per sample",
        ]
        if len(self._cuts) == 1:
            cut = self._cuts[0]
            lines.append(
                f"Cut {cut.name!r}: {cut.bytes_per_sample:,} B per sample each way; client half "
                f"{cut.client_params:,} parameters ({_bytes(cut.client_weight_bytes)}), "
                f"{_flops(cut.client_flops)} forward FLOPs per sample")
        header = ["Configuration", "Cut", "Client FLOPs", "Sends", "Receives",
                  "Server FLOPs", "All FLOPs", "All bytes"]
        cells = [
            [_TITLES[r.configuration], r.cut or "(whole model)", _flops(r.client_flops),
             _bytes(r.bytes_up), _bytes(r.bytes_down), _flops(r.server_flops),
             _flops(r.total_flops), _bytes(r.total_bytes)]
            for r in self
        ]
        if len(self._cuts) == 1:  # the cut is in the header already
            header.pop(1)
            for row in cells:
                row.pop(1)
        widths = [max(len(c) for c in column) for column in zip(header, *cells, strict=True)]
        left = 2 if len(self._cuts) > 1 else 1  # text columns, then numbers

        def line(row):
            return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True)))

        rule = "─" * len(line(header))
        notes = ["Client figures are per client; 'All' counts every client and the server "
                 "(bytes at the clients' links)."]
        return lines + [rule, line(header), rule] + [line(r) for r in cells] + [rule] + notes


def _flops(value: float) -> str:
    for size, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def _bytes(value: float) -> str:
    for size, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g} B"


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, received {value!r}.")
    return int(value)


def _weights_bytes(weights) -> tuple[int, int]:
    """(parameters, bytes) of distinct weights."""
    unique = {id(w): w for w in weights}.values()
    params = sum(math.prod(w.shape) for w in unique)
    nbytes = sum(math.prod(w.shape) * np.dtype(keras.backend.standardize_dtype(w.dtype)).itemsize
                 for w in unique)
    return int(params), int(nbytes)


def _call_weights(call) -> list:
    # A Keras operation (keras.ops.* in the graph) has no weights.
    return list(getattr(call.layer, "weights", None) or [])


def _cut_facts(graph: Graph, flops: dict, name: str, tensors, byte_sizes) -> _Cut:
    if None in byte_sizes:
        raise ValueError(
            f"Cut {name!r} sends a tensor with an unknown dimension, so its bytes per "
            "sample are unknown. Give the model a fixed input shape (keras.Input(shape=...) "
            "without None) to plan its cost.")
    client = graph.ancestors(tensors)
    calls = [c for c in graph.calls if id(c) in client]
    params, nbytes = _weights_bytes(w for c in calls for w in _call_weights(c))
    return _Cut(name=name, bytes_per_sample=int(sum(byte_sizes)),
                client_flops=int(sum(flops[id(c)] for c in calls)),
                client_params=params, client_weight_bytes=nbytes)


def _whole(name: str, flops: int, weights, trainable) -> _Whole:
    params, nbytes = _weights_bytes(weights)
    trainable_params, trainable_bytes = _weights_bytes(trainable)
    return _Whole(name=name, flops=int(flops), params=params, weight_bytes=nbytes,
                  trainable_params=trainable_params, trainable_bytes=trainable_bytes)


def _profile(model, cut) -> tuple[_Whole, list[_Cut]]:
    """The model's and the cuts' facts: FLOPs as `cut_candidates` counts them."""
    if isinstance(model, SplitModel):
        if cut is not None:
            raise ValueError("A SplitModel is already cut; pass `cut=` with the unsplit "
                             "keras.Model, or leave it out.")
        halves = [read_graph(model.client), read_graph(model.server)]
        client_flops, server_flops = (sum(call_flops(c) for c in g.calls) for g in halves)
        params, nbytes = _weights_bytes(model.client.weights)
        sizes = [spec.bytes_per_sample for spec in model.cut_specs]
        name = "+".join(spec.name for spec in model.cut_specs)
        if None in sizes:
            raise ValueError(f"Cut {name!r} sends a tensor with an unknown dimension; give "
                             "the halves fixed shapes to plan their cost.")
        cut_facts = _Cut(name=name, bytes_per_sample=int(sum(sizes)),
                         client_flops=int(client_flops), client_params=params,
                         client_weight_bytes=nbytes)
        weights = list(model.client.weights) + list(model.server.weights)
        trainable = list(model.client.trainable_weights) + list(model.server.trainable_weights)
        source = model.client.name.removesuffix("_client")
        return _whole(source, client_flops + server_flops, weights, trainable), [cut_facts]

    check_graph_model(model)
    if cut is None:
        rows = partition.cut_candidates(model)
        if not rows:
            raise ValueError(f"'{model.name}' has no single-layer cut; pass cut=[...] with "
                             "the layers whose outputs together separate it.")
        graph = read_graph(model)
        flops = {id(c): call_flops(c) for c in graph.calls}
        by_name = {c.name: c for c in graph.calls}
        cuts = []
        for row in rows:
            outputs = by_name[row.layer].outputs
            sizes = [spec_of(row.layer, t).bytes_per_sample for t in outputs]
            cuts.append(_cut_facts(graph, flops, row.layer, outputs, sizes))
    else:
        graph, tensors, specs = analyse_cut(model, cut)
        flops = {id(c): call_flops(c) for c in graph.calls}
        name = cut if isinstance(cut, str) else "+".join(cut)
        cuts = [_cut_facts(graph, flops, name, tensors, [s.bytes_per_sample for s in specs])]
    whole = _whole(model.name, sum(flops.values()), model.weights, model.trainable_weights)
    return whole, cuts


def plan(
    model,
    *,
    samples: int,
    num_clients: int,
    epochs: int = 1,
    batch_size: int = 32,
    cut=None,
    configurations: Sequence[str] = CONFIGURATIONS,
    local_epochs: int = 1,
    label_bytes: int = 8,
    backward_factor: float = 2.0,
) -> CostPlan:
    """What training will cost each client and the server, before training.

    Use it to choose a cut and a configuration: it gives, per client, the FLOPs
    (forward and backward) and the bytes sent and received over the whole
    training, the server's FLOPs, and the totals, for split learning (vanilla,
    round-robin, SplitFed), federated learning and large-batch synchronous SGD.
    The forward FLOPs are those `cut_candidates` reports (TensorFlow's profiler:
    a multiply-add counts 2 FLOPs; ReLU, pooling and reshapes count little or
    nothing).

    **The formulas.** K clients share `samples` = n evenly: each holds
    n_k = n / K. The model takes F forward FLOPs per sample, F_c of them in the
    client half; q is the cut's bytes per sample (the gradient coming back is
    as big); l is `label_bytes`; W and W_c are the bytes of the model's and the
    client half's weights, P and P_c their parameter counts, G and P_t the
    trainable weights' bytes and count. E is `epochs`, R = E / `local_epochs`
    the rounds, S = ceil(ceil(n / K) / B) * E the synchronous steps at batch
    size B, and b = `backward_factor`: training costs (1 + b) * F per sample,
    the backward pass being taken as b = 2 times the forward (one matrix
    product for the input gradient, one for the weight gradient; the usual
    convention, e.g. Kaplan et al. 2020's 6N FLOPs per token).

    Per client, over the whole training, and for the server (all clients):

        vanilla          client FLOPs (1+b) F_c n_k E
                         sends (q + l) n_k E, receives q n_k E
                         server FLOPs (1+b) (F - F_c) n E
        round_robin      as vanilla, plus W_c each way per epoch: sends and
                         receives W_c E more
        splitfed         as vanilla, plus W_c each way per round: W_c R more;
                         server FLOPs plus 2 K P_c R (FedAvg of the client halves)
        federated        client FLOPs (1+b) F n_k E; sends W R, receives W R;
                         server FLOPs 2 K P R
        large_batch_sgd  client FLOPs (1+b) F n_k E; sends G S, receives G S;
                         server FLOPs 2 K P_t S

    Vanilla: each client keeps its own client half (no weight traffic).
    Round-robin: before its turn each client receives the latest client half
    and after it passes it on (once per epoch), to the next client or through
    the server; the bytes per client are the same either way. SplitFed: each
    round each client downloads the round's client half and uploads its own
    for FedAvg (SFLv1 also averages the server copies on the server: add
    2 K (P - P_c) R to its FLOPs). FedAvg: the whole model down and up each
    round. Large-batch SGD: each step a client sends the gradient of the
    trainable weights and receives the averaged one. Averaging costs 2 FLOPs
    per parameter per client (a multiply and an add); optimizer updates are
    not counted. Totals are K times the per-client figures (plus the server's
    FLOPs), so a byte passed from client to client counts at both ends.

    In the notation of Singh et al. (2019), with p = n samples, q and N in
    parameters and eta N = P_c, the per-client communication per epoch is
    2 (p/K) q + eta N for split learning with client weight sharing and 2 N
    for federated learning: our round-robin and federated rows for E = 1, with
    bytes for parameters, labels added, and the hand-off counted in both
    directions (they count each hand-off once). Thapa et al. (2022) give
    2 (p/K) q + 2 eta N for SplitFed, as here.

    Args:
        model: a functional or Sequential `keras.Model`, or a `SplitModel`
            (then its cut is planned, and `cut` must be left out).
        samples: n, the training samples of all clients together.
        num_clients: K.
        epochs: E, passes over every client's data.
        batch_size: B, per client; only the step count of large-batch SGD
            depends on it (split learning sends per sample, whatever the batch).
        cut: a layer name or a list of them (as for `split`); None plans every
            row of `cut_candidates(model)`.
        configurations: which of `CONFIGURATIONS` to plan; all by default.
        local_epochs: epochs per round for SplitFed and federated learning
            (must divide `epochs`); round-robin passes the client half on once
            per epoch.
        label_bytes: bytes of one sample's labels, sent with the activations
            in split learning: 8 for one int64 class index (numpy's default
            integer), 1 for uint8 labels, 4 * classes for one-hot float32, 0
            when the labels stay on the client (U-shaped).
        backward_factor: b, the backward pass's FLOPs as a multiple of the
            forward's.

    Returns:
        A `CostPlan`: a list of `Cost` rows; `summary()` prints the table,
        `get(configuration, cut)` picks a row.

    Example:

    ```python
    model = keras.applications.VGG16(weights=None, input_shape=(32, 32, 3), classes=10)
    costs = keras_split.plan(model, cut="block1_conv1", samples=50_000, num_clients=100,
                             epochs=30)
    costs.summary()
    costs.get("round_robin").client_flops      # 1.62e11: per client, forward and backward
    costs.get("federated").bytes_up            # 4.04e9: 30 uploads of the model
    ```

    Reference:
        - Vepakomma, Gupta, Swedish and Raskar, 2018. Split learning for
          health: distributed deep learning without sharing raw patient data.
          arXiv:1812.00564.
        - Gupta and Raskar, 2018. Distributed learning of deep neural network
          over multiple agents. J. Network and Computer Applications 116.
        - Singh, Vepakomma, Gupta and Raskar, 2019. Detailed comparison of
          communication efficiency of split learning and federated learning.
          arXiv:1909.09145.
        - Thapa, Chamikara, Camtepe and Sun, 2022. SplitFed: when federated
          learning meets split learning. AAAI (arXiv:2004.12088).
        - McMahan et al., 2017. Communication-efficient learning of deep
          networks from decentralized data. AISTATS.
        - Goyal et al., 2017. Accurate, large minibatch SGD: training ImageNet
          in 1 hour. arXiv:1706.02677.
        - Kaplan et al., 2020. Scaling laws for neural language models.
          arXiv:2001.08361 (training FLOPs = 3 x forward).
    """
    samples = _positive_int("samples", samples)
    num_clients = _positive_int("num_clients", num_clients)
    epochs = _positive_int("epochs", epochs)
    batch_size = _positive_int("batch_size", batch_size)
    local_epochs = _positive_int("local_epochs", local_epochs)
    if num_clients > samples:
        raise ValueError(f"Every client needs data: {num_clients:,} clients but only "
                         f"{samples:,} samples. Pass fewer clients or more samples.")
    if epochs % local_epochs:
        raise ValueError(f"`local_epochs` must divide `epochs` (rounds of {local_epochs} "
                         f"epochs each), received epochs={epochs}, local_epochs={local_epochs}.")
    if isinstance(label_bytes, bool) or not isinstance(label_bytes, int | np.integer) or (
            label_bytes < 0):
        raise ValueError(f"`label_bytes` must be a non-negative integer, received "
                         f"{label_bytes!r}.")
    if not isinstance(backward_factor, int | float) or not backward_factor >= 0:
        raise ValueError(f"`backward_factor` must be a number >= 0, received "
                         f"{backward_factor!r}.")
    if isinstance(configurations, str):
        configurations = [configurations]
    unknown = [c for c in configurations if c not in CONFIGURATIONS]
    if unknown or not configurations:
        raise ValueError(f"Unknown configurations {unknown}; choose from "
                         f"{list(CONFIGURATIONS)}." if unknown else
                         "`configurations` is empty; choose from "
                         f"{list(CONFIGURATIONS)}.")

    whole, cuts = _profile(model, cut)
    n, k, e = samples, num_clients, epochs
    per_client = n / k
    train = 1 + backward_factor
    rounds = e // local_epochs
    steps = math.ceil(math.ceil(n / k) / batch_size) * e
    rows = []
    for facts in cuts:
        for name in (c for c in SPLIT_CONFIGURATIONS if c in configurations):
            sent = facts.bytes_per_sample * per_client * e
            labels = label_bytes * per_client * e
            transfers = {"vanilla": 0, "round_robin": e, "splitfed": rounds}[name]
            weights = float(facts.client_weight_bytes * transfers)  # each way
            averaging = 2 * k * facts.client_params * rounds if name == "splitfed" else 0
            rows.append(Cost(
                configuration=name, cut=facts.name, num_clients=k,
                client_flops=train * facts.client_flops * per_client * e,
                bytes_up=sent + labels + weights, bytes_down=sent + weights,
                server_flops=train * (whole.flops - facts.client_flops) * n * e + averaging,
                cut_bytes=2 * sent, label_bytes=labels, weight_bytes=2 * weights))
    whole_model = train * whole.flops * per_client * e
    if "federated" in configurations:
        rows.append(Cost(
            configuration="federated", cut=None, num_clients=k, client_flops=whole_model,
            bytes_up=float(whole.weight_bytes * rounds),
            bytes_down=float(whole.weight_bytes * rounds),
            server_flops=float(2 * k * whole.params * rounds),
            weight_bytes=float(2 * whole.weight_bytes * rounds)))
    if "large_batch_sgd" in configurations:
        rows.append(Cost(
            configuration="large_batch_sgd", cut=None, num_clients=k, client_flops=whole_model,
            bytes_up=float(whole.trainable_bytes * steps),
            bytes_down=float(whole.trainable_bytes * steps),
            server_flops=float(2 * k * whole.trainable_params * steps),
            weight_bytes=float(2 * whole.trainable_bytes * steps)))
    return CostPlan(rows, whole=whole, cuts=cuts, samples=samples, num_clients=num_clients,
                    epochs=epochs, batch_size=batch_size, local_epochs=local_epochs,
                    label_bytes=label_bytes, backward_factor=backward_factor)
