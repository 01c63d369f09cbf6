"""Write a client half's device artefacts and their manifest (`keras-split export`).

For one client half: the training exports (`client.tflite`; `client.onnx` with
its forward/train graphs and initial state) and the inference-only variants
(`client.infer.{float32,float16,int8}.tflite`). `manifest.json` lists every file
with its size, SHA-256 and signatures (input and output names, shapes, dtypes),
the device optimizer, and the export-time checks' errors.

The export is reproducible: the same client half and optimizer give the same
bytes in every file, so the same manifest, run after run and process after
process (the ONNX graphs are written in a canonical form, see
`onnx_export.canonical`; LiteRT's converter and `np.savez` are deterministic
already). Changed weights change the LiteRT files and `client.state.npz` (the
ONNX graphs take the weights as inputs), and so the manifest. Another version
of TensorFlow, tf2onnx or the CPU's kernels may give other bytes or other
check errors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import keras
import numpy as np

from keras_split.export import export_client, export_inference, tflite
from keras_split.export.onnx_export import session
from keras_split_wire import device_names


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensor(name, shape, dtype):
    return {"name": name, "shape": [int(d) for d in shape], "dtype": np.dtype(dtype).name}


def _tflite_signatures(path: Path) -> dict:
    interpreter = tflite.interpreter(path.read_bytes())
    result = {}
    for key in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(key)
        inputs, outputs = runner.get_input_details(), runner.get_output_details()
        result[key] = {
            "inputs": [_tensor(n, d["shape_signature"], d["dtype"]) for n, d in inputs.items()],
            "outputs": [_tensor(n, d["shape_signature"], d["dtype"])
                        for n, d in outputs.items()],
        }
    return result


def _onnx_signature(path: Path) -> dict:
    graph = session(path)

    def describe(values):
        return [{"name": v.name, "shape": [d if isinstance(d, int) else -1 for d in v.shape],
                 "type": v.type} for v in values]

    return {"inputs": describe(graph.get_inputs()), "outputs": describe(graph.get_outputs())}


def write_artefacts(client: keras.Model, folder, optimizer) -> dict:
    """Export `client` every way into `folder`; returns (and writes) the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    report = export_client(client, folder / "client.tflite", optimizer=optimizer)
    entries.append({"file": "client.tflite", "kind": "train (LiteRT, builtin ops)",
                    "train_step_error": report.train_step_error,
                    "signatures": _tflite_signatures(folder / "client.tflite")})
    report = export_client(client, folder / "client.onnx", optimizer=optimizer)
    for path in report.files:
        entry = {"file": path.name, "kind": "train (ONNX, stateless)",
                 "train_step_error": report.train_step_error}
        if path.suffix == ".onnx":
            entry["signature"] = _onnx_signature(path)
        entries.append(entry)
    for quantize in (None, "float16", "int8"):
        name = f"client.infer.{quantize or 'float32'}.tflite"
        report = export_inference(client, folder / name, quantize=quantize)
        entries.append({"file": name, "kind": f"inference only ({quantize or 'float32'})",
                        "inference_error": report.inference_error,
                        "signatures": _tflite_signatures(folder / name)})
    for entry in entries:
        path = folder / entry["file"]
        entry.update(bytes=path.stat().st_size, sha256=_sha256(path))
    optimizer = keras.optimizers.get(optimizer) if isinstance(optimizer, str) else optimizer
    manifest = {
        "client": {"inputs": [_tensor(t.name, [-1, *t.shape[1:]], t.dtype) for t in client.inputs],
                   "cut": [_tensor(device_names.cut(i), [-1, *t.shape[1:]], t.dtype)
                           for i, t in enumerate(client.outputs)],
                   "parameters": int(sum(np.prod(w.shape) for w in client.trainable_weights))},
        "optimizer": {"class": type(optimizer).__name__,
                      "learning_rate": float(keras.ops.convert_to_numpy(
                          optimizer.learning_rate))},
        "files": entries,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
