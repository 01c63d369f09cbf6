"""The named seams between layers: the role protocols a server serves, the
one-method Transport, and U-shaped label keeping by step id."""

import threading

import keras
import numpy as np
import pytest

import keras_split
from keras_split.configurations.chain import JoinLabels, KeepLabels, LabelStore, RelayRole
from keras_split.configurations.rounds import PerClientRole
from keras_split.configurations.vertical import GatherRole
from keras_split.messages import Activations, Reply
from keras_split.network import convert
from keras_split.roles import GatheringRole, MessageHandler, PartyHandler, ServerRole
from keras_split.transport import InProcessTransport, Transport
from keras_split_wire.proto import split_pb2 as pb
from keras_split_wire.tensors import WireError


def _dense(inputs=3, units=2):
    x = keras.Input((inputs,))
    return keras.Model(x, keras.layers.Dense(units)(x))


def test_roles_fit_the_protocols_the_server_asks_for():
    server = ServerRole(_dense(), "sgd", "mse")
    assert isinstance(server, MessageHandler) and not isinstance(server, PartyHandler)
    relay = RelayRole(_dense(), "sgd", InProcessTransport(server))
    assert isinstance(relay, MessageHandler)
    assert isinstance(JoinLabels(server, LabelStore()), MessageHandler)
    gather = GatherRole(server, ["a", "b"], labels=np.zeros((4, 2)))
    assert isinstance(gather, GatheringRole) and isinstance(gather, PartyHandler)
    per_client = PerClientRole(_dense(), "sgd", "mse")
    assert isinstance(per_client, PartyHandler) and not isinstance(per_client, GatheringRole)


def test_server_refuses_a_role_that_answers_nothing():
    class Mute:
        def state(self):
            return {}

    with pytest.raises(TypeError, match="MessageHandler.*received Mute"):
        keras_split.SplitServer(_dense(), role=Mute(), tokens={"t": "c"}, insecure=True)


class Halves(Transport):
    """A transport written with its one method only."""

    def __init__(self, server):
        super().__init__()
        self.server = server

    def _exchange(self, message):
        reply = self.server.handle(message)
        return reply, 10, 3


def test_a_transport_implements_one_method_and_exchange_counts_and_checks():
    server = ServerRole(_dense(), "sgd", "mse")
    transport = Halves(server)
    message = Activations(7, "train", (np.ones((4, 3), np.float32),),
                          labels=np.zeros((4, 2), np.float32))
    reply = transport.exchange(message)
    assert reply.step == 7 and transport.bytes.snapshot() == (10, 3)

    class Liar(Halves):
        def _exchange(self, message):
            return Reply(step=message.step + 1), 0, 0

    with pytest.raises(RuntimeError, match="answered step 8 to step 7"):
        Liar(server).exchange(message)


class EchoLabels:
    """A last segment that reports which labels it was given."""

    def handle(self, message):
        return Reply(step=message.step, gradients=(np.zeros_like(message.tensors[0]),),
                     logs={"label_sum": float(np.sum(message.labels))})

    def state(self):
        return {}

    def restore(self, arrays, path):
        pass


class HoldFirst(Transport):
    """Lets the second of two concurrent steps overtake the first."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.bytes = inner.bytes
        self.second_passed = threading.Event()
        self._first = threading.Lock()
        self._seen = 0

    def _exchange(self, message):
        with self._first:
            self._seen += 1
            first = self._seen == 1
        if first:
            assert self.second_passed.wait(10), "the second step never overtook the first"
        reply = self.inner.exchange(message)
        if not first:
            self.second_passed.set()
        return reply, 0, 0


def test_u_shaped_labels_follow_their_step_not_the_arrival_order():
    store = LabelStore()
    hold = HoldFirst(InProcessTransport(JoinLabels(EchoLabels(), store)))
    head = KeepLabels(hold, store)
    results = {}

    def send(step, label):
        message = Activations(step, "train", (np.ones((2, 3), np.float32),),
                              labels=np.full((2, 1), label, np.float32))
        results[step] = head.exchange(message).logs["label_sum"]

    first = threading.Thread(target=send, args=(1, 1.0))
    first.start()
    while hold._seen < 1:
        threading.Event().wait(0.01)
    second = threading.Thread(target=send, args=(2, 5.0))
    second.start()
    first.join(10)
    second.join(10)
    # Step 2 reached the tail first; each still got its own labels back.
    assert results == {1: 2.0, 2: 10.0}
    assert len(store) == 0


def test_a_failed_u_shaped_step_leaves_the_others_in_flight_intact():
    store = LabelStore()
    store.put("other", np.ones(2), None)

    class Down(Transport):
        def _exchange(self, message):
            raise ConnectionError("link down")

    with pytest.raises(ConnectionError):
        KeepLabels(Down(), store).exchange(
            Activations(1, "train", (np.ones((2, 3), np.float32),), labels=np.zeros(2)))
    labels, _ = store.take("other")
    np.testing.assert_array_equal(labels, np.ones(2))
    with pytest.raises(RuntimeError, match="no labels kept"):
        store.take("missing")


def test_trace_is_bounded_in_memory_and_on_the_wire():
    with pytest.raises(ValueError, match="trace"):
        Activations(1, "predict", (), trace="x" * 65)
    spec = keras_split.CutSpec("cut", (None, 3), "float32", 12)
    message = Activations(3, "predict", (np.ones((2, 3), np.float32),), trace="u42")
    request = convert.request_to_pb("s", message)
    assert convert.request_from_pb(request, [spec], 8).trace == "u42"
    request = pb.StepRequest.FromString(request.SerializeToString())
    request.trace = "y" * 65
    with pytest.raises(WireError, match="trace"):
        convert.request_from_pb(request, [spec], 8)


def _step(batch, sample_weight=None):
    message = Activations(1, "train", (np.ones((batch, 3), np.float32),),
                          labels=np.zeros((batch, 1), np.float32), sample_weight=sample_weight)
    return pb.StepRequest.FromString(convert.request_to_pb("s", message).SerializeToString())


def test_the_wire_refuses_empty_batches_and_negative_sample_weights():
    spec = keras_split.CutSpec("cut", (None, 3), "float32", 12)
    # One honest message passes, so the refusals below are for their one defect.
    assert convert.request_from_pb(_step(2, np.ones(2, np.float32)), [spec], 8).tensors
    with pytest.raises(WireError, match=r"activations\[0\]: an empty batch"):
        convert.request_from_pb(_step(0), [spec], 8)
    with pytest.raises(WireError, match="sample_weight: expected non-negative.*minimum -1"):
        convert.request_from_pb(_step(2, np.array([1.0, -1.0], np.float32)), [spec], 8)
    with pytest.raises(WireError, match="sample_weight.*dtype bool"):
        convert.request_from_pb(_step(2, np.array([True, False])), [spec], 8)
