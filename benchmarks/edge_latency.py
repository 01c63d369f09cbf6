"""Device exports of the demo's client half: size, on-device step latency beside
the TensorFlow client's step, and test accuracy of the quantized inference
variants, all in one run; MobileNetV2's client half measured the same way.

The demo CNN is first trained split in process for `--epochs` epochs (cut pool2,
Adam 1e-3, shipped PneumoniaMNIST subset), so that accuracies mean something.
Then its client half is exported (LiteRT with training signatures, ONNX
stateless graphs, inference-only float32/float16/int8 LiteRT). Latency: one
client training step at `--batch-size`, without the network: the TensorFlow
client's compiled step (forward, backward from a fixed cut gradient, Adam
update), and the device's `forward` + `train` in LiteRT and in onnxruntime
(through `keras_split_edge.load`, as a device runs them). The three are timed
in turns, `--repeats` steps each in `--rounds` rounds, and the median of all is
reported: on a shared machine the load then weighs on all three alike.
Accuracy: each inference variant's cut activations on the test set, fed to the
trained server half.

`--mobilenet`: MobileNetV2 (alpha 0.35, 96x96, weights=None) cut after
`block_2_add`, timed the same way. `--ablation`: the demo client's device step
with the export's ops as they were before the speed work (commit c63ba0f, read
with `git show`), then with each change added in turn (`CHANGES`).

    python benchmarks/edge_latency.py [--epochs 3] [--batch-size 64] [--repeats 20]
        [--rounds 10] [--mobilenet] [--ablation] [--tf-threads N]
"""

import argparse
import contextlib
import os
import statistics
import subprocess
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_split  # noqa: E402
from keras_split.apps.demo import build_demo_cnn, demo_loss  # noqa: E402
from keras_split.export import export_client, export_inference, ops  # noqa: E402
from keras_split.export.program import ClientProgram  # noqa: E402
from keras_split.messages import Reply  # noqa: E402
from keras_split_edge import load  # noqa: E402

RUNTIMES = {"tflite": "LiteRT", "onnx": "onnxruntime"}


def median_ms(step, repeats):
    for _ in range(10):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def in_turns(steps: dict, repeats: int, rounds: int) -> dict:
    """Median milliseconds of each step, timed in turns (see the module doc)."""
    times = {name: [] for name in steps}
    for step in steps.values():
        for _ in range(3):
            step()
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(repeats):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def step_latency(client, x, g, folder, repeats, rounds, optimizer=None):
    """The TensorFlow client's step and the device's forward + train, in ms."""
    make = optimizer or (lambda: keras.optimizers.Adam(1e-3))
    for fmt in RUNTIMES:
        export_client(client, folder / f"client.{fmt}", optimizer=make())
    clone = keras.models.clone_model(client)
    clone.set_weights(client.get_weights())
    role = keras_split.ClientRole(clone, make())
    role.build()
    reply = Reply(step=1, gradients=(g,))
    steps = {"TensorFlow client step": lambda: role.step(x, lambda a: reply)}
    for fmt, name in RUNTIMES.items():
        device = load(folder / f"client.{fmt}")

        def device_step(device=device):
            device.forward([x])
            device.train([x], [g])

        steps[f"{name} forward+train"] = device_step
    return in_turns(steps, repeats, rounds)


def print_latency(latency, batch, repeats, rounds):
    base = latency["TensorFlow client step"]
    print(f"\none client training step, batch {batch} (median of {repeats} x {rounds} "
          "in turns, no network)")
    for name, ms in latency.items():
        print(f"{name:30} {ms:8.3f} ms   ratio to TensorFlow {ms / base:5.2f}")


