"""The link emulator against hand-computed delays, and gRPC with TLS through it.

Timing assertions hold on a loaded shared machine: lower bounds are strict
(the emulator must never be faster than the link it models), upper bounds are
loose (a busy machine only adds time).
"""

import queue
import socket
import threading
import time

import keras
import numpy as np
import pytest

import keras_split
from keras_split.network import devcerts as certs
from keras_split.network.client import SplitClient
from keras_split.network.emulator import LinkEmulator
from keras_split.network.server import SplitServer
from tests import models

SLACK = 1.0  # seconds a loaded machine may add to any timing


class Target:
    """A TCP server on loopback: echoes, or hands its accepted sockets to the test."""

    def __init__(self, echo=True):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.accepted = queue.Queue()
        self.echo = echo
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.echo:
                threading.Thread(target=self._echo, args=(conn,), daemon=True).start()
            else:
                self.accepted.put(conn)

    @staticmethod
    def _echo(conn):
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    def close(self):
        self.listener.close()


@pytest.fixture
def echo():
    target = Target()
    yield target
    target.close()


@pytest.fixture
def sink():
    target = Target(echo=False)
    yield target
    target.close()


def _connect(link):
    conn = socket.create_connection(link.address, timeout=10)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _receive(conn, size):
    parts, got = [], 0
    while got < size:
        data = conn.recv(1 << 20)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def test_a_ping_pong_takes_a_round_trip(echo):
    rtt = 0.04
    with LinkEmulator(echo.address, rtt=rtt) as link, _connect(link) as conn:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            conn.sendall(b"p")
            assert conn.recv(1) == b"p"
            times.append(time.perf_counter() - start)
    # One byte each way: latency rtt/2 up, rtt/2 down, no bandwidth limit.
    assert min(times) >= rtt
    assert np.median(times) < rtt + SLACK


@pytest.mark.parametrize("direction", ["up", "down"])
def test_n_bytes_take_n_over_the_bandwidth_each_way(sink, direction):
    # Asymmetric: 2 MB/s towards the target, 1 MB/s back. 400 kB one way take
    # 0.2 s (up) or 0.4 s (down) to serialise, plus the one-way latency 0.01 s.
    up, down, latency, size = 2e6, 1e6, 0.01, 400_000
    payload = np.random.default_rng(0).bytes(size)
    with LinkEmulator(sink.address, latency=latency, bandwidth=(up, down)) as link:
        with _connect(link) as conn:
            far = sink.accepted.get(timeout=10)
            sender, receiver = (conn, far) if direction == "up" else (far, conn)
            start = time.perf_counter()
            threading.Thread(target=sender.sendall, args=(payload,), daemon=True).start()
            received = _receive(receiver, size)
            elapsed = time.perf_counter() - start
            far.close()
        stats = link.stats()
    assert received == payload
    expected = size / (up if direction == "up" else down) + latency
    assert elapsed >= expected
    assert elapsed < 2 * expected + SLACK
    assert stats[f"bytes_{direction}"] == size


def test_data_arrives_intact_and_in_order_both_ways_with_loss(echo):
    # 1 MB of random bytes through a link that loses 5% of segments each way:
    # losses only delay, and TCP order holds.
    payload = np.random.default_rng(1).bytes(1_000_000)
    with LinkEmulator(echo.address, rtt=0.002, bandwidth=20e6, loss=0.05, seed=0) as link:
        with _connect(link) as conn:
            threading.Thread(target=conn.sendall, args=(payload,), daemon=True).start()
            received = _receive(conn, len(payload))
        stats = link.stats()
    assert received == payload
    assert stats["bytes_up"] == stats["bytes_down"] == len(payload)
    # Each way 691 segments at p = 0.05: about 35 lost, surely more than 5.
    assert stats["segments_lost"] > 10


def test_a_lost_segment_costs_a_retransmission_delay(echo):
    # Every ping is one byte, one segment each way. A lost segment arrives
    # retransmit_delay late, so k pings with L segments lost among them take at
    # least k * rtt + L * retransmit_delay.
    rtt, delay, pings = 0.01, 0.05, 10
    with LinkEmulator(echo.address, rtt=rtt, loss=0.3, retransmit_delay=delay,
                      seed=3) as link, _connect(link) as conn:
        start = time.perf_counter()
        for _ in range(pings):
            conn.sendall(b"p")
            assert conn.recv(1) == b"p"
        elapsed = time.perf_counter() - start
        lost = link.stats()["segments_lost"]
    assert 0 < lost < 2 * pings
    assert elapsed >= pings * rtt + lost * delay
    assert elapsed < pings * rtt + lost * delay + SLACK


