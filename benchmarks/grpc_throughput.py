"""Training over gRPC on loopback (TLS), per compression codec, beside in-process
split and unsplit `model.fit`, all in one run.

Demo CNN cut at pool2, shipped balanced PneumoniaMNIST subset, Adam(1e-3).
Every configuration is built once from the same initial weights and warmed up
for one epoch. Then, in each of `--rounds` rounds, each configuration trains
`--epochs` more epochs, timed, in turn (interleaved, so the load of this shared
machine hits all alike). Reported: the best and the median rate over rounds,
and ratios of the best rates to unsplit's (the best is the least disturbed
measurement); bytes per sample on the wire against the analytic encoded size;
test accuracy after the same number of epochs. "float16+ckpt" is float16 with
both parties checkpointing every step. The gRPC runs send their steps on one
`Steps` stream per session (the client's default); "unary" runs send one `Step`
call per step instead (`GrpcTransport(stream=False)`), for comparison. "paired"
is the median over rounds of each round's rate over unsplit's in the same
round: less sensitive to a load that changes between rounds than the ratio of
best rates.

    python benchmarks/grpc_throughput.py [--rounds 5] [--epochs 2] [--batch-size 64]
        [--only "grpc none,grpc float16,grpc none unary,grpc float16 unary"] [--breakdown]

`--server-process` serves each gRPC configuration from a `keras-split serve` process
of its own (the server half saved with the same initial weights), as a server in
another organisation would run: the client's process then holds no server, and the
two share no interpreter lock (they still share the machine's cores). Not with
`--breakdown`, which times both sides with one clock.

`--breakdown` also times the parts of every gRPC step (instrumented: the
client's check and encode, the transit to the server's step, the server's
decode, role and encode, the transit back, the client's decode) and prints
the median of each per configuration.
"""

import argparse
import collections
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import keras_split  # noqa: E402
from keras_split.apps.demo import build_demo_cnn, demo_loss  # noqa: E402
from keras_split.network.devcerts import write_dev_certificates  # noqa: E402

CODECS = ["none", "float16", "bfloat16", "int8", "topk:0.1"]


def analytic_bytes(codec: str, values: int) -> float:
    """Encoded payload bytes of one sample's cut tensor."""
    if codec == "none":
        return 4 * values
    if codec in ("float16", "bfloat16"):
        return 2 * values
    if codec == "int8":
        return values
    fraction = float(codec.split(":")[1])
    return fraction * values * (4 + 4)  # uint32 position + float32 value


def unsplit(weights):
    model = build_demo_cnn()
    model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=demo_loss(), metrics=["accuracy"])
    return model, None


def in_process(weights):
    local = keras_split.split(build_demo_cnn(), "pool2")
    local.merge().set_weights(weights)
    local.compile(optimizer=keras.optimizers.Adam(1e-3), loss=demo_loss(), metrics=["accuracy"])
    return local, None


def over_grpc(weights, codec, certs, folder=None, stream=True):
    split = keras_split.split(build_demo_cnn(), "pool2")
    split.merge().set_weights(weights)
    server = keras_split.SplitServer(
        split.server, demo_loss(), keras.optimizers.Adam(1e-3), ["accuracy"],
        tokens={"t": "bench"}, certificate=certs["server_cert"], private_key=certs["server_key"],
        checkpoint_dir=folder and os.path.join(folder, "server")).start()
    client = keras_split.SplitClient(
        split.client, server=f"127.0.0.1:{server.port}", token="t",
        root_certificates=certs["ca"], checkpoint_dir=folder and os.path.join(folder, "client"),
        stream=stream)
    client.compile(optimizer=keras.optimizers.Adam(1e-3),
                   compression=None if codec == "none" else codec)
    return client, server


