"""Training throughput over gRPC on loopback (TLS) vs in-process split vs unsplit fit.

Demo CNN cut at pool2, shipped balanced PneumoniaMNIST subset, Adam(1e-3).
Each run: one warm-up epoch, then `--epochs` timed epochs; medians over runs.
Also prints bytes per sample on the wire against the analytic payload size.
No compression codecs yet (plain float32).

    python benchmarks/grpc_throughput.py [--runs 3] [--epochs 3] [--batch-size 64]
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import keras_split  # noqa: E402
from keras_split.demo import build_demo_cnn, demo_loss  # noqa: E402
from keras_split.devcerts import write_dev_certificates  # noqa: E402


def timed(fit, x, y, batch_size, epochs):
    fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    start = time.perf_counter()
    history = fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return len(x) * epochs / (time.perf_counter() - start), history


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    (x, y), _, _ = keras_split.datasets.load_pneumoniamnist_balanced()
    certs = write_dev_certificates(tempfile.mkdtemp())
    rates = {"unsplit": [], "in-process": [], "grpc+tls": []}
    wire_bytes = None
    for run in range(args.runs):
        keras.utils.set_random_seed(run)
        model = build_demo_cnn()
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=demo_loss())
        rates["unsplit"].append(timed(model.fit, x, y, args.batch_size, args.epochs)[0])

        local = keras_split.split(build_demo_cnn(), "pool2")
        local.compile(optimizer=keras.optimizers.Adam(1e-3), loss=demo_loss())
        rates["in-process"].append(timed(local.fit, x, y, args.batch_size, args.epochs)[0])

        remote = keras_split.split(build_demo_cnn(), "pool2")
        server = keras_split.SplitServer(
            remote.server, demo_loss(), keras.optimizers.Adam(1e-3), tokens={"t": "bench"},
            certificate=certs["server_cert"], private_key=certs["server_key"]).start()
        try:
            client = keras_split.SplitClient(remote.client, server=f"127.0.0.1:{server.port}",
                                             token="t", root_certificates=certs["ca"])
            client.compile(optimizer=keras.optimizers.Adam(1e-3))
            rate, history = timed(client.fit, x, y, args.batch_size, args.epochs)
            rates["grpc+tls"].append(rate)
            wire_bytes = (history.history["bytes_up"][0] / len(x),
                          history.history["bytes_down"][0] / len(x))
        finally:
            server.stop()
        print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()))

    base = statistics.median(rates["unsplit"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:11} {median:8.0f} samples/s  ratio to unsplit {median / base:.3f}")
    payload = local.bytes_per_sample
    print(f"bytes/sample up on the wire {wire_bytes[0]:.1f} (payload: activations {payload} "
          f"+ int64 label 8 = {payload + 8}); down {wire_bytes[1]:.1f} (gradient {payload})")


if __name__ == "__main__":
    main()
