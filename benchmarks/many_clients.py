"""Hundreds of light clients in rounds against one `keras-split serve` (issue 14, item 2).

    python benchmarks/many_clients.py --clients 500 --processes 4 --mode splitfed
    python benchmarks/many_clients.py --clients 500 --processes 4 --mode round_robin

What it runs:

- One `keras-split serve --rounds R --round-mode MODE --clients N` on loopback,
  with TLS (development certificates from `keras-split certs`) and a token
  file of N tokens, one per client; the demo CNN cut at pool2 (server half:
  the dense head, Adam 1e-3), `--save` for the final model.
- N light clients: the device runtime (`keras_split_edge.RoundClient`, the
  client half exported to LiteRT with Adam 1e-3, one interpreter each), each
  with its own token, TLS channel, session and shard, as threads in
  `--processes` client processes that never import TensorFlow. The shards are
  the shipped PneumoniaMNIST training split (2,428 chest X-rays) dealt with
  `keras_split.configurations.sharding.shard_dirichlet` (label skew,
  `--alpha`): about 5 images per client at 500 clients, unequal sizes, no
  data invented or repeated. Each turn is one epoch of batches of
  `--batch-size` (one step for most clients).
- Who asks when: the server answers a `Turn` call at once when the caller
  goes, else after its 5 s long poll. A server holds at most 256 calls
  (`SplitServer(max_concurrent_rpcs=256)`, not a `keras-split serve` flag), so
  500 clients cannot all wait at once: in each process the next `--holders`
  clients in turn order wait (a FIFO queue; a client that trained goes to the
  back), the others wait in the process. The clients join (their first
  `Turn`) one at a time per process, with a short probe, so that each
  process's turn order is known in round-robin.
- Accuracy per round: client 0 (process 0; the first member, so the first
  turn of every round-robin round) evaluates the client half it is handed at
  the start of each round against the server (`Step` in evaluate mode: the
  server half's loss and accuracy on the shipped test split, 468 images)
  before anyone else trains in that round (the others wait for the driver's
  gate); the last round's accuracy is the saved merged model's, evaluated
  here with Keras.
- Midway through `--kill-round` (once half its reports are in), the last
  client process is killed (SIGKILL): its clients that had not reported are
  dropped by the server's `turn_timeout` (SplitFed: once per round; round-robin:
  once per turn that comes while they are down). A new process with the same
  tokens and shards starts at once, opens new sessions and asks for turns from
  the next round: the clients rejoin.
- Bookkeeping checked against the server's own history (`keras-split serve`
  prints each round's trained and dropped clients): every client that was up
  for a whole round reported in it, the killed ones that did not report are
  the round's only dropped clients, and they train again in every later round.

Reported per round: test accuracy after the round, who trained / was dropped /
rejoined, wall time, bytes per client (every message of its session: Open,
Turn polls with the handed-out client half, steps, Report), device compute per
client (CPU seconds of the client thread in LiteRT: forward, backward, update,
set/get weights), server CPU seconds, server RSS and open file descriptors.
`--json FILE` writes all of it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEST_BATCH = 256


# -- a client process (no TensorFlow here) ---------------------------------------------


class _Holders:
    """The clients of one process that may wait on a `Turn` call: the first
    `size` of a FIFO queue kept in turn order."""

    def __init__(self, size: int, names):
        self.size = size
        self.queue = deque(names)
        self.cond = threading.Condition()

    def wait_front(self, name):
        with self.cond:
            self.cond.wait_for(lambda: name in list(self.queue)[:self.size])

    def leave(self, name):
        with self.cond:
            if name in self.queue:
                self.queue.remove(name)
            self.cond.notify_all()

    def enter(self, name):
        with self.cond:
            self.queue.append(name)
            self.cond.notify_all()


def _rss_mb(pid="self") -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    if "VmRSS:" not in text:  # a process that has exited
        return 0.0
    return int(text.split("VmRSS:")[1].split()[0]) / 1024


def client_process(spec, events, gate, first_joined):
    """Run `spec["clients"]` light clients as threads; report to `events`."""
    try:
        _client_process(spec, events, gate, first_joined)
    except BaseException:
        events.put(("error", spec["index"], traceback.format_exc()))
        raise


def _client_process(spec, events, gate, first_joined):
    from keras_split_edge import RoundClient, ServerLink, load

    with np.load(spec["data"]) as data:
        x, y, offsets = data["x"], data["y"], data["offsets"]
    with np.load(spec["test"]) as data:
        x_test, y_test = data["x"], data["y"]
    started = time.monotonic()
    clients = {}
    for name, token, index in spec["clients"]:
        link = ServerLink(spec["server"], token=token, root_certificates=spec["ca"],
                          timeout=60.0, retry_for=300.0)
        shard = slice(offsets[index], offsets[index + 1])
        clients[name] = RoundClient(load(spec["model"]), link, x[shard], y[shard],
                                    batch_size=spec["batch_size"], seed=spec["seed"])
    events.put(("ready", spec["index"], os.getpid(), time.monotonic() - started, _rss_mb()))
    names = [c[0] for c in spec["clients"]]
    evaluator = spec["evaluator"]
    holders = _Holders(spec["holders"], [n for n in names if n != evaluator])
    join_turn = [0]
    join_cond = threading.Condition()

    def wait_gate(round_):
        while gate.value < round_:
            time.sleep(0.01)

    def traffic(link):
        return (link.bytes_up + link.round_bytes_up + link.open_bytes,
                link.bytes_down + link.round_bytes_down)

    def run(position, name):
        client = clients[name]
        ready_for = spec["ready_for"]
        pending = None
        if spec["join"]:
            # Join one at a time, in order: the process's turn order is then its order.
            if name == evaluator:
                pending = client.turn(1, timeout=spec["probe"])
                first_joined.set()
            else:
                first_joined.wait()
                with join_cond:
                    join_cond.wait_for(lambda: join_turn[0] == position)
                pending = client.turn(1, timeout=spec["probe"])
                with join_cond:
                    join_turn[0] += 1
                    join_cond.notify_all()
            if not pending[0]:
                pending = None
        last = traffic(client.link)
        while True:
            if pending is None:
                if name != evaluator:
                    wait_gate(ready_for)
                    holders.wait_front(name)
                go, round_, weights, finished = client.turn(ready_for)
                if finished:
                    holders.leave(name)
                    if name == evaluator:
                        gate.value = 1 << 30  # no round left to evaluate: let all ask
                    events.put(("finished", name, time.monotonic()))
                    return
                if not go:
                    continue
            else:
                go, round_, weights, finished = pending
                pending = None
            holders.leave(name)
            events.put(("turn", name, round_, time.monotonic()))
            if name == evaluator:
                began, before = time.monotonic(), traffic(client.link)
                logs = client.evaluate(weights, x_test, y_test, TEST_BATCH)
                events.put(("eval", round_, dict(logs), time.monotonic() - began,
                            time.monotonic()))
                after = traffic(client.link)  # not the client's own traffic
                last = (last[0] + after[0] - before[0], last[1] + after[1] - before[1])
            wait_gate(round_)
            result = client.train(round_, weights)
            client.report(result)
            now = traffic(client.link)
            events.put(("report", name, round_, time.monotonic(), {
                "steps": result.steps, "samples": result.samples,
                "compute_s": result.compute_seconds, "wall_s": result.wall_seconds,
                "bytes_up": now[0] - last[0], "bytes_down": now[1] - last[1]}))
            last = now
            ready_for = round_ + 1
            if name != evaluator:
                holders.enter(name)

    threads = [threading.Thread(target=_guard, args=(run, events, i, n), daemon=True)
               for i, n in enumerate(n for n in names if n != evaluator)]
    if evaluator in clients:
        threads.insert(0, threading.Thread(target=_guard, args=(run, events, -1, evaluator),
                                           daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events.put(("done", spec["index"], _rss_mb()))


def _guard(run, events, position, name):
    try:
        run(position, name)
    except BaseException:
        events.put(("error", name, traceback.format_exc()))


# -- the driver --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(args, work: Path):
    """Halves, the device export, certificates, tokens, shards, the test split."""
    import keras

    from keras_split.apps.netdemo import save_halves
    from keras_split.configurations.sharding import shard_dirichlet
    from keras_split.datasets import load_pneumoniamnist_balanced
    from keras_split.export import export_client

    work.mkdir(parents=True, exist_ok=True)
    client_path, server_path = save_halves(work, cut="pool2", seed=args.seed)
    export_client(keras.models.load_model(client_path), work / "client.tflite",
                  optimizer=keras.optimizers.Adam(args.learning_rate))
    subprocess.run([sys.executable, "-m", "keras_split.apps.cli", "certs", "--out",
                    str(work / "certs")], check=True, capture_output=True)
    names = [f"c{i:03d}" for i in range(args.clients)]
    tokens = {name: secrets.token_hex(16) for name in names}
    (work / "tokens.txt").write_text("".join(f"{t} {n}\n" for n, t in tokens.items()))
    (x, y), _, (x_test, y_test) = load_pneumoniamnist_balanced()
    shards = shard_dirichlet(x, y, args.clients, alpha=args.alpha, seed=args.seed)
    sizes = np.array([len(s[1]) for s in shards])
    np.savez(work / "shards.npz", x=np.concatenate([s[0] for s in shards]),
             y=np.concatenate([s[1] for s in shards]),
             offsets=np.concatenate([[0], np.cumsum(sizes)]))
    np.savez(work / "test.npz", x=x_test, y=y_test)
    positive = np.array([float(np.mean(s[1])) for s in shards])
    skew = {"samples_min": int(sizes.min()), "samples_median": float(np.median(sizes)),
            "samples_max": int(sizes.max()), "samples_total": int(sizes.sum()),
            "single_class_clients": int(np.sum((positive == 0) | (positive == 1))),
            "mean_abs_label_skew": float(np.mean(np.abs(positive - 0.5)))}
    return names, tokens, client_path, server_path, skew


def _proc_stats(pid):
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    return cpu, _rss_mb(pid), fds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--mode", choices=["splitfed", "round_robin"], default="splitfed")
    parser.add_argument("--rounds", type=int, default=None,
                        help="default: 5 (SplitFed), 3 (round-robin: 3 x N turns)")
    parser.add_argument("--kill-round", type=int, default=2)
    parser.add_argument("--turn-timeout", type=float, default=None,
                        help="default: 30 s (SplitFed), 3 s (round-robin)")
    parser.add_argument("--holders", type=int, default=8)
    parser.add_argument("--probe", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/keras-split-many-clients")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.mode == "splitfed" else 3)
    turn_timeout = args.turn_timeout or (30.0 if args.mode == "splitfed" else 3.0)
    if not 1 <= args.kill_round < rounds:
        parser.error("--kill-round must be a round before the last")
    work = Path(args.work)
    began = time.monotonic()
    names, tokens, client_path, server_path, skew = _prepare(args, work)
    prepared = time.monotonic() - began
    print(f"prepared in {prepared:.0f} s: {args.clients} shards, Dirichlet alpha "
          f"{args.alpha}: {skew}", flush=True)

    port = _free_port()
    save = work / "trained"
    serve = [sys.executable, "-m", "keras_split.apps.cli", "serve", "--model", str(server_path),
             "--from-logits", "--learning-rate", str(args.learning_rate),
             "--address", f"127.0.0.1:{port}", "--cert", str(work / "certs" / "server.pem"),
             "--key", str(work / "certs" / "server.key"), "--token-file",
             str(work / "tokens.txt"), "--rounds", str(rounds), "--round-mode", args.mode,
             "--clients", str(args.clients), "--turn-timeout", str(turn_timeout),
             "--client-model", str(client_path), "--linger", "2", "--save", str(save)]
    server = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT)
    out_lines, err_lines = [], []

    def read(stream, into):
        for line in stream:
            into.append((time.monotonic(), line.rstrip("\n")))

    readers = [threading.Thread(target=read, args=(server.stdout, out_lines), daemon=True),
               threading.Thread(target=read, args=(server.stderr, err_lines), daemon=True)]
    for reader in readers:
        reader.start()
    while not any("serving" in line for _, line in out_lines):
        if server.poll() is not None:
            time.sleep(0.5)
            raise RuntimeError("the server did not start:\n" +
                               "\n".join(line for _, line in err_lines[-30:]))
        time.sleep(0.1)
    server_start = _proc_stats(server.pid)

    import multiprocessing

    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    gate = context.Value("i", 0)
    first_joined = context.Event()
    groups = np.array_split(np.arange(args.clients), args.processes)

    def spec(index, members, ready_for, join):
        return {"index": index, "server": f"127.0.0.1:{port}", "ca": str(work / "certs" / "ca.pem"),
                "model": str(work / "client.tflite"), "data": str(work / "shards.npz"),
                "test": str(work / "test.npz"), "batch_size": args.batch_size,
                "seed": args.seed, "holders": args.holders, "probe": args.probe,
                "clients": [(names[i], tokens[names[i]], int(i)) for i in members],
                "ready_for": ready_for, "join": join,
                "evaluator": names[0] if index == 0 else None}

    processes = [context.Process(target=client_process,
                                 args=(spec(p, g, 1, True), events, gate, first_joined))
                 for p, g in enumerate(groups)]
    clients_started = time.monotonic()
    for process in processes:
        process.start()
    victim = len(processes) - 1
    victims = [names[i] for i in groups[victim]]

    # Per round: turn starts, reports, evaluations; the kill and the rejoin.
    goes: dict[int, dict[str, float]] = {}
    reports: dict[int, dict[str, dict]] = {}
    report_times: dict[int, list[float]] = {}
    evals: dict[int, tuple] = {}
    ready, finished, errors, done = {}, set(), [], 0
    killed_at = rejoined_process = None
    samples = []  # (time, server cpu, rss, fds)
    expected = args.clients
    live = len(processes)
    last_sample = 0.0
    while done < live or server.poll() is None:
        if time.monotonic() - last_sample >= 0.5:
            stats = _proc_stats(server.pid)
            if stats is not None:
                samples.append((time.monotonic(), *stats))
            last_sample = time.monotonic()
        if server.poll() is not None and done < live and not any(
                p.is_alive() for p in processes):
            break
        try:
            event = events.get(timeout=0.2)
        except Exception:  # noqa: BLE001 - queue.Empty
            continue
        kind = event[0]
        if kind == "ready":
            ready[event[1]] = {"pid": event[2], "open_s": event[3], "rss_mb": event[4]}
        elif kind == "turn":
            goes.setdefault(event[2], {})[event[1]] = event[3]
        elif kind == "eval":
            round_ = event[1]
            evals[round_] = (event[2], event[3], event[4])
            print(f"round {round_} starts: accuracy before it {event[2].get('accuracy', 0):.4f}"
                  f" (evaluated in {event[3]:.2f} s)", flush=True)
            gate.value = round_
        elif kind == "report":
            _, name, round_, when, stats = event
            reports.setdefault(round_, {})[name] = stats
            report_times.setdefault(round_, []).append(when)
            if (round_ == args.kill_round and killed_at is None
                    and len(reports[round_]) >= expected // 2):
                processes[victim].kill()
                processes[victim].join()
                killed_at = time.monotonic()
                reported = sorted(set(victims) & set(reports[round_]))
                print(f"killed client process {victim} ({len(victims)} clients, "
                      f"{len(reported)} had reported round {round_})", flush=True)
                # Round-robin: the rejoining process's turn order is the round-1 order.
                order = sorted(groups[victim], key=lambda i: goes[1].get(names[i], 0.0))
                replacement = context.Process(
                    target=client_process,
                    args=(spec(victim, order, args.kill_round + 1, False), events, gate,
                          first_joined))
                replacement.start()
                processes.append(replacement)
                rejoined_process = len(processes) - 1
        elif kind == "finished":
            finished.add(event[1])
        elif kind == "done":
            done += 1
        elif kind == "error":
            errors.append(event[1:])
            print(f"error in {event[1]}:\n{event[2]}", file=sys.stderr, flush=True)
            if not isinstance(event[1], str):
                break
    clients_wall = time.monotonic() - clients_started
    try:
        server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()
    for process in processes:
        process.join(10)
        if process.is_alive():
            process.kill()
    for reader in readers:
        reader.join(10)

    result = _summarize(args, rounds, turn_timeout, names, victims, goes, reports,
                        report_times, evals, out_lines, err_lines, samples, ready, errors,
                        killed_at, save, skew, prepared, clients_wall, server_start,
                        rejoined_process)
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if result["bookkeeping"]["ok"] and not errors else 1


def _server_history(out_lines):
    history = {}
    for _, line in out_lines:
        if not line.startswith("round ") or ": trained " not in line:
            continue
        head, rest = line.split(": trained ", 1)
        round_ = int(head.split()[1])
        trained, _, dropped = rest.partition(", dropped ")
        split = [n.strip() for n in trained.split(",") if n.strip() and n.strip() != "nobody"]
        history[round_] = (split, [n.strip() for n in dropped.split(",") if n.strip()])
    return history


def _final_accuracy(save):
    import keras

    from keras_split.datasets import load_pneumoniamnist_balanced

    _, _, (x_test, y_test) = load_pneumoniamnist_balanced()
    model = keras.models.load_model(save / "model.keras")
    logits = model.predict(x_test, batch_size=TEST_BATCH, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == y_test))


def _summarize(args, rounds, turn_timeout, names, victims, goes, reports, report_times,
               evals, out_lines, err_lines, samples, ready, errors, killed_at, save, skew,
               prepared, clients_wall, server_start, rejoined_process):
    history = _server_history(out_lines)
    problems = []
    everyone, killed = set(names), set(victims)
    table = []
    final = _final_accuracy(save) if (save / "model.keras").exists() else None
    for round_ in range(1, rounds + 1):
        trained, dropped = history.get(round_, ([], []))
        if round_ not in history:
            problems.append(f"round {round_}: the server printed no history")
        reported = set(reports.get(round_, {}))
        # A killed process may take its last events with it (they were queued,
        # not yet sent): its clients' reports are checked on the server's side.
        lost = killed if round_ == args.kill_round else set()
        if set(trained) - lost != reported - lost or not reported <= set(trained):
            problems.append(f"round {round_}: the server's trained {len(trained)} != the "
                            f"clients' accepted reports {len(reported)}")
        if round_ == args.kill_round:
            if not set(dropped) <= killed:
                problems.append(f"round {round_}: dropped clients that were not killed: "
                                f"{sorted(set(dropped) - killed)}")
            if not everyone - killed <= set(trained):
                problems.append(f"round {round_}: live clients missing: "
                                f"{sorted(everyone - killed - set(trained))}")
            if set(trained) | set(dropped) != everyone:
                problems.append(f"round {round_}: neither trained nor dropped: "
                                f"{sorted(everyone - set(trained) - set(dropped))}")
            if not dropped:
                problems.append(f"round {round_}: nobody was dropped")
        else:
            if dropped:
                problems.append(f"round {round_}: dropped {dropped}")
            if set(trained) != everyone:
                problems.append(f"round {round_}: missing {sorted(everyone - set(trained))}")
        start = min(goes.get(round_, {}).values(), default=None)
        # The round ends when the next one starts (a drop may end it after the
        # last report); the last round, at its last report.
        end = min(goes.get(round_ + 1, {}).values(),
                  default=max(report_times.get(round_, []), default=None))
        stats = list(reports.get(round_, {}).values())
        window = [s for s in samples if start is not None and start <= s[0] <= (end or start)]
        cpu = (window[-1][1] - window[0][1]) if len(window) > 1 else None
        if round_ < rounds and round_ + 1 in evals:
            accuracy, loss = evals[round_ + 1][0].get("accuracy"), evals[round_ + 1][0].get("loss")
        else:
            accuracy, loss = final, None
        table.append({
            "round": round_, "trained": trained, "dropped": dropped,
            "rejoined": sorted(killed & set(trained)) if round_ > args.kill_round else [],
            "accuracy": accuracy, "loss": loss,
            "wall_s": None if start is None or end is None else end - start,
            "eval_s": evals.get(round_, (None, None))[1],
            "bytes_up_per_client": float(np.mean([s["bytes_up"] for s in stats])) if stats else 0,
            "bytes_down_per_client": (float(np.mean([s["bytes_down"] for s in stats]))
                                      if stats else 0),
            "compute_seconds_per_client": (float(np.mean([s["compute_s"] for s in stats]))
                                           if stats else 0),
            "turn_wall_s_mean": float(np.mean([s["wall_s"] for s in stats])) if stats else 0,
            "steps_per_client": float(np.mean([s["steps"] for s in stats])) if stats else 0,
            "server_cpu_s": cpu,
            "server_rss_mb_max": max((s[2] for s in window), default=None),
            "server_fds_max": max((s[3] for s in window), default=None),
        })
    accuracy0 = evals.get(1, ({},))[0].get("accuracy")
    return {
        "config": {"clients": args.clients, "processes": args.processes, "mode": args.mode,
                   "rounds": rounds, "kill_round": args.kill_round,
                   "turn_timeout": turn_timeout, "holders": args.holders,
                   "batch_size": args.batch_size, "alpha": args.alpha,
                   "learning_rate": args.learning_rate, "cores": os.cpu_count()},
        "shards": skew, "clients": names, "killed": victims,
        "initial_accuracy": accuracy0, "final_accuracy": final, "rounds": table,
        "prepare_s": prepared, "clients_wall_s": clients_wall,
        "client_processes": ready,
        "server_at_start": None if server_start is None else
        {"rss_mb": server_start[1], "fds": server_start[2]},
        "server_peak": {"rss_mb": max((s[2] for s in samples), default=None),
                        "fds": max((s[3] for s in samples), default=None),
                        "cpu_s": samples[-1][1] if samples else None},
        "errors": [list(map(str, e)) for e in errors],
        "server_errors": [line for _, line in err_lines
                          if "ERROR" in line or "Traceback" in line][:20],
        "bookkeeping": {"ok": not problems and not errors, "problems": problems},
    }


def _print(result):
    config = result["config"]
    print(f"\n{config['clients']} clients ({config['mode']}), {config['processes']} client "
          f"processes, {config['cores']} cores; accuracy before round 1: "
          f"{result['initial_accuracy']}")
    print("| round | trained | dropped | rejoined | test accuracy after | wall s | "
          "bytes up / client | bytes down / client | device CPU ms / client | server CPU s |"
          " server RSS MB | server fds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rounds"]:
        def fmt(value, spec):
            return "" if value is None else format(value, spec)
        print(f"| {r['round']} | {len(r['trained'])} | {len(r['dropped'])} | "
              f"{len(r['rejoined'])} | {fmt(r['accuracy'], '.4f')} | {fmt(r['wall_s'], '.1f')} | "
              f"{r['bytes_up_per_client']:,.0f} | {r['bytes_down_per_client']:,.0f} | "
              f"{r['compute_seconds_per_client'] * 1000:.1f} | {fmt(r['server_cpu_s'], '.1f')} |"
              f" {fmt(r['server_rss_mb_max'], '.0f')} | {fmt(r['server_fds_max'], 'd')} |")
    print(f"bookkeeping: {result['bookkeeping']}")
    print(f"server peak: {result['server_peak']}; clients wall {result['clients_wall_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
