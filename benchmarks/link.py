"""Training over emulated links (gRPC + TLS through `LinkEmulator`), per codec,
beside the two limits of each run.

Demo CNN cut at pool2, shipped balanced PneumoniaMNIST subset, Adam(1e-3),
batch 64. For each link and codec a fresh `SplitServer` and `SplitClient`
(one process, as in benchmarks/grpc_throughput.py) train `--steps` steps
through a `LinkEmulator` on 127.0.0.1 (in a process of its own, unless
`--thread`), after 3 warm-up steps (tracing, the TLS
handshake, HTTP/2 window growth). The links: "direct" (no proxy), "proxy"
(the emulator with no delay, no bandwidth limit: its own cost), and the
emulated ones.

Printed per run:

- samples/s, and steps/s;
- the compute limit: unsplit `model.fit` of the same steps in the same run
  (the best of three fits before and three after the networked runs);
- the link limit: min(bandwidth / bytes per sample up, bandwidth / bytes per
  sample down, batch / RTT), the bytes as they cross the link (messages plus
  HTTP/2 and TLS framing). This is what a client could reach with the link
  kept busy (pipelined steps). A synchronous step pays the round trip and
  both transfers one after the other: batch / (RTT + batch x (up + down) /
  bandwidth), printed as "sync limit";
- where the time goes, as medians per step: the step; the client's part (the
  step less the call); the call to the server and back (`Transport.exchange`,
  timed by wrapping it); the call predicted by adding the link's round trip
  and both transfers to the same codec's call through the undelayed proxy
  (Python gRPC, TLS, codec, the server's work, the proxy); and what the
  measured call adds beyond that.

    python benchmarks/link.py [--steps 300] [--batch-size 64] [--codecs none,float16,int8,topk:0.1]
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_split  # noqa: E402
from keras_split.apps.demo import build_demo_cnn, demo_loss  # noqa: E402
from keras_split.network.devcerts import write_dev_certificates  # noqa: E402
from keras_split.network.emulator import LinkEmulator  # noqa: E402

WARMUP_STEPS = 3

# name: LinkEmulator arguments (None: connect to the server directly)
LINKS = {
    "direct": None,
    "proxy": {},
    "100Mbit 20ms": {"bandwidth": 100e6 / 8, "rtt": 0.020},
    "10Mbit 50ms": {"bandwidth": 10e6 / 8, "rtt": 0.050},
}


def batches(x, y, batch_size, steps):
    """`steps` full batches' worth of samples, the data repeated as needed."""
    repeats = -(-steps * batch_size // len(x))
    index = np.concatenate([np.arange(len(x))] * repeats)[:steps * batch_size]
    return x[index], y[index]


def unsplit_rate(weights, x, y, batch_size, steps, repeats=3):
    """Best of `repeats` timed fits of `steps` steps (one fit call has a fixed cost)."""
    model = build_demo_cnn()
    model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=demo_loss(), metrics=["accuracy"])
    warm_x, warm_y = batches(x, y, batch_size, WARMUP_STEPS)
    model.fit(warm_x, warm_y, batch_size=batch_size, verbose=0)
    xs, ys = batches(x, y, batch_size, steps)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(xs, ys, batch_size=batch_size, verbose=0)
        rates.append(len(xs) / (time.perf_counter() - start))
    return max(rates)


