"""Pipelined steps (`fit(pipeline=D)`) over emulated links, beside the link's
limits, and their accuracy cost on the chest X-rays.

Throughput: as benchmarks/link.py (demo CNN cut at pool2, shipped balanced
PneumoniaMNIST subset, Adam(1e-3), batch 64, gRPC + TLS, server and client in
one process, `LinkEmulator` in a process of its own, a fresh server and client
per run, 3 warm-up steps), codec none, at 100 Mbit/s with 20 ms RTT and at 10
Mbit/s with 50 ms RTT, for each depth. Printed per run: samples/s; the
bandwidth limit (bandwidth / bytes per sample through the link, the larger
direction: what a link kept busy carries); link.py's "link limit" (the same,
and batch / RTT: one batch per round trip); the synchronous limit (batch /
(RTT + both transfers)); and the run's share of each.

Accuracy: the same model trained in process at each depth for `--epochs`
epochs from the same initial weights and shuffling, for `--seeds` seeds; test
accuracy on the shipped test split.

    python benchmarks/pipeline.py [--steps 100] [--depths 1,2,4,8] [--epochs 10] [--seeds 3]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
from link import WARMUP_STEPS, batches, link_limits  # noqa: E402

import keras_split  # noqa: E402
from keras_split.apps.demo import build_demo_cnn, demo_loss  # noqa: E402
from keras_split.network.devcerts import write_dev_certificates  # noqa: E402
from keras_split.network.emulator import LinkEmulator  # noqa: E402

LINKS = {
    "100Mbit 20ms": {"bandwidth": 100e6 / 8, "rtt": 0.020},
    "10Mbit 50ms": {"bandwidth": 10e6 / 8, "rtt": 0.050},
}


def pipelined_run(weights, codec, link, certs, x, y, batch_size, steps, depth):
    split = keras_split.split(build_demo_cnn(), "pool2")
    split.merge().set_weights(weights)
    server = keras_split.SplitServer(
        split.server, demo_loss(), keras.optimizers.Adam(1e-3), ["accuracy"],
        tokens={"t": "bench"}, certificate=certs["server_cert"],
        private_key=certs["server_key"]).start()
    emulator = None
    try:
        emulator = LinkEmulator(("127.0.0.1", server.port), **link).start()
        client = keras_split.SplitClient(split.client, server=emulator.endpoint, token="t",
                                         root_certificates=certs["ca"])
        client.compile(optimizer=keras.optimizers.Adam(1e-3),
                       compression=None if codec == "none" else codec)
        warm_x, warm_y = batches(x, y, batch_size, WARMUP_STEPS + depth)
        client.fit(warm_x, warm_y, batch_size=batch_size, verbose=0, pipeline=depth)
        before = emulator.stats()
        xs, ys = batches(x, y, batch_size, steps)
        start = time.perf_counter()
        history = client.fit(xs, ys, batch_size=batch_size, verbose=0, pipeline=depth)
        seconds = time.perf_counter() - start
        after = emulator.stats()
        client.transport.close()
        return {"rate": len(xs) / seconds,
                "msg_up": history.history["bytes_up"][0] / len(xs),
                "wire_up": (after["bytes_up"] - before["bytes_up"]) / len(xs),
                "wire_down": (after["bytes_down"] - before["bytes_down"]) / len(xs)}
    finally:
        if emulator is not None:
            emulator.stop()
        server.stop()


def accuracy(weights, data, depth, epochs, seed, batch_size):
    (x, y), _, (x_test, y_test) = data
    split = keras_split.split(build_demo_cnn(), "pool2")
    split.merge().set_weights(weights)
    split.compile(optimizer=keras.optimizers.Adam(1e-3), loss=demo_loss(),
                  metrics=["accuracy"])
    split.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, seed=seed,
              pipeline=depth)
    return split.evaluate(x_test, y_test, batch_size=256, verbose=0, return_dict=True)[
        "accuracy"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--depths", default="1,2,4,8")
    parser.add_argument("--codecs", default="none")
    parser.add_argument("--links", default=",".join(LINKS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--accuracy-depths", default="1,2,3,4")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]

    data = keras_split.datasets.load_pneumoniamnist_balanced()
    (x, y), _, _ = data
    keras.utils.set_random_seed(0)
    weights = build_demo_cnn().get_weights()

    if not args.skip_throughput:
        certs = write_dev_certificates(tempfile.mkdtemp())
        rows = []
        for name in args.links.split(","):
            link = LINKS[name]
            for codec in args.codecs.split(","):
                for depth in depths:
                    result = pipelined_run(weights, codec, link, certs, x, y, args.batch_size,
                                           args.steps, depth)
                    limit, sync = link_limits(link, result, args.batch_size)
                    bandwidth = link["bandwidth"] / max(result["wire_up"], result["wire_down"])
                    rows.append((name, codec, depth, result, bandwidth, limit, sync))
                    print(f"{name:13} {codec:9} depth {depth}: {result['rate']:6.0f} samples/s",
                          flush=True)
        print(f"\nbatch {args.batch_size}, {args.steps} timed steps per run; gRPC + TLS "
              "through LinkEmulator")
        print(f"{'link':13} {'codec':9} {'depth':>5} {'samples/s':>9} {'bw lim':>7} "
              f"{'of bw':>6} {'link lim':>8} {'of link':>7} {'sync lim':>8} {'x sync':>6} "
              f"{'B/smp up':>8} {'down':>6}")
        for name, codec, depth, result, bandwidth, limit, sync in rows:
            print(f"{name:13} {codec:9} {depth:5d} {result['rate']:9.0f} {bandwidth:7.0f} "
                  f"{result['rate'] / bandwidth:6.2f} {limit:8.0f} {result['rate'] / limit:7.2f} "
                  f"{sync:8.0f} {result['rate'] / sync:6.2f} {result['wire_up']:8.0f} "
                  f"{result['wire_down']:6.0f}")

    if not args.skip_accuracy:
        print(f"\ntest accuracy after {args.epochs} epochs in process, batch "
              f"{args.batch_size}, Adam(1e-3), seeds 0..{args.seeds - 1}")
        for depth in (int(d) for d in args.accuracy_depths.split(",")):
            scores = [accuracy(weights, data, depth, args.epochs, seed, args.batch_size)
                      for seed in range(args.seeds)]
            print(f"depth {depth}: " + ", ".join(f"{s:.4f}" for s in scores)
                  + f"; mean {statistics.mean(scores):.4f}", flush=True)


if __name__ == "__main__":
    main()
