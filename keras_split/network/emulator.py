"""A slow, distant or lossy network link on loopback, for tests and benchmarks.

`LinkEmulator` is a userspace TCP proxy: it listens on 127.0.0.1, and relays
every connection it accepts to `target`, delaying and pacing the bytes each way
as a link with the given round-trip time, bandwidth and loss would. It sees
only bytes, so TLS and gRPC pass through it unchanged (a certificate for
127.0.0.1 or localhost still matches). Use it where the kernel's `netem` is
not available (containers without CAP_NET_ADMIN).

The model, per direction of each connection (the two directions are
independent, and so are connections):

1. **Bandwidth** is a pacer, a token bucket with a bucket of zero: bytes leave
   one after the other at `bandwidth` bytes/s, the way a link serialises them.
   A burst read from the sender at time t starts at max(t, when the link is
   next free) and its last byte has left `len / bandwidth` later. Bursts are
   cut into pieces of at most a millisecond of transmission (and at least one
   segment, 1448 bytes), so that a large write trickles out rather than
   arriving all at once after being wholly transmitted.
2. **Latency**: each piece arrives `latency` seconds (half the round trip)
   after its last byte left. Pieces are delivered in order.
3. **Loss**: a TCP proxy cannot drop packets (the kernel's TCP on both sides
   would never see a gap), so loss is emulated as the delay TCP turns it into.
   The stream is cut into segments of 1448 bytes, each lost independently with
   probability `loss`. A lost segment is sent again: it takes the link for its
   length a second time, and it arrives `retransmit_delay` later than it would
   have (default: one round trip, TCP's fast retransmit, which detects a loss
   when three later segments are acknowledged). Since TCP delivers in order,
   everything behind it waits for it (head-of-line blocking). Not modelled: the
   halving of TCP's congestion window after a loss (which lowers the rate of a
   long bulk transfer further, see Mathis et al. 1997), and the longer
   timeout when a loss is at the very end of a message with no later segments
   to signal it (Linux: a tail-loss probe after about two round trips, or
   200 ms at least for a full retransmission timeout). The model is therefore
   a lower bound on what loss costs. Connection resets were the alternative;
   they are not what a lossy link does to TCP (it stalls, it does not drop the
   connection) and they would test the client's retry policy rather than its
   speed.
4. **Flow control**: each direction holds at most `buffer` bytes in flight
   (read from the sender, not yet delivered); beyond that the proxy stops
   reading, and the sender's TCP window fills as it would on a real link.
   The default holds twice the bandwidth-delay product plus 1 MiB.
5. **Closing**: end of stream (FIN) travels like data: one side's close
   reaches the other side after the latency, once the bytes before it are
   delivered. A reset or error on either side aborts both.

Also not modelled: TCP slow start (a real connection starts at ten segments
per round trip and doubles; a long-lived gRPC connection is past it after a
few steps), and jitter.

The proxy runs its own asyncio event loop on a background thread (or, with
`process=True`, in a child process), so that synchronous code (Keras's `fit`,
gRPC's synchronous client) can use it as a context manager. Its accuracy is
measured in BENCHMARKS.md: a training step's call over an emulated link takes
the call on loopback plus the round trip plus both transfers, within 1 ms.

Example:

```python
from keras_split.network.emulator import LinkEmulator

server = SplitServer(...).start()
with LinkEmulator(target=("127.0.0.1", server.port), rtt=0.02,
                  bandwidth=100e6 / 8) as link:
    client = SplitClient(split.client, server=link.endpoint, ...)
    client.compile(optimizer="adam")
    client.fit(x, y, batch_size=64)
    print(link.stats())  # bytes each way, connections, segments lost
```
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import IO, Any

__all__ = ["LinkEmulator", "SEGMENT"]

SEGMENT = 1448
"""Bytes of payload per TCP segment (Ethernet MTU, IPv4, TCP timestamps): the
unit of loss."""

_READ = 64 * 1024  # the most read from a sender at once
_PIECE_SECONDS = 0.001  # pacing granularity: a piece is at most this long on the wire


@dataclass(frozen=True)
class _Direction:
    latency: float
    bandwidth: float | None
    loss: float
    retransmit_delay: float
    buffer: int


@dataclass
class _Counters:
    bytes_up: int = 0
    bytes_down: int = 0
    connections: int = 0
    segments_lost: int = 0


def _positive_or_none(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of bytes per second or None "
                         f"(unlimited); received {value!r}. For 100 Mbit/s pass 100e6 / 8.")
    return float(value)


def _parse_target(target: tuple[str, int] | str) -> tuple[str, int]:
    if isinstance(target, str):
        host, sep, digits = target.rpartition(":")
        if not sep or not digits.isdigit():
            raise ValueError(f"target must be (host, port) or 'host:port'; received {target!r}.")
        return host.strip("[]"), int(digits)
    return str(target[0]), int(target[1])


class LinkEmulator:
    """A TCP proxy on loopback that behaves like a link with latency, bandwidth and loss.

    Connect to `address` (or `endpoint`, "127.0.0.1:PORT") instead of the
    target; everything else is unchanged. See the module docstring for the
    model and what it leaves out.

    Args:
        target: where connections are relayed: (host, port) or "host:port".
        rtt: round-trip time in seconds; each direction gets half. Give
            `rtt` or `latency`, not both; neither means no delay.
        latency: one-way delay in seconds (the round trip is twice this).
        bandwidth: bytes per second each way (100 Mbit/s is 100e6 / 8), or
            a pair (client to target, target to client); None is unlimited.
        loss: probability that a segment of 1448 bytes is lost, each way;
            emulated as a retransmission delay (see the module docstring).
        retransmit_delay: extra delay of a lost segment, seconds; default one
            round trip.
        buffer: most bytes in flight each way before the proxy stops reading
            from the sender; default twice the bandwidth-delay product plus
            1 MiB (16 MiB with unlimited bandwidth).
        seed: seeds the loss draws, for repeatable runs.
        host, port: where the proxy listens; port 0 picks a free one.
        process: run the proxy in a child process of its own instead of a
            thread of this one. A thread must take Python's interpreter lock
            from this process's Python code (a hand-over can wait up to
            `sys.getswitchinterval()`, 5 ms), which may delay the bytes it
            relays; a process does not. On the demo CNN both gave the same
            training rates within noise (BENCHMARKS.md); benchmarks use a
            process to be sure.

    Example:

    ```python
    with LinkEmulator(("127.0.0.1", 50051), rtt=0.05, bandwidth=10e6 / 8) as link:
        channel = grpc.secure_channel(link.endpoint, credentials)
    ```
    """

    def __init__(self, target: tuple[str, int] | str, *, rtt: float | None = None,
                 latency: float | None = None,
                 bandwidth: float | tuple[float | None, float | None] | None = None,
                 loss: float = 0.0, retransmit_delay: float | None = None,
                 buffer: int | None = None, seed: int | None = None,
                 host: str = "127.0.0.1", port: int = 0, process: bool = False):
        if rtt is not None and latency is not None:
            raise ValueError(f"Give rtt or latency, not both (received rtt={rtt}, "
                             f"latency={latency}); the round trip is twice the latency.")
        one_way = (rtt / 2 if rtt is not None else latency) or 0.0
        if not (math.isfinite(one_way) and one_way >= 0):
            raise ValueError(f"rtt and latency must be >= 0 seconds; received rtt={rtt}, "
                             f"latency={latency}.")
        if not 0 <= loss < 1:
            raise ValueError(f"loss is the probability that a segment is lost, in [0, 1); "
                             f"received {loss}.")
        if retransmit_delay is not None and retransmit_delay < 0:
            raise ValueError(f"retransmit_delay must be >= 0 seconds; received "
                             f"{retransmit_delay}.")
        if buffer is not None and buffer < _READ:
            raise ValueError(f"buffer must be at least {_READ} bytes; received {buffer}.")
        up, down = bandwidth if isinstance(bandwidth, tuple) else (bandwidth, bandwidth)
        self.target = _parse_target(target)
        self.rtt = 2 * one_way
        self.latency = one_way
        self.bandwidth = bandwidth
        self.loss = loss
        self.retransmit_delay = self.rtt if retransmit_delay is None else retransmit_delay
        self.seed = seed
        self._directions = (self._direction(up, buffer), self._direction(down, buffer))
        self._bind = (host, port)
        self.process = process
        self._child: subprocess.Popen[str] | None = None
        self._arguments = {"target": list(self.target), "latency": one_way,
                           "bandwidth": list(bandwidth) if isinstance(bandwidth, tuple)
                           else bandwidth, "loss": loss,
                           "retransmit_delay": self.retransmit_delay, "buffer": buffer,
                           "seed": seed, "host": host, "port": port}
        self._random = random.Random(seed)
        self._counters = _Counters()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.address: tuple[str, int] | None = None

    def _direction(self, bandwidth: float | None, buffer: int | None) -> _Direction:
        rate = _positive_or_none("bandwidth", bandwidth)
        if buffer is None:
            buffer = 16 << 20 if rate is None else int(2 * rate * self.latency) + (1 << 20)
        return _Direction(self.latency, rate, self.loss, self.retransmit_delay, buffer)

    def __repr__(self) -> str:
        rate = ("unlimited" if self.bandwidth is None
                else f"{self.bandwidth!r} B/s")
        where = f"{self.endpoint} -> " if self.address else ""
        return (f"LinkEmulator({where}{self.target[0]}:{self.target[1]}, rtt={self.rtt}s, "
                f"bandwidth={rate}, loss={self.loss})")

    @property
    def port(self) -> int:
        """The port the proxy listens on (after `start`)."""
        if self.address is None:
            raise RuntimeError("The link emulator is not running: call start() or use it "
                               "in a with block.")
        return self.address[1]

    @property
    def endpoint(self) -> str:
        """"host:port" to connect to, as gRPC takes it."""
        host = self.address[0] if self.address else self._bind[0]
        return f"{host}:{self.port}"

    def stats(self) -> dict[str, int]:
        """Bytes relayed each way (up: towards the target), connections accepted and
        segments lost so far."""
        if self._child is not None:
            return self._ask_child("stats")
        with self._lock:
            return dict(vars(self._counters))

    # --- lifetime -------------------------------------------------------

    def start(self) -> LinkEmulator:
        """Start listening (on a background thread, or in a child process with
        `process=True`); returns self."""
        if self._thread is not None or self._child is not None:
            raise RuntimeError("This link emulator is already running.")
        if self.process:
            return self._start_child()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, *self._bind))
                sockname = self._server.sockets[0].getsockname()
                self.address = (sockname[0], sockname[1])
            except BaseException as error:  # reported to the caller of start()
                failure.append(error)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="link-emulator", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop listening and abort every relayed connection; `stats()` still
        answers."""
        if self._child is not None:
            self._stop_child()
        elif self._thread is not None and self._loop is not None:
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            future.result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._thread = None
            self._loop = None
        self.address = None

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # --- in a child process ---------------------------------------------
    # The child runs this file as a script (so it imports neither TensorFlow
    # nor keras_split) and speaks one JSON line per request: its address when
    # started, then the answer to each "stats" line; it stops when its
    # standard input closes, so it cannot outlive its parent.

    def _start_child(self) -> LinkEmulator:
        self._child = subprocess.Popen(
            [sys.executable, "-I", __file__, json.dumps(self._arguments)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        host, port = self._read_child()
        self.address = (str(host), int(port))
        return self

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        child = self._child
        if child is None or child.stdin is None or child.stdout is None:
            raise RuntimeError("The link emulator's process is not running.")
        return child.stdin, child.stdout

    def _read_child(self) -> Any:
        line = self._pipes()[1].readline()
        if not line:
            code = self._child.wait() if self._child else None
            self._child = None
            raise RuntimeError(f"The link emulator's process exited with status {code} "
                               "before answering; its error is printed above.")
        return json.loads(line)

    def _ask_child(self, request: str) -> Any:
        with self._lock:
            stdin = self._pipes()[0]
            stdin.write(request + "\n")
            stdin.flush()
            return self._read_child()

    def _stop_child(self) -> None:
        final = self._ask_child("stats")  # kept, so that stats() answers after stop()
        with self._lock:
            self._counters = _Counters(**final)
        stdin, stdout = self._pipes()
        child, self._child = self._child, None
        stdin.close()
        if child is not None:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        stdout.close()

    # --- relaying -------------------------------------------------------

    async def _accept(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(client_writer)
        writers = [client_writer]
        clean = False
        try:
            clean = await self._relay(client_reader, client_writer, writers)
        except OSError:
            pass  # the target refused, or one side reset or failed: abort both, below
        except asyncio.CancelledError:
            # stop() cancels us. Ending normally keeps asyncio's streams from
            # logging the cancellation as an error (Python 3.11).
            pass
        finally:
            for writer in writers:
                self._writers.discard(writer)
                if clean:
                    writer.close()  # both ends closed: what is buffered still goes out
                else:
                    writer.transport.abort()
            if task is not None:
                self._tasks.discard(task)

    async def _relay(self, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter,
                     writers: list[asyncio.StreamWriter]) -> bool:
        """Connect to the target and relay both ways until both ends have closed."""
        target_reader, target_writer = await asyncio.open_connection(*self.target)
        writers.append(target_writer)
        self._writers.add(target_writer)
        with self._lock:
            self._counters.connections += 1
        pipes = [asyncio.ensure_future(self._pipe(client_reader, target_writer,
                                                  self._directions[0], "bytes_up")),
                 asyncio.ensure_future(self._pipe(target_reader, client_writer,
                                                  self._directions[1], "bytes_down"))]
        try:
            await asyncio.gather(*pipes)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
        return True

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: _Direction, counter: str) -> None:
        """Relay one direction: read, schedule each piece's arrival, deliver in order."""
        loop = asyncio.get_running_loop()
        queue: deque[tuple[float, bytes | None]] = deque()
        arrived = asyncio.Event()
        space = asyncio.Event()
        in_flight = 0

        async def receive() -> None:
            nonlocal in_flight
            free_at = 0.0  # when the link has finished sending what it was given
            last = 0.0  # arrival of the last piece: delivery stays in order
            while True:
                while in_flight >= direction.buffer:
                    space.clear()
                    await space.wait()
                data = await reader.read(_READ)
                now = loop.time()
                if not data:
                    queue.append((max(now + direction.latency, last), None))
                    arrived.set()
                    return
                in_flight += len(data)
                for piece in self._pieces(data, direction):
                    sending, delay = len(piece), direction.latency
                    lost = self._lost(len(piece), direction)
                    if lost:
                        sending += lost * SEGMENT
                        delay += direction.retransmit_delay
                    if direction.bandwidth is not None:
                        free_at = max(now, free_at) + sending / direction.bandwidth
                    else:
                        free_at = now
                    last = max(free_at + delay, last)
                    queue.append((last, piece))
                arrived.set()

        async def deliver() -> None:
            nonlocal in_flight
            while True:
                while not queue:
                    arrived.clear()
                    await arrived.wait()
                due = queue[0][0]
                # Sleep until the piece is due, never less (timers may fire early).
                while (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                now, pieces, end = loop.time(), [], False
                while queue and queue[0][0] <= now:
                    data = queue.popleft()[1]
                    if data is None:
                        end = True
                        break
                    pieces.append(data)
                sent = b"".join(pieces)
                if sent:
                    with self._lock:  # before the write, which may reach the peer at once
                        setattr(self._counters, counter,
                                getattr(self._counters, counter) + len(sent))
                    writer.write(sent)
                if end and writer.can_write_eof():
                    writer.write_eof()
                await writer.drain()
                in_flight -= len(sent)
                space.set()
                if end:
                    return

        tasks = [asyncio.ensure_future(receive()), asyncio.ensure_future(deliver())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def _pieces(data: bytes, direction: _Direction) -> list[bytes]:
        if direction.bandwidth is None:
            return [data]
        size = max(SEGMENT, int(direction.bandwidth * _PIECE_SECONDS))
        return [data[i:i + size] for i in range(0, len(data), size)]

    def _lost(self, length: int, direction: _Direction) -> int:
        """How many of the segments in `length` bytes are lost (and sent again)."""
        if direction.loss == 0:
            return 0
        draw = self._random.random
        lost = sum(draw() < direction.loss for _ in range(-(-length // SEGMENT)))
        if lost:
            with self._lock:
                self._counters.segments_lost += lost
        return lost


def _child_main(arguments: str) -> None:
    options = json.loads(arguments)
    if isinstance(options["bandwidth"], list):
        options["bandwidth"] = tuple(options["bandwidth"])
    with LinkEmulator(**options) as link:
        print(json.dumps(link.address), flush=True)
        for line in sys.stdin:
            if line.strip() == "stats":
                print(json.dumps(link.stats()), flush=True)


if __name__ == "__main__":
    _child_main(sys.argv[1])