def test_the_default_retransmit_delay_is_one_round_trip(echo):
    # Fast retransmit: three later segments are acknowledged, the sender learns
    # of the loss one round trip after sending the segment, and sends it again.
    link = LinkEmulator(echo.address, rtt=0.03, loss=0.01)
    assert link.retransmit_delay == 0.03 and link.latency == 0.015


@pytest.mark.parametrize("closing", ["client", "target"])
def test_closing_either_side_closes_the_other(sink, closing):
    latency = 0.05
    with LinkEmulator(sink.address, latency=latency) as link:
        conn = _connect(link)
        far = sink.accepted.get(timeout=10)
        conn.sendall(b"last words")
        closer, other = (conn, far) if closing == "client" else (far, conn)
        if closing == "target":
            assert _receive(far, 10) == b"last words"
            far.sendall(b"reply")
        start = time.perf_counter()
        closer.close()
        other.settimeout(10)
        # What was sent before the close arrives first, then the end of stream,
        # one latency after the close.
        expected = b"last words" if closing == "client" else b"reply"
        assert _receive(other, 1 << 20) == expected
        assert time.perf_counter() - start >= latency
        assert other.recv(1) == b""
        other.close()


def test_an_unreachable_target_closes_the_connection():
    unused = socket.create_server(("127.0.0.1", 0))
    address = unused.getsockname()
    unused.close()
    with LinkEmulator(address, rtt=0.01) as link, _connect(link) as conn:
        try:
            assert conn.recv(1) == b""
        except ConnectionResetError:
            pass  # as a refused connection looks
    assert link.stats()["connections"] == 0


def test_in_a_process_of_its_own(echo):
    # process=True: the same proxy in a child process, free of this process's
    # interpreter lock; stats come from the child.
    rtt = 0.02
    with LinkEmulator(echo.address, rtt=rtt, process=True) as link:
        with _connect(link) as conn:
            start = time.perf_counter()
            conn.sendall(b"ping")
            assert _receive(conn, 4) == b"ping"
            elapsed = time.perf_counter() - start
        stats = link.stats()
        child = link._child
    assert elapsed >= rtt
    assert stats == {"bytes_up": 4, "bytes_down": 4, "connections": 1, "segments_lost": 0}
    assert child.returncode == 0  # stopped with the block
    assert link.stats() == stats


def test_arguments_are_checked_up_front(echo):
    with pytest.raises(ValueError, match="rtt or latency, not both"):
        LinkEmulator(echo.address, rtt=0.02, latency=0.01)
    with pytest.raises(ValueError, match=r"100e6 / 8"):
        LinkEmulator(echo.address, bandwidth=-1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        LinkEmulator(echo.address, loss=1.0)
    with pytest.raises(ValueError, match="host:port"):
        LinkEmulator("localhost")
    link = LinkEmulator(f"127.0.0.1:{echo.address[1]}", rtt=0.02, bandwidth=12.5e6)
    assert link.target == ("127.0.0.1", echo.address[1])
    with pytest.raises(RuntimeError, match="not running"):
        _ = link.port
    assert "rtt=0.02s" in repr(link)


def test_grpc_with_tls_through_the_link_trains_as_in_process(rng):
    # The server's certificate names localhost and 127.0.0.1; the proxy
    # relays bytes, so the TLS handshake is between client and server alone
    # and the proxy's 127.0.0.1 address matches the certificate.
    rtt = 0.02
    authority = certs.Authority()
    pair = authority.issue("localhost")
    model, cut = models.small_cnn()
    twin, _ = models.small_cnn()
    twin.set_weights(model.get_weights())
    x, y = models.inputs_for(model, 40, rng), rng.integers(0, 3, 40)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    local = keras_split.split(twin, cut)
    local.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    local.fit(x, y, batch_size=8, shuffle=False, verbose=0)

    split = keras_split.split(model, cut)
    server = SplitServer(split.server, loss, keras.optimizers.SGD(0.1), tokens={"t": "a"},
                         certificate=pair.certificate, private_key=pair.private_key).start()
    try:
        with LinkEmulator(("127.0.0.1", server.port), rtt=rtt, bandwidth=10e6) as link:
            client = SplitClient(split.client, server=link.endpoint, token="t",
                                 root_certificates=authority.pem)
            client.compile(optimizer=keras.optimizers.SGD(0.1))
            start = time.perf_counter()
            history = client.fit(x, y, batch_size=8, shuffle=False, verbose=0)
            elapsed = time.perf_counter() - start
            client.transport.close()
            stats = link.stats()
    finally:
        server.stop()
    for a, b in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Five synchronous steps, each at least one round trip.
    assert elapsed >= 5 * rtt
    # TLS records and HTTP/2 frames around the messages the client counts.
    assert stats["bytes_up"] > history.history["bytes_up"][0]
    assert stats["bytes_down"] > history.history["bytes_down"][0]