class ServerProcess:
    """`keras-split serve` in a child process, stopped by `stop()` (SIGTERM)."""

    def __init__(self, weights, certs, folder, name, checkpoint=False):
        split = keras_split.split(build_demo_cnn(), "pool2")
        split.merge().set_weights(weights)
        model = os.path.join(folder, f"{name}.keras")
        split.server.save(model)
        tokens = os.path.join(folder, "tokens")
        with open(tokens, "w") as file:
            file.write("t bench\n")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [sys.executable, "-m", "keras_split.apps.cli", "serve", "--model", model,
                   "--from-logits", "--learning-rate", "1e-3", "--metrics", "accuracy",
                   "--address", f"127.0.0.1:{self.port}", "--cert", str(certs["server_cert"]),
                   "--key", str(certs["server_key"]), "--token-file", tokens]
        if checkpoint:
            command += ["--checkpoint-dir", os.path.join(folder, f"{name}-server")]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("serving"):
            raise RuntimeError(f"keras-split serve did not start: {line!r}")
        # Whatever it prints later is read, so that its pipe never fills.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def stop(self):
        self.process.terminate()
        self.process.wait(60)


def over_grpc_to_process(weights, codec, certs, folder, name, checkpoint=False, stream=True):
    server = ServerProcess(weights, certs, folder, name.replace(" ", "_").replace(":", ""),
                           checkpoint)
    split = keras_split.split(build_demo_cnn(), "pool2")
    split.merge().set_weights(weights)
    client = keras_split.SplitClient(
        split.client, server=f"127.0.0.1:{server.port}", token="t",
        root_certificates=certs["ca"],
        checkpoint_dir=os.path.join(folder, name.replace(" ", "_") + "-client")
        if checkpoint else None, stream=stream)
    client.compile(optimizer=keras.optimizers.Adam(1e-3),
                   compression=None if codec == "none" else codec)
    return client, server


PARTS = ["client check", "client encode", "transit up", "server decode", "server step",
         "server encode", "transit back", "client decode", "round trip"]