def mobilenet(args):
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None)
    client = keras_split.split(model, "block_2_add").client
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (args.batch_size, 96, 96, 3)).astype("float32")
    g = (rng.normal(size=(args.batch_size, *client.outputs[0].shape[1:])) * 1e-3).astype(
        "float32")
    print(f"\nMobileNetV2 (alpha 0.35, 96x96) client half to block_2_add: "
          f"{client.count_params():,} parameters")
    latency = step_latency(client, x, g, Path(tempfile.mkdtemp()), max(args.repeats // 5, 2),
                           args.rounds)
    print_latency(latency, args.batch_size, max(args.repeats // 5, 2), args.rounds)


def _ops_at(commit):
    """keras_split.export.ops as of `commit`, as a module of its own."""
    source = subprocess.run(["git", "show", f"{commit}:keras_split/export/ops.py"],
                            capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent.parent).stdout
    module = types.ModuleType(f"ops_at_{commit}")
    exec(compile(source, f"ops.py@{commit}", "exec"), module.__dict__)  # noqa: S102 - our file
    if "relu" not in module.max_pool.__code__.co_varnames:  # before the ReLU moved
        pool = module.max_pool
        module.max_pool = lambda x, size, strides=None, padding="VALID", relu=False: pool(
            x, size, strides, padding)
    if "bias" not in module.conv2d.__code__.co_varnames:  # before the bias rode along
        conv = module.conv2d

        def conv2d(x, kernel, strides=(1, 1), padding="VALID", bias=None):
            y = conv(x, kernel, strides, padding)
            return y if bias is None else module.bias_add(y, bias)

        module.conv2d = conv2d
    if not hasattr(module, "runtime"):  # before ops were written per runtime
        module.runtime = ops.runtime
    return module


@contextlib.contextmanager
def _patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@contextlib.contextmanager
def _onnxruntime_threads_spin():
    """The edge runtime's sessions as onnxruntime makes them by default."""
    import onnxruntime

    class Spinning(onnxruntime.SessionOptions):
        def add_session_config_entry(self, key, value):
            if key != "session.intra_op.allow_spinning":
                super().add_session_config_entry(key, value)

    with _patched(onnxruntime, "SessionOptions", Spinning):
        yield


# (label, the export's ops as of this commit, ReLU moved after MaxPooling2D,
# onnxruntime threads spin), each row adding one change to the one before.
CHANGES = [
    ("before (ops of c63ba0f); onnxruntime spins", "c63ba0f", False, True),
    ("+ onnxruntime threads wait, not spin", "c63ba0f", False, False),
    ("+ convolutions as products, max-pool gradient", "ef78387", False, False),
    ("+ ReLU moved after MaxPooling2D", "ef78387", True, False),
    ("+ per-tap dx, gathers, one-channel rows (d867fa7)", "d867fa7", True, False),
    ("+ bias inside the convolution's product (2e6d09c)", "2e6d09c", True, False),
]


def ablation(client, x, g, args):
    """The device step with the speed changes added one at a time (module doc)."""
    from keras_split.export import onnx_export, program

    print(f"\nwhat each change bought: demo client step, batch {len(x)} (median of "
          f"{args.repeats} x {args.rounds} in turns; ratio to TensorFlow's step)")
    print(f"{'':52} {'TensorFlow':>10} {'LiteRT':>16} {'onnxruntime':>16}")
    for label, commit, relu_moved, spin in CHANGES:
        module = _ops_at(commit)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patched(program, "ops", module))
            stack.enter_context(_patched(onnx_export, "ops", module))
            if not relu_moved:
                stack.enter_context(_patched(ClientProgram, "_relu_before_max_pool",
                                             lambda self: (set(), set())))
            if spin:
                stack.enter_context(_onnxruntime_threads_spin())
            latency = step_latency(client, x, g, Path(tempfile.mkdtemp()), args.repeats,
                                   args.rounds)
        base = latency["TensorFlow client step"]
        device = [latency[f"{name} forward+train"] for name in RUNTIMES.values()]
        cells = [f"{ms:7.2f} ms {ms / base:4.2f}x" for ms in device]
        print(f"{label:52} {base:7.2f} ms {cells[0]:>16} {cells[1]:>16}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--mobilenet", action="store_true")
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--tf-threads", type=int, default=0,
                        help="TensorFlow's intra- and inter-op threads (0: its default, all "
                             "cores); LiteRT runs one thread, onnxruntime its default")
    args = parser.parse_args()
    if args.tf_threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.tf_threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.tf_threads)
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
    latency = step_latency(split.client, xb, g, Path(tempfile.mkdtemp()), args.repeats,
                           args.rounds)
    print_latency(latency, len(xb), args.repeats, args.rounds)

    print("\ntest accuracy: inference variant's activations -> trained server half")
    want = split.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]
    print(f"{'Keras client (reference)':30} {want:.4f}")
    for name, report in variants.items():
        runner = load_infer(report.files[0])
        activations = np.concatenate([runner(x_test[i:i + 256])
                                      for i in range(0, len(x_test), 256)])
        logits = split.server.predict(activations, verbose=0)
        accuracy = float(np.mean(np.argmax(logits, -1) == y_test.reshape(-1)))
        infer_ms = median_ms(lambda runner=runner: runner(xb), args.repeats * args.rounds)
        print(f"client.infer.{name:17} {accuracy:.4f}  (largest activation error "
              f"{report.inference_error:.2g}; infer {infer_ms:.3f} ms at batch {len(xb)})")
    if args.ablation:
        ablation(split.client, xb, g, args)
    if args.mobilenet:
        mobilenet(args)


def load_infer(path):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner("infer")
    return lambda images: runner(x0=np.asarray(images, np.float32).reshape(
        (-1, 28, 28, 1)))["cut_0"]


if __name__ == "__main__":
    main()