class StepTimer(keras.callbacks.Callback):
    """Wall time of each training step."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def networked_run(weights, codec, link, certs, x, y, batch_size, steps, process=True):
    split = keras_split.split(build_demo_cnn(), "pool2")
    split.merge().set_weights(weights)
    server = keras_split.SplitServer(
        split.server, demo_loss(), keras.optimizers.Adam(1e-3), ["accuracy"],
        tokens={"t": "bench"}, certificate=certs["server_cert"],
        private_key=certs["server_key"]).start()
    emulator = None
    try:
        address = f"127.0.0.1:{server.port}"
        if link is not None:
            emulator = LinkEmulator(("127.0.0.1", server.port), process=process,
                                    **link).start()
            address = emulator.endpoint
        client = keras_split.SplitClient(split.client, server=address, token="t",
                                         root_certificates=certs["ca"])
        client.compile(optimizer=keras.optimizers.Adam(1e-3),
                       compression=None if codec == "none" else codec)
        warm_x, warm_y = batches(x, y, batch_size, WARMUP_STEPS)
        client.fit(warm_x, warm_y, batch_size=batch_size, verbose=0)
        before = emulator.stats() if emulator else None
        xs, ys = batches(x, y, batch_size, steps)
        steps_timer, exchanges = StepTimer(), []
        exchange = client.transport._exchange

        def timed_exchange(message):
            start = time.perf_counter()
            reply = exchange(message)
            exchanges.append(time.perf_counter() - start)
            return reply

        # Transport's one method (keras_split.transport), wrapped to time it.
        client.transport._exchange = timed_exchange
        start = time.perf_counter()
        history = client.fit(xs, ys, batch_size=batch_size, verbose=0, callbacks=[steps_timer])
        seconds = time.perf_counter() - start
        result = {"rate": len(xs) / seconds,
                  "step_ms": 1000 * statistics.median(steps_timer.seconds),
                  "exchange_ms": 1000 * statistics.median(exchanges),
                  "client_ms": 1000 * statistics.median(
                      step - call for step, call in zip(steps_timer.seconds, exchanges,
                                                        strict=True)),
                  "msg_up": history.history["bytes_up"][0] / len(xs),
                  "msg_down": history.history["bytes_down"][0] / len(xs)}
        if emulator is not None:
            after = emulator.stats()
            result["wire_up"] = (after["bytes_up"] - before["bytes_up"]) / len(xs)
            result["wire_down"] = (after["bytes_down"] - before["bytes_down"]) / len(xs)
        client.transport.close()
        return result
    finally:
        if emulator is not None:
            emulator.stop()
        server.stop()


def link_limits(link, result, batch_size):
    """(link limit, synchronous limit) in samples/s; None when the link sets none."""
    bandwidth, rtt = link.get("bandwidth"), link.get("rtt", 0.0)
    bounds = []
    if bandwidth:
        bounds += [bandwidth / result["wire_up"], bandwidth / result["wire_down"]]
    if rtt:
        bounds.append(batch_size / rtt)
    if not bounds:
        return None, None
    transfer = batch_size * (result["wire_up"] + result["wire_down"]) / bandwidth if bandwidth \
        else 0.0
    return min(bounds), batch_size / (rtt + transfer)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--codecs", default="none,float16,int8,topk:0.1")
    parser.add_argument("--links", default=",".join(LINKS),
                        help=f"comma-separated, of: {', '.join(LINKS)}")
    parser.add_argument("--thread", action="store_true",
                        help="run the emulator on a thread of this process (it then waits "
                             "for the interpreter lock) instead of a process of its own")
    args = parser.parse_args()
    codecs = args.codecs.split(",")
    links = {name: LINKS[name] for name in args.links.split(",")}

    (x, y), _, _ = keras_split.datasets.load_pneumoniamnist_balanced()
    certs = write_dev_certificates(tempfile.mkdtemp())
    keras.utils.set_random_seed(0)
    weights = build_demo_cnn().get_weights()

    compute = [unsplit_rate(weights, x, y, args.batch_size, args.steps)]
    print(f"unsplit model.fit: {compute[-1]:.0f} samples/s", flush=True)
    results = {}
    for name, link in links.items():
        for codec in codecs:
            result = networked_run(weights, codec, link, certs, x, y, args.batch_size,
                                   args.steps, process=not args.thread)
            results[name, codec] = result
            print(f"{name:13} {codec:9} {result['rate']:8.0f} samples/s "
                  f"{result['step_ms']:7.2f} ms/step", flush=True)
    compute.append(unsplit_rate(weights, x, y, args.batch_size, args.steps))
    print(f"unsplit model.fit: {compute[-1]:.0f} samples/s", flush=True)
    limit = max(compute)

    print(f"\nbatch {args.batch_size}, {args.steps} timed steps per run; gRPC + TLS, one "
          f"process; compute limit = unsplit model.fit {limit:.0f} samples/s "
          f"(runs: {', '.join(f'{c:.0f}' for c in compute)})")
    print(f"{'link':13} {'codec':9} {'samples/s':>9} {'compute':>8} {'link lim':>8} "
          f"{'sync lim':>8} {'of sync':>7} {'B/smp up':>8} {'down':>6} | {'step':>6} "
          f"{'client':>6} {'call':>6} {'predict':>7} {'extra':>6}")
    for (name, codec), result in results.items():
        link = links[name]
        bounds = (None, None) if link is None else link_limits(link, result, args.batch_size)
        base = results.get(("proxy", codec))
        predicted = None
        if link and base is not None and bounds[1] is not None:
            # The call through the undelayed proxy, plus the round trip and both transfers.
            predicted = base["exchange_ms"] + 1000 * args.batch_size / bounds[1]
        up = result.get("wire_up", result["msg_up"])
        down = result.get("wire_down", result["msg_down"])
        print(f"{name:13} {codec:9} {result['rate']:9.0f} {limit:8.0f} "
              f"{cell(bounds[0], 8)} {cell(bounds[1], 8)} "
              f"{cell(bounds[1] and result['rate'] / bounds[1], 7, 2)} "
              f"{up:8.0f} {down:6.0f} | {result['step_ms']:6.2f} "
              f"{result['client_ms']:6.2f} {result['exchange_ms']:6.2f} "
              f"{cell(predicted, 7, 2)} "
              f"{cell(predicted and result['exchange_ms'] - predicted, 6, 2)}")
    print("\nB/smp: bytes per sample through the link (messages, HTTP/2 and TLS; 'direct': "
          "messages only).\nMedian ms per step: step; client (the step less the call: "
          "client compute, encode, decode); call (Transport.exchange: to the server and back,\n"
          "the server's work included); predict: the call through the undelayed proxy plus "
          "RTT plus both transfers; extra: call minus predict.")


def cell(value, width, digits=0):
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


if __name__ == "__main__":
    main()