def instrument(parts):
    """Time the parts of each gRPC step into `parts[name]`, where `name` is
    `parts["current"]` (the configuration running). Server and client share this
    process, so one clock times the transit both ways."""
    from keras_split.network import server as server_module
    from keras_split.network import transport as transport_module
    from keras_split_wire import rpc

    marks = {}

    def timed(owner, attribute, part, mark_in=None, mark_out=None):
        function = getattr(owner, attribute)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            if mark_in:
                marks[mark_in] = start
            result = function(*args, **kwargs)
            end = time.perf_counter()
            if mark_out:
                marks[mark_out] = end
            if part:
                parts[parts["current"]][part].append(end - start)
            return result

        setattr(owner, attribute, wrapper)

    timed(transport_module, "check_outgoing", "client check")
    timed(transport_module.wire, "request_to_pb", "client encode")
    timed(transport_module.wire, "reply_from_pb", "client decode")
    timed(server_module.wire, "request_from_pb", "server decode", mark_in="server in")
    timed(server_module.wire, "reply_to_pb", "server encode", mark_out="server out")
    timed(server_module.SplitServer, "_handle", "server step")
    for owner, attribute in [(rpc.Stream, "exchange"), (transport_module.GrpcTransport, "_call")]:
        function = getattr(owner, attribute)

        def call(*args, function=function, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            end = time.perf_counter()
            if "server in" in marks:  # a step (not Open, Turn or Report)
                record = parts[parts["current"]]
                record["transit up"].append(marks.pop("server in") - start)
                record["transit back"].append(end - marks.pop("server out"))
                record["round trip"].append(end - start)
            return result

        setattr(owner, attribute, call)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the parts of each gRPC step (instrumented)")
    parser.add_argument("--only", default=None,
                        help="comma-separated configurations to run (unsplit always runs): "
                             "fewer per round measure each closer in time to unsplit")
    parser.add_argument("--server-process", action="store_true",
                        help="serve each gRPC configuration from a `keras-split serve` "
                             "process of its own")
    args = parser.parse_args()
    if args.server_process and args.breakdown:
        parser.error("--breakdown times both sides in one process: not with --server-process")
    only = None if args.only is None else {"unsplit", *args.only.split(",")}
    parts = collections.defaultdict(lambda: collections.defaultdict(list))
    parts["current"] = "warm-up"
    if args.breakdown:
        instrument(parts)
    (x, y), _, (x_test, y_test) = keras_split.datasets.load_pneumoniamnist_balanced()
    folder = tempfile.mkdtemp()
    certs = write_dev_certificates(folder)
    keras.utils.set_random_seed(0)
    weights = build_demo_cnn().get_weights()
    builders = {"unsplit": lambda: unsplit(weights), "in-process": lambda: in_process(weights)}
    if args.server_process:
        def grpc(codec, name, checkpoint=False, stream=True):
            return over_grpc_to_process(weights, codec, certs, folder, name, checkpoint, stream)
    else:
        def grpc(codec, name, checkpoint=False, stream=True):
            return over_grpc(weights, codec, certs, folder if checkpoint else None, stream)
    for codec in CODECS:
        builders[f"grpc {codec}"] = lambda codec=codec: grpc(codec, f"grpc {codec}")
    builders["grpc float16+ckpt"] = lambda: grpc("float16", "grpc float16+ckpt", True)
    for codec in ("none", "float16"):
        builders[f"grpc {codec} unary"] = lambda codec=codec: grpc(
            codec, f"grpc {codec} unary", stream=False)
    unknown = (only or set()) - set(builders)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; known: {list(builders)}")
    configs = {name: build() for name, build in builders.items() if only is None or name in only}
    # The shipped training set is ordered by class: shuffle, or nothing is learnt.
    for owner, _ in configs.values():
        owner.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0)
    rates = {name: [] for name in configs}
    wire = {}
    for round_ in range(args.rounds):
        for name, (owner, _) in configs.items():
            parts["current"] = name
            start = time.perf_counter()
            history = owner.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=0)
            rates[name].append(len(x) * args.epochs / (time.perf_counter() - start))
            if name.startswith("grpc ") and "ckpt" not in name and "unary" not in name:
                wire[name[5:]] = (history.history["bytes_up"][0] / len(x),
                                  history.history["bytes_down"][0] / len(x))
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()),
              flush=True)
    accuracies = {}
    for name, (owner, server) in configs.items():
        logs = owner.evaluate(x_test, y_test, batch_size=256, verbose=0, return_dict=True)
        accuracies[name] = logs["accuracy"]
        if server is not None:
            server.stop()

    base = max(rates["unsplit"])
    epochs = 1 + args.rounds * args.epochs
    where = "a server process per configuration" if args.server_process else \
        "server and client in this process"
    print(f"\nbatch {args.batch_size}; {args.rounds} rounds of {args.epochs} timed epochs; "
          f"test accuracy after {epochs} epochs; gRPC: {where}")
    print(f"{'configuration':20} {'best/s':>8} {'median/s':>9} {'ratio':>6} {'paired':>7} "
          f"{'test acc':>9}")
    for name in configs:
        best, median = max(rates[name]), statistics.median(rates[name])
        paired = statistics.median(r / u for r, u in zip(rates[name], rates["unsplit"],
                                                          strict=True))
        print(f"{name:20} {best:8.0f} {median:9.0f} {best / base:6.3f} {paired:7.3f} "
              f"{accuracies[name]:9.4f}")
    if args.breakdown:
        timed = [name for name in configs if parts[name]]
        print(f"\nms per gRPC step, median (unsplit: "
              f"{1e3 * args.batch_size / statistics.median(rates['unsplit']):.3f} ms per step)")
        print(f"{'part':16}" + "".join(f"{name[5:]:>15}" for name in timed))
        for part in PARTS:
            print(f"{part:16}" + "".join(
                f"{1e3 * statistics.median(parts[name][part] or [math.nan]):15.3f}"
                for name in timed))
        print(f"{'whole step':16}" + "".join(
            f"{1e3 * args.batch_size / statistics.median(rates[name]):15.3f}" for name in timed))
    values = math.prod(keras_split.split(build_demo_cnn(), "pool2").cut_specs[0].shape[1:])
    print(f"\nbytes/sample on the wire (cut: {values} float32 values; label 8 bytes up)")
    print(f"{'codec':10} {'up':>9} {'analytic':>9} {'down':>9} {'analytic':>9}")
    for codec in (c for c in CODECS if c in wire):
        payload = analytic_bytes(codec, values)
        up, down = wire[codec]
        print(f"{codec:10} {up:9.1f} {payload + 8:9.1f} {down:9.1f} {payload:9.1f}")


if __name__ == "__main__":
    main()
