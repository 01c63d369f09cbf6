"""What hostile or numerous peers cost a SplitServer, measured on loopback.

    python benchmarks/hostile.py [--sessions 2000] [--clients 64] [--steps 20]

Prints, for a server half holding Dense, BatchNormalization and Dropout (Adam,
an accuracy metric):

1. malformed kinds: how many kinds of malformed Step message were tried, and
   how many were refused with every variable bitwise unchanged;
2. sessions: how many sessions the server held, and the memory per session
   (tracemalloc, Python allocations);
3. concurrent clients: N clients stepping at once, each its own session and
   token: server samples/s and p50/p99 step latency, against one client alone
   in the same run;
4. stalls: the time of an honest Open while 64 unauthenticated and 64
   authenticated calls sit open without sending their message;
5. turns: an honest step's latency while 6 SplitFed clients wait for a turn;
6. checkpoints: an honest step's latency, with a checkpoint folder, when 1 and
   when 200 other sessions hold a cached reply.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import grpc  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_split  # noqa: E402
from keras_split.network import convert as wire  # noqa: E402
from keras_split.network.server import SplitServer  # noqa: E402
from keras_split_wire import SERVICE  # noqa: E402
from keras_split_wire.proto import split_pb2 as pb  # noqa: E402

BATCH = 32


def server_half():
    x = keras.Input((64,), name="cut")
    h = keras.layers.Dense(64)(x)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Dropout(0.2, seed=1)(h)
    return keras.Model(x, keras.layers.Dense(3)(h))


def serve(tokens, **options):
    return SplitServer(server_half(),
                       keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       keras.optimizers.Adam(1e-3), metrics=["accuracy"], insecure=True,
                       tokens=tokens, **options).start()


class Peer:
    def __init__(self, port, token):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.step = 0
        self.rng = np.random.default_rng(hash(token) % 2**32)

    def call(self, method, request, reply):
        function = self.channel.unary_unary(f"/{SERVICE}/{method}",
                                            request_serializer=lambda m: m.SerializeToString(),
                                            response_deserializer=reply.FromString)
        return function(request, metadata=self.metadata, timeout=60)

    def open(self):
        cut = [pb.CutTensorSpec(name="cut", dtype="float32", shape=[-1, 64])]
        self.session = self.call("Open", pb.OpenRequest(protocol_version=1, cut=cut),
                                 pb.OpenReply).session_id

    def request(self, x=None, y=None, sample_weight=None):
        x = self.rng.normal(size=(BATCH, 64)).astype("float32") if x is None else x
        y = self.rng.integers(0, 3, len(x)) if y is None else y
        message = keras_split.Activations(self.step + 1, "train", (x,), labels=y,
                                          sample_weight=sample_weight)
        return wire.request_to_pb(self.session, message)

    def train(self):
        self.call("Step", self.request(), pb.StepReply)
        self.step += 1


def state(server):
    return {k: v.tobytes() for k, v in server.role.state().items()}


def malformed(port, server):
    peer = Peer(port, "t0")
    peer.open()
    peer.train()
    x = np.ones((BATCH, 64), "float32")
    y = np.zeros(BATCH, "int64")
    kinds = {
        "empty batch": peer.request(x[:0], y[:0]),
        "label outside the classes": peer.request(x, np.full(BATCH, 7)),
        "negative label": peer.request(x, np.full(BATCH, -1)),
        "labels of another length": peer.request(x, y[:5]),
        "activations 3e38": peer.request(np.full_like(x, 3e38), y),
        "sample weight 1e38": peer.request(x, y, np.full(BATCH, 1e38, "float32")),
        "negative sample weight": peer.request(x, y, -np.ones(BATCH, "float32")),
        "wrong dtype": peer.request(x.astype("float64"), y),
        "wrong shape": peer.request(np.ones((BATCH, 63), "float32"), y),
    }
    for name, field, value in [("NaN activation", "data", None), ("stale step", "step", 0),
                               ("skipped step", "step", 9), ("unknown mode", "mode", "x"),
                               ("unknown codec", "codec", "zip"), ("other session", "session",
                                                                   "0" * 32)]:
        request = pb.StepRequest.FromString(peer.request(x, y).SerializeToString())
        if field == "data":
            bad = x.copy()
            bad[0, 0] = np.nan
            request.activations[0].data = bad.tobytes()
        elif field == "step":
            request.step = value
        elif field == "mode":
            request.mode = value
        elif field == "codec":
            request.activations[0].codec = value
        else:
            request.session_id = value
        kinds[name] = request
    before = state(server)
    refused = unchanged = 0
    for request in kinds.values():
        try:
            peer.call("Step", request, pb.StepReply)
        except grpc.RpcError as error:
            refused += error.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK)
        unchanged += state(server) == before
    print(f"malformed kinds: {len(kinds)} tried, {refused} refused with a specific status, "
          f"{unchanged} with the state bitwise unchanged")


def sessions(count):
    tokens = {f"t{i}": f"client-{i}" for i in range(count)}
    server = serve(tokens)
    peers = [Peer(server.port, f"t{i}") for i in range(count)]
    tracemalloc.start()
    first = tracemalloc.take_snapshot()
    for peer in peers:
        peer.open()
    second = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in second.compare_to(first, "filename"))
    print(f"sessions: {len(server.sessions)} held; {grown / count:,.0f} bytes per session "
          f"(Python allocations, client and server side together in this process)")
    for peer in peers:
        peer.channel.close()
    server.stop()


def concurrent(clients, steps):
    tokens = {f"t{i}": f"client-{i}" for i in range(clients)}
    results = {}
    for count in (1, clients):
        server = serve(tokens, max_workers=4)
        peers = [Peer(server.port, f"t{i}") for i in range(count)]
        for peer in peers:
            peer.open()
            peer.train()  # warm up
        latencies = []
        lock = threading.Lock()

        def run(peer, latencies=latencies, lock=lock):
            for _ in range(steps):
                start = time.perf_counter()
                peer.train()
                with lock:
                    latencies.append(time.perf_counter() - start)

        threads = [threading.Thread(target=run, args=(p,)) for p in peers]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        results[count] = (count * steps * BATCH / elapsed,
                          statistics.median(latencies) * 1000,
                          np.percentile(latencies, 99) * 1000)
        for peer in peers:
            peer.channel.close()
        server.stop()
    for count, (rate, p50, p99) in results.items():
        print(f"concurrent clients {count:>3}: {rate:,.0f} samples/s, step p50 {p50:.1f} ms, "
              f"p99 {p99:.1f} ms")
    ratio = results[clients][0] / results[1][0]
    print(f"throughput ratio {clients} clients / 1 client: {ratio:.2f}")


def stalls():
    tokens = {f"t{i}": f"client-{i}" for i in range(70)}
    server = serve(tokens, first_message_timeout=60)
    never = threading.Event()
    opened = threading.Semaphore(0)
    held = []

    def requests():
        opened.release()
        never.wait(60)
        return
        yield

    for i in range(128):
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        call = channel.stream_unary(f"/{SERVICE}/Step", request_serializer=bytes,
                                    response_deserializer=bytes)
        metadata = (("authorization", f"Bearer t{i - 63}"),) if i >= 64 else ()
        held.append((channel, call.future(requests(), metadata=metadata, timeout=60)))
    for _ in held:
        opened.acquire(timeout=10)
    time.sleep(0.5)
    open_ = sum(not f.done() for _, f in held)
    peer = Peer(server.port, "t69")
    start = time.perf_counter()
    peer.open()
    took = (time.perf_counter() - start) * 1000
    print(f"stalls: honest Open in {took:.1f} ms with 64 unauthenticated (refused at once: "
          f"{sum(f.done() for _, f in held[:64])}) and 64 authenticated stalled calls "
          f"(still open: {open_})")
    never.set()
    for channel, _ in held:
        channel.close()
    server.stop(grace=0)


def median_step(peer, steps=30):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        peer.train()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def turns():
    from keras_split.configurations.rounds import RoundCoordinator

    tokens = {f"t{i}": f"client-{i}" for i in range(8)}
    coordinator = RoundCoordinator([np.zeros(4, "float32")], mode="splitfed", rounds=1,
                                   clients=8, turn_timeout=600, poll=5.0)
    server = serve(tokens, coordinator=coordinator, max_workers=4)
    honest = Peer(server.port, "t7")
    honest.open()
    honest.train()
    alone = median_step(honest)
    waiting, stop = [], threading.Event()

    def wait_for_turn(peer):
        while not stop.is_set():
            try:
                peer.call("Turn", pb.TurnRequest(session_id=peer.session, round=1),
                          pb.TurnReply)
            except grpc.RpcError:
                return  # the server stopped at the end of the measurement

    for i in range(6):
        peer = Peer(server.port, f"t{i}")
        peer.open()
        thread = threading.Thread(target=wait_for_turn, args=(peer,), daemon=True)
        thread.start()
        waiting.append((peer, thread))
    time.sleep(1.0)
    busy = median_step(honest)
    print(f"turns: honest step p50 {alone:.1f} ms alone, {busy:.1f} ms while 6 SplitFed "
          "clients wait for their turn")
    stop.set()
    server.stop(grace=0)


def checkpoints(folder):
    results = {}
    for others in (1, 200):
        tokens = {f"t{i}": f"client-{i}" for i in range(others + 1)}
        server = serve(tokens, checkpoint_dir=Path(folder) / str(others))
        for i in range(1, others + 1):
            peer = Peer(server.port, f"t{i}")
            peer.open()
            peer.train()  # a cached reply per session
            peer.channel.close()
        honest = Peer(server.port, "t0")
        honest.open()
        honest.train()
        results[others] = (median_step(honest),
                           (Path(folder) / str(others) / "server.ckpt").stat().st_size)
        server.stop()
    for others, (ms, size) in results.items():
        print(f"checkpoints: {others:>3} other sessions: honest step p50 {ms:.1f} ms, "
              f"server.ckpt {size:,} bytes")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    server = serve({"t0": "client-0"})
    malformed(server.port, server)
    server.stop()
    sessions(args.sessions)
    concurrent(args.clients, args.steps)
    stalls()
    turns()
    with tempfile.TemporaryDirectory() as folder:
        checkpoints(folder)


if __name__ == "__main__":
    main()
