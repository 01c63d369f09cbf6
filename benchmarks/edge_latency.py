"""Device exports of the demo's client half: size, on-device step latency beside
the TensorFlow client's step, and test accuracy of the quantized inference
variants, all in one run.

The demo CNN is first trained split in process for `--epochs` epochs (cut pool2,
Adam 1e-3, shipped PneumoniaMNIST subset), so that accuracies mean something.
Then its client half is exported (LiteRT with training signatures, ONNX
stateless graphs, inference-only float32/float16/int8 LiteRT). Latency: the
median over `--repeats` steps of one client training step at `--batch-size`,
without the network: the TensorFlow client's compiled step (forward, backward
from a fixed cut gradient, Adam update), and the device's `forward` + `train`
in LiteRT and in onnxruntime. Accuracy: each inference variant's cut
activations on the test set, fed to the trained server half.

    python benchmarks/edge_latency.py [--epochs 3] [--batch-size 64] [--repeats 200]
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_split  # noqa: E402
from keras_split.apps.demo import build_demo_cnn, demo_loss  # noqa: E402
from keras_split.export import export_client, export_inference  # noqa: E402
from keras_split.messages import Reply  # noqa: E402
from keras_split_edge import load  # noqa: E402


def median_ms(step, repeats):
    for _ in range(10):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    (x, y), _, (x_test, y_test) = keras_split.datasets.load_pneumoniamnist_balanced()
    keras.utils.set_random_seed(0)
    split = keras_split.split(build_demo_cnn(), "pool2")
    split.compile(optimizer=keras.optimizers.Adam(1e-3), loss=demo_loss(), metrics=["accuracy"])
    split.fit(x, y, batch_size=64, epochs=args.epochs, seed=0, verbose=0)
    folder = Path(tempfile.mkdtemp())

    print("artefact                      bytes")
    sizes = {}
    export_client(split.client, folder / "client.tflite", optimizer=keras.optimizers.Adam(1e-3))
    onnx = export_client(split.client, folder / "client.onnx",
                         optimizer=keras.optimizers.Adam(1e-3))
    sizes["client.tflite (train)"] = (folder / "client.tflite").stat().st_size
    sizes["client.*.onnx + state (train)"] = onnx.bytes
    variants = {}
    for quantize in (None, "float16", "int8"):
        name = f"client.infer.{quantize or 'float32'}.tflite"
        variants[quantize or "float32"] = export_inference(split.client, folder / name,
                                                           quantize=quantize)
        sizes[name] = variants[quantize or "float32"].bytes
    split.client.save(folder / "client.keras")
    sizes["client.keras (Keras, reference)"] = (folder / "client.keras").stat().st_size
    for name, size in sizes.items():
        print(f"{name:30} {size:>9,}")

    xb = x[: args.batch_size]
    g = (np.random.default_rng(0).normal(size=(len(xb), 5, 5, 32)) * 1e-3).astype("float32")
    clone = keras.models.clone_model(split.client)
    clone.set_weights(split.client.get_weights())
    role = keras_split.ClientRole(clone, keras.optimizers.Adam(1e-3))
    role.build()
    reply = Reply(step=1, gradients=(g,))
    latency = {"TensorFlow client step": median_ms(lambda: role.step(xb, lambda a: reply),
                                                   args.repeats)}
    for fmt in ("tflite", "onnx"):
        device = load(folder / f"client.{fmt}")

        def device_step(device=device):
            device.forward([xb])
            device.train([xb], [g])

        latency[f"{'LiteRT' if fmt == 'tflite' else 'onnxruntime'} forward+train"] = \
            median_ms(device_step, args.repeats)
    base = latency["TensorFlow client step"]
    print(f"\none client training step, batch {len(xb)} (median of {args.repeats}, no network)")
    for name, ms in latency.items():
        print(f"{name:30} {ms:7.3f} ms   ratio to TensorFlow {ms / base:5.2f}")

    print("\ntest accuracy: inference variant's activations -> trained server half")
    want = split.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]
    print(f"{'Keras client (reference)':30} {want:.4f}")
    for name, report in variants.items():
        runner = load_infer(report.files[0])
        activations = np.concatenate([runner(x_test[i:i + 256])
                                      for i in range(0, len(x_test), 256)])
        logits = split.server.predict(activations, verbose=0)
        accuracy = float(np.mean(np.argmax(logits, -1) == y_test.reshape(-1)))
        infer_ms = median_ms(lambda runner=runner: runner(xb), args.repeats)
        print(f"client.infer.{name:17} {accuracy:.4f}  (largest activation error "
              f"{report.inference_error:.2g}; infer {infer_ms:.3f} ms at batch {len(xb)})")


def load_infer(path):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner("infer")
    return lambda images: runner(x0=np.asarray(images, np.float32).reshape(
        (-1, 28, 28, 1)))["cut_0"]


if __name__ == "__main__":
    main()
