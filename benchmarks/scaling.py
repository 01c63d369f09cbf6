"""One server half, many concurrent clients: throughput, latency and memory.

The server (`SplitServer`, TLS, one token per client, the demo CNN's server
half at `pool2`, Adam) runs in a process of its own; the clients are light
ones, the TensorFlow-free device link (`keras_split_edge.link.ServerLink`),
each with its own token, TLS connection and session, run as threads of this
process. Each client sends the same kind of step a real client sends (a batch
of cut activations of the demo's shape, 64 x 800 float32, and labels) and
takes the cut gradient back; it does no client-side compute, so the figures
are the server's and the link's.

For each client count N (1, 8, 64, 256 by default), all N connect and open
their sessions, then all train at once for `--seconds`: reported are the
server's samples per second (all clients together), the p50 and p99 step
latency seen by the clients, and the server process's memory (resident set
after the N sessions opened, and after they trained, when each holds its
cached last reply). Then, with a checkpoint folder, the step latency of one
active client beside 0 and 255 idle sessions (the checkpoint cost must not
grow with idle sessions), and the memory of idle sessions (`--sessions`
opened on few connections).

    python benchmarks/scaling.py [--clients 1,8,64,256] [--seconds 10] [--groups 8,32]
        [--rounds 2]

Everything shares this machine's cores: the clients' threads compete with the
server for them, so the figures are a lower bound for a server whose clients
are elsewhere. The client process's CPU time is printed beside each row.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BATCH = 64
CUT = (-1, 5, 5, 32)  # the demo CNN's pool2 output: 800 float32 per sample


def serve(args) -> None:
    """The server process: prints its port, then serves until killed."""
    import keras

    import keras_split
    from keras_split.apps.demo import build_demo_cnn, demo_loss

    split = keras_split.split(build_demo_cnn(), "pool2")
    tokens = {f"token-{i}": f"client-{i}" for i in range(args.max_clients)}
    role = None
    if args.group:
        from keras_split.configurations.parallel import ParallelRole
        from keras_split.roles import ServerRole

        role = ParallelRole(ServerRole(split.server, keras.optimizers.Adam(1e-3), demo_loss(),
                                       metrics=["accuracy"]),
                            window=args.window, max_group=args.group)
    server = keras_split.SplitServer(
        split.server, loss=demo_loss(), optimizer=keras.optimizers.Adam(1e-3),
        metrics=["accuracy"], tokens=tokens, role=role,
        certificate=Path(args.certs) / "server.pem", private_key=Path(args.certs) / "server.key",
        max_workers=args.workers, max_concurrent_rpcs=4 * args.max_clients + 16,
        max_sessions_per_client=max(8, args.sessions_per_client),
        session_idle_timeout=None, checkpoint_dir=args.checkpoint_dir or None)
    server.start()
    print(server.port, flush=True)
    server.wait()


class Server:
    def __init__(self, certs: str, max_clients: int, workers: int, checkpoint_dir: str = "",
                 sessions_per_client: int = 8, group: int = 0, window: float = 0.0):
        command = [sys.executable, __file__, "--serve", "--certs", certs,
                   "--max-clients", str(max_clients), "--workers", str(workers),
                   "--sessions-per-client", str(sessions_per_client),
                   "--group", str(group), "--window", str(window)]
        if checkpoint_dir:
            command += ["--checkpoint-dir", checkpoint_dir]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the server did not start (printed {line!r})")
        self.address = f"localhost:{line.strip()}"

    def memory(self) -> tuple[float, float]:
        """(resident, peak resident) in MB, from /proc."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
        return fields["VmRSS"], fields["VmHWM"]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def link(server: Server, certs: str, i: int):
    from keras_split_edge.link import ServerLink

    result = ServerLink(server.address, token=f"token-{i}",
                        root_certificates=Path(certs) / "ca.pem")
    result.open([("float32", CUT)])
    return result


def batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    activations = rng.random((BATCH, *CUT[1:]), dtype=np.float32)
    return activations, rng.integers(0, 2, BATCH).astype(np.int64)


def train_together(links, seconds: float) -> tuple[list[float], int, float]:
    """Every link trains in its own thread for `seconds`; returns the step
    latencies (s), the samples trained and the wall time."""
    start = threading.Barrier(len(links) + 1)
    latencies: list[list[float]] = [[] for _ in links]
    errors: list[BaseException] = []

    def run(i):
        activations, labels = batch(i)
        start.wait()
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                began = time.perf_counter()
                links[i].exchange("train", [activations], labels)
                latencies[i].append(time.perf_counter() - began)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(links))]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if errors:
        raise errors[0]
    flat = [t for per in latencies for t in per]
    idle = sum(1 for per in latencies if not per)
    if idle:
        raise RuntimeError(f"{idle} of {len(links)} clients never completed a step")
    return flat, len(flat) * BATCH, wall


def percentile(values, q) -> float:
    return float(np.percentile(np.asarray(values), q)) * 1e3


def measure(server: Server, certs: str, count: int, seconds: float) -> dict:
    links = [link(server, certs, i) for i in range(count)]
    for i, each in enumerate(links):  # one warm-up step each, not timed
        each.exchange("train", [batch(i)[0]], batch(i)[1])
    idle, _ = server.memory()
    cpu = time.process_time()
    latencies, samples, wall = train_together(links, seconds)
    cpu = time.process_time() - cpu
    trained, peak = server.memory()
    row = {"rate": samples / wall, "steps": len(latencies) / wall,
           "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
           "fewest": min(each.step for each in links) - 1, "idle": idle, "trained": trained,
           "peak": peak, "cpu": cpu / wall}
    for each in links:
        each.close()
    return row


def scaling(args, certs) -> None:
    """Every configuration's server runs at once (an idle one costs nothing);
    for each client count the configurations train in turns, `--rounds` times,
    so the load of this shared machine hits all alike. Each row is the round
    with the best rate."""
    configurations = [("one step per client step", 0)] + [
        (f"ParallelRole, groups up to {g}", g) for g in args.groups]
    print(f"batch {BATCH}, cut 64 x 800 float32 (204,800 bytes up per step), TLS, one token "
          f"and connection per client, {args.seconds:g} s of training per run, "
          f"{args.rounds} runs per row in turns, the best shown; ParallelRole groups the steps "
          f"that arrive while the server is busy"
          f"{f' or within {args.window * 1e3:g} ms' if args.window else ''} "
          f"(max_workers = group + 2; else {args.workers})")
    servers = [Server(certs, max(args.clients), group + 2 if group else args.workers,
                      sessions_per_client=args.rounds * len(args.clients) + 2, group=group,
                      window=args.window) for _, group in configurations]
    try:
        base = [server.memory()[0] for server in servers]
        rows: dict[tuple[int, int], list[dict]] = {}
        for count in args.clients:
            for _ in range(args.rounds):
                for k, server in enumerate(servers):
                    rows.setdefault((count, k), []).append(
                        measure(server, certs, count, args.seconds))
        for k, (name, _) in enumerate(configurations):
            print(f"\n{name} (server RSS before any client: {base[k]:.1f} MB)")
            print(f"{'clients':>7} {'samples/s':>10} {'(runs)':>14} {'steps/s':>8} "
                  f"{'p50 ms':>8} {'p99 ms':>8} {'min/client':>10} {'RSS idle MB':>12} "
                  f"{'RSS trained':>12} {'peak':>7} {'client CPU':>10}")
            for count in args.clients:
                runs = rows[(count, k)]
                best = max(runs, key=lambda r: r["rate"])
                every = "/".join(f"{r['rate'] / 1e3:.1f}k" for r in runs)
                print(f"{count:7d} {best['rate']:10.0f} {every:>14} {best['steps']:8.1f} "
                      f"{best['p50']:8.2f} {best['p99']:8.2f} {best['fewest']:10d} "
                      f"{best['idle']:12.1f} {best['trained']:12.1f} {best['peak']:7.1f} "
                      f"{best['cpu']:9.0%}", flush=True)
    finally:
        for server in servers:
            server.stop()


