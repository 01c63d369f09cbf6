"""`keras-split export` is reproducible: the same weights give the same bytes
(so the same manifest), in this process or another, and changed weights change
the files that hold them."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import onnx
from onnx import TensorProto, helper

import keras_split
from keras_split.apps.demo import build_demo_cnn
from keras_split.export.artefacts import write_artefacts
from keras_split.export.onnx_export import canonical, session

ROOT = Path(__file__).resolve().parent.parent
# The ONNX graphs take the weights as inputs (they are in client.state.npz).
GRAPHS = {"client.onnx", "client.forward.onnx", "client.train.onnx"}
BUILD = """
import keras, keras_split
from keras_split.apps.demo import build_demo_cnn
keras.utils.set_random_seed(7)
client = keras_split.split(build_demo_cnn(), "pool2").client
"""


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir())}


def _client():
    keras.utils.set_random_seed(7)
    return keras_split.split(build_demo_cnn(), "pool2").client


def test_two_exports_of_the_same_weights_are_byte_identical(tmp_path):
    client = _client()
    write_artefacts(client, tmp_path / "a", keras.optimizers.Adam(1e-3))
    write_artefacts(client, tmp_path / "b", keras.optimizers.Adam(1e-3))
    first = _hashes(tmp_path / "a")
    assert GRAPHS <= set(first) and "manifest.json" in first
    assert _hashes(tmp_path / "b") == first
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert {e["file"]: e["sha256"] for e in manifest["files"]} == \
        {k: v for k, v in first.items() if k != "manifest.json"}

    # One weight changed: every file holding weights changes, and the manifest.
    kernel = client.get_layer("conv1").kernel
    value = kernel.numpy()
    value[0, 0, 0, 0] += 0.5
    kernel.assign(value)
    write_artefacts(client, tmp_path / "d", keras.optimizers.Adam(1e-3))
    changed = _hashes(tmp_path / "d")
    for name, digest in first.items():
        if name in GRAPHS:
            assert changed[name] == digest, name  # the graphs hold no weights
        else:
            assert changed[name] != digest, name


def test_another_process_with_another_hash_seed_writes_the_same_bytes(tmp_path):
    client = _client()
    write_artefacts(client, tmp_path / "a", keras.optimizers.Adam(1e-3))
    first = _hashes(tmp_path / "a")
    # Another process, with another string-hashing seed (which decides, inside
    # tf2onnx, which of two equal constants is kept and the order of nodes) and
    # fresh process-wide counters (tf2onnx's generated names, TensorFlow's
    # numbered functions): the same bytes.
    script = BUILD + textwrap.dedent(f"""
        from keras_split.export.artefacts import write_artefacts
        write_artefacts(client, {str(tmp_path / "c")!r}, keras.optimizers.Adam(1e-3))
    """)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _hashes(tmp_path / "c") == first


NAMES = ["w", "xw", "b", "h", "r", "two", "d", "three", "t", "matmul", "add", "relu",
         "double", "triple", "sum", "graph", "batch"]


def _graph(order, names, scale=1.0):
    """y = relu(x @ w + b) * 2 + (x @ w) * 3, written with `names`, nodes in `order`."""
    nodes = {
        "matmul": helper.make_node("MatMul", ["x", names["w"]], [names["xw"]],
                                   name=names["matmul"]),
        "add": helper.make_node("Add", [names["xw"], names["b"]], [names["h"]],
                                name=names["add"]),
        "relu": helper.make_node("Relu", [names["h"]], [names["r"]], name=names["relu"]),
        "double": helper.make_node("Mul", [names["r"], names["two"]], [names["d"]],
                                   name=names["double"]),
        "triple": helper.make_node("Mul", [names["xw"], names["three"]], [names["t"]],
                                   name=names["triple"]),
        "sum": helper.make_node("Add", [names["d"], names["t"]], ["y"], name=names["sum"]),
    }
    rng = np.random.default_rng(0)
    initializers = [
        helper.make_tensor(names["w"], TensorProto.FLOAT, [3, 4],
                           scale * rng.normal(size=12).astype("float32")),
        helper.make_tensor(names["b"], TensorProto.FLOAT, [4], rng.normal(size=4)),
        helper.make_tensor(names["two"], TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor(names["three"], TensorProto.FLOAT, [], [3.0]),
    ]
    initializers.sort(key=lambda t: t.name)
    graph = helper.make_graph(
        [nodes[n] for n in order], names["graph"],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [names["batch"], 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [names["batch"], 4])],
        initializers, doc_string=f"converted from {names['graph']}")
    return helper.make_model(graph, producer_name="test",
                             opset_imports=[helper.make_opsetid("", 17)])


def test_canonical_form_ignores_names_and_the_order_of_independent_nodes(tmp_path):
    first = {k: k for k in NAMES}
    second = {k: f"{k}__{i * 37 % 101}" for i, k in enumerate(NAMES)}
    second["batch"] = "unk__634"
    order = ["matmul", "add", "relu", "double", "triple", "sum"]
    one = canonical(_graph(order, first), "infer")
    # The same function, every internal name different (initializers thereby in
    # another order), and the independent branch's node first.
    other = ["matmul", "triple", "add", "relu", "double", "sum"]
    two = canonical(_graph(other, second), "infer")
    assert one.SerializeToString(deterministic=True) == two.SerializeToString(deterministic=True)
    assert one.graph.name == "infer" and [v.name for v in one.graph.input] == ["x"]
    assert [v.name for v in one.graph.output] == ["y"]
    onnx.checker.check_model(one)
    # Other weights, other bytes.
    three = canonical(_graph(order, first, scale=2.0), "infer")
    assert three.SerializeToString(deterministic=True) != \
        one.SerializeToString(deterministic=True)

    x = np.random.default_rng(1).normal(size=(5, 3)).astype("float32")
    paths = []
    for i, model in enumerate([_graph(order, first), one, two]):
        paths.append(tmp_path / f"{i}.onnx")
        paths[-1].write_bytes(model.SerializeToString())
    results = [session(p).run(None, {"x": x})[0] for p in paths]
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])
