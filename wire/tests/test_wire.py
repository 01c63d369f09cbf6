"""The wire contract on its own: no TensorFlow, no Keras, no keras_split.

CI also runs this module in a virtualenv holding only the wire package on the
oldest protobuf it declares (see .ci/run)."""

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from keras_split_wire import PROTOCOL_VERSION, SERVICE, codecs, device_names, rpc
from keras_split_wire.proto import split_pb2 as pb
from keras_split_wire.tensors import (
    CutSpec,
    WireError,
    check_against_spec,
    check_outgoing,
    decode,
    encode,
    spec_from_pb,
    spec_to_pb,
)

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_wire_package_loads_no_tensorflow():
    code = ("import sys, keras_split_wire, keras_split_wire.tensors, keras_split_wire.rpc, "
            "keras_split_wire.codecs, keras_split_wire.device_names\n"
            "from keras_split_wire.proto import split_pb2_grpc\n"
            "bad = [m for m in ('tensorflow', 'keras', 'keras_split') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generated_code_is_fresh(tmp_path):
    tools = pytest.importorskip("grpc_tools")
    from importlib.metadata import version

    if version("grpcio-tools") != "1.75.1":
        pytest.skip("the committed code comes from grpcio-tools 1.75.1 (the dev extra)")
    del tools
    subprocess.run([sys.executable, str(ROOT / "dev" / "generate_protos.py"), str(tmp_path)],
                   check=True, cwd=ROOT)
    for name in ("split_pb2.py", "split_pb2.pyi", "split_pb2_grpc.py"):
        relative = Path("keras_split_wire/proto") / name
        fresh, committed = (tmp_path / relative).read_text(), (ROOT / "wire" / relative).read_text()
        assert fresh == committed, f"{relative} is stale: run python dev/generate_protos.py"


def test_protocol_constants_match_the_proto():
    assert PROTOCOL_VERSION == 1
    assert pb.DESCRIPTOR.services_by_name["SplitLearning"].full_name == SERVICE


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "uint8", "bool", "float16"])
def test_encode_decode_round_trips_every_allowed_dtype(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
    tensor = pb.Tensor.FromString(encode(array, name="x").SerializeToString())
    back = decode(tensor, "x", max_elements=24)
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_encode_refuses_what_the_protocol_does_not_carry():
    with pytest.raises(TypeError, match="Cannot send a complex128 tensor.*astype"):
        encode(np.zeros(3, np.complex128))
    with pytest.raises(TypeError, match="object"):
        encode(np.array([{}, 1], dtype=object))


def test_decode_names_the_field_of_every_problem():
    good = encode(np.ones((2, 3), np.float32))
    cases = {
        "dtype": pb.Tensor(dtype="object", shape=[1], data=b"x"),
        "invalid shape": pb.Tensor(dtype="float32", shape=[-1, 3]),
        "exceed the limit": pb.Tensor(dtype="float32", shape=[2**40, 2**40]),
        "NaN or Inf": encode(np.array([1.0, np.nan], np.float32)),
        "not negotiated": pb.Tensor(dtype="float32", shape=[1], codec="float16"),
        "bytes": pb.Tensor(dtype="float32", shape=[2, 3], data=good.data[:-1]),
    }
    for problem, tensor in cases.items():
        with pytest.raises(WireError, match=problem) as raised:
            decode(tensor, "activations[0]", max_elements=1000)
        assert raised.value.field == "activations[0]"


def test_huge_shapes_are_counted_exactly_not_overflowed():
    # The product of these dimensions overflows int64; the count must not wrap
    # round to something small.
    tensor = pb.Tensor(dtype="float32", shape=[2**32, 2**32, 16], codec="topk")
    with pytest.raises(WireError, match="exceed the limit"):
        decode(tensor, "g", max_elements=10**6, codec=codecs.get("topk"))


def test_cut_spec_from_shapes_and_protobuf():
    spec = CutSpec.of("pool2", "float32", (-1, 7, 7, 8))
    assert spec.shape == (None, 7, 7, 8) and spec.bytes_per_sample == 7 * 7 * 8 * 4
    assert spec_from_pb(spec_to_pb(spec)) == ("float32", (None, 7, 7, 8))
    assert CutSpec.of("seq", "int32", (None, None)).bytes_per_sample is None


def test_check_against_spec_and_outgoing():
    spec = CutSpec.of("cut", "float32", (None, 3))
    check_against_spec(np.zeros((4, 3), np.float32), spec, "a", batch=4)
    with pytest.raises(WireError, match="dtype float64, expected float32"):
        check_against_spec(np.zeros((4, 3)), spec, "a", None)
    with pytest.raises(WireError, match="axis 1"):
        check_against_spec(np.zeros((4, 2), np.float32), spec, "a", None)
    with pytest.raises(ValueError, match=r"Cannot send activations\[0\]: dtype float64"):
        check_outgoing([np.zeros((4, 3))], [spec])
    with pytest.raises(ValueError, match="2 tensors, but the cut has 1"):
        check_outgoing([np.zeros((4, 3), np.float32)] * 2, [spec])


def test_message_limit_is_derived_from_the_cut():
    # 64 samples x (3,136 cut bytes + 4,096 for labels) + 1 MiB of framing.
    assert rpc.message_limit([3136], 64) == 64 * (3136 + 4096) + (1 << 20)
    assert rpc.message_limit([100, None], 2) == 2 * (100 + 4096) + (1 << 20)
    options = dict(rpc.channel_options(1234))
    assert options["grpc.max_receive_message_length"] == 1234
    assert options["grpc.max_send_message_length"] == 1234


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def _method(*outcomes):
    calls = []

    def method(request, metadata, timeout):
        calls.append((request, metadata, timeout))
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return method, calls


def test_call_retries_unavailable_with_growing_jittered_waits():
    waits = []
    method, calls = _method(*[FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down")] * 3, "ok")
    policy = rpc.Retry(timeout=5, retry_for=60, backoff=0.1, max_backoff=0.3)
    assert rpc.call(method, "req", (("authorization", "Bearer t"),), policy, "h:1",
                    sleep=waits.append) == "ok"
    assert len(calls) == 4 and calls[0][2] == 5
    # Full jitter: each wait is below the bound, which doubles up to max_backoff.
    assert all(0 <= w <= b for w, b in zip(waits, [0.1, 0.2, 0.3], strict=True))


@pytest.mark.parametrize(("code", "kind", "also"), [
    (grpc.StatusCode.UNAUTHENTICATED, rpc.CredentialsError, PermissionError),
    (grpc.StatusCode.PERMISSION_DENIED, rpc.CredentialsError, PermissionError),
    (grpc.StatusCode.INVALID_ARGUMENT, rpc.RejectedError, ValueError),
    (grpc.StatusCode.FAILED_PRECONDITION, rpc.ServerError, RuntimeError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, rpc.ServerError, RuntimeError),
])
def test_refusals_fail_fast_with_their_kind(code, kind, also):
    method, calls = _method(FakeRpcError(code, "because"))
    with pytest.raises(kind, match="because") as raised:
        rpc.call(method, "r", (), rpc.Retry(), "h:1", sleep=lambda s: None)
    assert isinstance(raised.value, also) and len(calls) == 1


def test_tls_failures_are_not_retried_and_say_what_to_check():
    method, calls = _method(FakeRpcError(grpc.StatusCode.UNAVAILABLE,
                                         "failed to connect: certificate verify failed"))
    with pytest.raises(rpc.LinkDownError, match="TLS handshake.*--ca") as raised:
        rpc.call(method, "r", (), rpc.Retry(), "h:1", tls_hint="--ca", sleep=lambda s: None)
    assert isinstance(raised.value, ConnectionError) and len(calls) == 1


def test_giving_up_after_the_retry_budget():
    method, _ = _method(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down"))
    with pytest.raises(rpc.LinkDownError, match="UNAVAILABLE.*1 attempt"):
        rpc.call(method, "r", (), rpc.Retry(retry_for=0), "h:1", sleep=lambda s: None)


def test_read_pem_says_which_file_it_could_not_read(tmp_path):
    assert rpc.read_pem(b"pem") == b"pem" and rpc.read_pem(None) is None
    (tmp_path / "ca.pem").write_bytes(b"x")
    assert rpc.read_pem(tmp_path / "ca.pem") == b"x"
    with pytest.raises(FileNotFoundError, match="CA certificate file .*missing.pem"):
        rpc.read_pem(str(tmp_path / "missing.pem"), "CA certificate")


def test_device_names():
    assert [device_names.model_input(0), device_names.cut(1), device_names.cut_gradient(2),
            device_names.weight(3), device_names.slot(12)] == ["x0", "cut_1", "grad_2",
                                                              "w003", "s012"]
    assert device_names.is_numbered("w003", "w") and not device_names.is_numbered("wx", "w")