def checkpoints(args, certs) -> None:
    print("\ncheckpoint every step: one client training beside idle sessions")
    print(f"{'idle sessions':>13} {'p50 ms':>8} {'p99 ms':>8} {'samples/s':>10}")
    for idle_count in (0, 255):
        with tempfile.TemporaryDirectory() as folder:
            server = Server(certs, idle_count + 1, args.workers, checkpoint_dir=folder)
            try:
                idle = [link(server, certs, i + 1) for i in range(idle_count)]
                for i, each in enumerate(idle):  # each has stepped once: it has a record
                    each.exchange("train", [batch(i)[0]], batch(i)[1])
                active = link(server, certs, 0)
                active.exchange("train", [batch(0)[0]], batch(0)[1])
                latencies, samples, wall = train_together([active], args.seconds)
                print(f"{idle_count:13d} {percentile(latencies, 50):8.2f} "
                      f"{percentile(latencies, 99):8.2f} {samples / wall:10.0f}", flush=True)
                for each in idle + [active]:
                    each.close()
            finally:
                server.stop()


def session_memory(args, certs) -> None:
    print(f"\nmemory of idle sessions: {args.sessions} sessions opened on "
          f"{args.sessions // 8} connections (8 each)")
    connections = args.sessions // 8
    server = Server(certs, connections + 1, args.workers, sessions_per_client=8)
    try:
        warm = link(server, certs, connections)  # the server's first steps trace its graph
        for i in range(3):
            warm.exchange("train", [batch(i)[0]], batch(i)[1])
        warm.close()
        before, _ = server.memory()
        links = []
        for i in range(connections):
            each = link(server, certs, i)
            for _ in range(7):
                each.open([("float32", CUT)])
            links.append(each)
        opened, _ = server.memory()
        # one step in each connection's last session: it then caches a reply
        for i, each in enumerate(links):
            each.exchange("train", [batch(i)[0]], batch(i)[1])
        stepped, _ = server.memory()
        print(f"server RSS {before:.1f} MB; after opening {args.sessions} sessions "
              f"{opened:.1f} MB ({(opened - before) * 1024 / args.sessions:.1f} kB per session "
              f"with its connection share); after one step in {connections} of them "
              f"{stepped:.1f} MB ({(stepped - opened) * 1024 / connections:.1f} kB per stepped "
              f"session; a cached reply is 64 x 800 x 4 = 200 kB of gradients)")
        for each in links:
            each.close()
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,64,256")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--sessions", type=int, default=1024)
    parser.add_argument("--groups", default="8,32",
                        help="ParallelRole group sizes to measure too (comma list; '' for none)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs per configuration and client count, in turns (default 2)")
    parser.add_argument("--window", type=float, default=0.0,
                        help="ParallelRole window in seconds (default 0: group what waits)")
    parser.add_argument("--skip", default="", help="comma list of: scaling,checkpoints,memory")
    parser.add_argument("--group", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--certs", help=argparse.SUPPRESS)
    parser.add_argument("--max-clients", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sessions-per-client", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    args.clients = [int(c) for c in args.clients.split(",")]
    args.groups = [int(g) for g in args.groups.split(",") if g]
    skip = set(args.skip.split(","))
    from keras_split.network.devcerts import write_dev_certificates

    with tempfile.TemporaryDirectory() as certs:
        write_dev_certificates(certs)
        if "scaling" not in skip:
            scaling(args, certs)
        if "checkpoints" not in skip:
            checkpoints(args, certs)
        if "memory" not in skip:
            session_memory(args, certs)


if __name__ == "__main__":
    main()
