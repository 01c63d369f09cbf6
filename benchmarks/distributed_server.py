"""The server half's step on one device against `DistributedServerRole` on R replicas.

On this machine the replicas are logical CPU devices sharing the same cores,
so the figure measured is the cost of distributing (sharding the batch,
running the replicas, all-reducing the gradients, gathering the cut
gradient), not a speed-up; BENCHMARKS.md projects GPU servers from it.

Per server half (the demo CNN's after `pool2`, and a heavier residual head on
a 16x16x64 cut), batch sizes 64 and 512, Adam: the median time of
`role.handle(message)` over `--steps` steps, one device against R replicas,
in turns.

    python benchmarks/distributed_server.py [--replicas 2] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
    import keras
    import numpy as np

    import keras_split
    from keras_split.apps.demo import build_demo_cnn, demo_loss
    from keras_split.devices import DistributedServerRole
    from keras_split.messages import Activations
    from keras_split.roles import ServerRole

    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(args.replicas)])

    def residual_head():
        inp = keras.Input((16, 16, 64), name="cut")
        x = inp
        for i in range(2):
            y = keras.layers.Conv2D(64, 3, padding="same", use_bias=False)(x)
            y = keras.layers.BatchNormalization(synchronized=True)(y)
            x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
            del i
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inp, keras.layers.Dense(2)(x), name="residual_head")

    def demo_head():
        return keras_split.split(build_demo_cnn(), "pool2").server

    print(f"server step (role.handle), Adam, median of {args.steps} steps in turns; "
          f"{args.replicas} replicas = logical CPU devices on the same cores")
    print(f"{'server half':<16} {'batch':>6} {'one device ms':>14} {'replicas ms':>12} "
          f"{'ratio':>6}")
    for name, build in (("demo (pool2)", demo_head), ("residual head", residual_head)):
        for batch in (64, 512):
            one = build()
            with strategy.scope():
                many = build()
            many.set_weights(one.get_weights())
            roles = [ServerRole(one, keras.optimizers.Adam(1e-3), demo_loss()),
                     DistributedServerRole(many, keras.optimizers.Adam(1e-3), demo_loss(),
                                           strategy=strategy)]
            rng = np.random.default_rng(0)
            shape = tuple(one.inputs[0].shape[1:])
            z = rng.random((batch, *shape), dtype=np.float32)
            y = rng.integers(0, 2, batch)
            times: list[list[float]] = [[], []]
            for step in range(args.steps + 3):
                for k, role in enumerate(roles):
                    began = time.perf_counter()
                    role.handle(Activations(step=step + 1, mode="train", tensors=(z,), labels=y))
                    if step >= 3:  # the first steps trace
                        times[k].append(time.perf_counter() - began)
            a, b = (statistics.median(t) * 1e3 for t in times)
            print(f"{name:<16} {batch:6d} {a:14.2f} {b:12.2f} {b / a:6.2f}", flush=True)


if __name__ == "__main__":
    main()
