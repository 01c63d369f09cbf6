"""The seed papers' configurations, each built on the one split step.

- `chain`: multi-hop chains of parties (`RelayRole` middles) and U-shaped
  training (labels kept on the client: `KeepLabels`, `JoinLabels`).
- `multitask`: one client body, several heads (`FanOut` sums their gradients).
- `parallel`: several clients' concurrent training steps run as one server
  step on their concatenated activations (`ParallelRole`).
- `vertical`: several parties, each with its own features (`GatherRole`).
- `policy`: the round policy of round-robin and SplitFed (whose turn, hand-off,
  FedAvg weights, dropouts), with two drivers: `federation` (in process) and
  `rounds` (client processes through a `SplitServer`).
- `sharding`: splitting a data set among clients (IID, label skew, columns).
"""
