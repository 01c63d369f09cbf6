"""Training throughput in process: split against the unsplit model's own limit.

For each model, in one run, alternating so that machine drift hits all alike:

- `model.fit`: unsplit `keras.Model.fit` on numpy arrays;
- fused unsplit step: the whole model's forward, backward and Adam update as
  one `tf.function`, fed by numpy slicing (the honest limit of a split step:
  the same arithmetic, no hand-off at the cut);
- the same step called through its concrete function (`keras_split.compiled`),
  as the split's own steps are: the limit without `tf.function`'s dispatch;
- split (fused): `SplitModel.fit` with the default in-process transport, which
  runs the server's step inside the client's compiled call;
- split (messages): `InProcessTransport(fused=False)`, one message per step
  (`tf.numpy_function` at the cut, a copy back from numpy, a second call).

`--anatomy` times one compiled call per step instead (the batch already a
tensor, best of 5 x 300 calls, no `fit` loop around it, every call through
its concrete function) for the demo CNN:
the unsplit step; the split step as shipped (the server's refusal checks
and both conditional updates); the same two halves in one graph with the
server's checks but no condition on the client's side; and with no checks
or conditions at all (two tapes, two optimizers: the split's structure
alone). It shows where the in-process gap comes from.

Two models: the demo chest-X-ray CNN (28x28x1, cut "pool2"; per-step overhead
dominates) and a mid-sized residual CNN (64x64x3, cut after its second block).
Each path is built once and warmed up; then, in each of `--runs` rounds, every
path trains `--epochs` epochs, in an order rotated from round to round. Prints
samples/s (median over the rounds) and each split path's ratio to the fused
unsplit step within each round (median, quartiles and range; target from
issue 15: at least 0.95).

    python benchmarks/throughput.py [--runs 21] [--epochs 1] [--batch-size 64] [--verbose]
    python benchmarks/throughput.py --anatomy
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_split  # noqa: E402
from keras_split.apps.demo import build_demo_cnn, demo_loss  # noqa: E402
from keras_split.compiled import Compiled  # noqa: E402
from keras_split.roles import ServerRole  # noqa: E402
from keras_split.transport import InProcessTransport  # noqa: E402


def residual_cnn(input_shape=(64, 64, 3), num_classes=2):
    layers = keras.layers
    inputs = keras.Input(input_shape, name="image")
    x = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="stem")(inputs)
    for block, filters in enumerate([32, 64, 64]):
        shortcut = x
        y = layers.Conv2D(filters, 3, padding="same", activation="relu",
                          name=f"block{block}_conv1")(x)
        y = layers.Conv2D(filters, 3, padding="same", name=f"block{block}_conv2")(y)
        if shortcut.shape[-1] != filters:
            shortcut = layers.Conv2D(filters, 1, name=f"block{block}_project")(shortcut)
        x = layers.Activation("relu", name=f"block{block}_out")(
            layers.Add(name=f"block{block}_add")([shortcut, y]))
        x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="residual_cnn")


def unsplit_step(model, concrete=False):
    """The whole model's forward, backward and Adam update as one compiled call
    (`concrete`: called through its concrete function, as the split's steps are)."""
    optimizer, loss_fn = keras.optimizers.Adam(1e-3), demo_loss()
    mean, accuracy = keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy()

    def step(bx, by):
        with tf.GradientTape() as tape:
            logits = model(bx, training=True)
            loss = loss_fn(by, logits)
        optimizer.apply(tape.gradient(loss, model.trainable_variables),
                        model.trainable_variables)
        mean.update_state(loss)
        accuracy.update_state(by, logits)
        return mean.result(), accuracy.result()

    if concrete:
        return Compiled(step, reduce_retracing=True)
    return tf.function(step, reduce_retracing=True)


def fused_unsplit(build, x, y, batch_size, concrete=False):
    step = unsplit_step(build(), concrete)

    def train(count):
        for _ in range(count):
            order = np.random.permutation(len(x))
            for i in range(0, len(x), batch_size):
                rows = order[i:i + batch_size]
                float(step(x[rows], y[rows])[0])  # the logs, as fit reads them

    return timer(train, len(x))


def timer(train, samples):
    """`epochs -> samples/s` for a path built once, after one warm-up epoch (tracing)."""
    train(1)

    def rate(epochs):
        start = time.perf_counter()
        train(epochs)
        return samples * epochs / (time.perf_counter() - start)

    return rate


def keras_fit(build, x, y, batch_size):
    model = build()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=demo_loss(), metrics=["accuracy"])
    return timer(lambda epochs: model.fit(x, y, batch_size=batch_size, epochs=epochs,
                                          verbose=0), len(x))


def split_fit(build, cut, fused, x, y, batch_size):
    split = keras_split.split(build(), cut)
    role = ServerRole(split.server, keras.optimizers.Adam(1e-3), demo_loss(),
                      metrics=["accuracy"])
    split.compile(optimizer=keras.optimizers.Adam(1e-3),
                  transport=InProcessTransport(role, fused=fused))
    return timer(lambda epochs: split.fit(x, y, batch_size=batch_size, epochs=epochs,
                                          verbose=0), len(x))


def measure(name, build, cut, x, y, args):
    # Every path is built once (same seed), warmed up, then timed for `--epochs`
    # epochs per round, the paths in a rotated order each round, so that the
    # machine's drift (large on this shared 2-core machine, even within a
    # second) hits all alike; ratios are taken within each round.
    keras.utils.set_random_seed(0)
    paths = {
        "model.fit": keras_fit(build, x, y, args.batch_size),
        "fused unsplit step": fused_unsplit(build, x, y, args.batch_size),
        "fused unsplit step, concrete call": fused_unsplit(build, x, y, args.batch_size,
                                                           concrete=True),
        "split (fused)": split_fit(build, cut, True, x, y, args.batch_size),
        "split (messages)": split_fit(build, cut, False, x, y, args.batch_size),
    }
    rates: dict[str, list[float]] = {key: [] for key in paths}
    names = list(paths)
    for run in range(args.runs):
        shift = run % len(names)
        for key in names[shift:] + names[:shift]:
            rates[key].append(paths[key](args.epochs))
        if args.verbose:
            print(f"  {name} round {run + 1}: " + ", ".join(
                f"{k} {v[-1]:.0f}" for k, v in rates.items()), flush=True)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    limit = medians["fused unsplit step"]
    print(f"\n{name}, batch {args.batch_size}, Adam 1e-3, median of {args.runs} rounds of "
          f"{args.epochs} epoch(s)")
    print("| path | samples/s | / fused unsplit step |")
    print("|---|---:|---:|")
    for key, value in medians.items():
        print(f"| {key} | {value:,.0f} | {value / limit:.3f} |")
    for path, baseline, note in [
            ("split (fused)", "fused unsplit step", " (target >= 0.95)"),
            ("split (messages)", "fused unsplit step", ""),
            # Against the unsplit step called the same way as the split's (no
            # tf.function dispatch on either side): what the split's structure costs.
            ("split (fused)", "fused unsplit step, concrete call", "")]:
        paired = sorted(s / f for s, f in zip(rates[path], rates[baseline], strict=True))
        quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
        print(f"{path} / {baseline}, per round: median {statistics.median(paired):.3f}, "
              f"quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, range "
              f"{paired[0]:.3f}-{paired[-1]:.3f}{note}")
    print()


def anatomy(x, y, batch_size, repeats=5, calls=300):
    """Milliseconds per compiled call: unsplit, split as shipped, and split with parts removed."""
    from keras_split.messages import Activations
    from keras_split.roles import ClientRole

    xb, yb = tf.constant(x[:batch_size]), tf.constant(y[:batch_size])
    keras.utils.set_random_seed(0)
    # Every call below goes through its concrete function (keras_split.compiled), as
    # the shipped split step does: no tf.function dispatch on either side.
    unsplit = unsplit_step(build_demo_cnn(), concrete=True)

    def split_step(mode):
        keras.utils.set_random_seed(0)
        split = keras_split.split(build_demo_cnn(), "pool2")
        server = ServerRole(split.server, keras.optimizers.Adam(1e-3), demo_loss(),
                            metrics=["accuracy"])
        client = ClientRole(split.client, keras.optimizers.Adam(1e-3))
        client.build()
        message = Activations(1, "train", (np.empty((batch_size, 0), np.float32),),
                              labels=y[:batch_size])
        client.fused_step(x[:batch_size], server, message)  # builds both sides
        if mode == "shipped":
            return client._fused[id(server)]

        def step(bx, labels, weights):
            with tf.GradientTape() as tape:
                activations, regularization = client._forward_fn(bx)
            sent = [tf.stop_gradient(a) for a in activations]
            if mode == "checks":
                *_, cut, logs = server._train_fn(sent, labels, weights)
            else:
                with tf.GradientTape() as inner:
                    inner.watch(sent)
                    y_pred = server.model(sent[0], training=True)
                    loss = server.model.compute_loss(x=None, y=labels, y_pred=y_pred,
                                                     training=True)
                variables = server.model.trainable_variables
                grads = inner.gradient(loss, sent + list(variables))
                cut = grads[:len(sent)]
                server.model.optimizer.apply(grads[len(sent):], variables)
                server.loss_tracker.update_state(loss)
                logs = server._logs(labels, y_pred, weights)
            client._apply_fn(client._variable_gradients(tape, activations, regularization, cut))
            return logs

        return Compiled(step)

    calls_by_name = {"unsplit step": lambda: unsplit(xb, yb)}
    for name, mode in [("split step, as shipped", "shipped"),
                       ("split, the server's checks, no client condition", "checks"),
                       ("split, no checks, no conditions", "bare")]:
        function = split_step(mode)
        calls_by_name[name] = lambda f=function: f(xb, yb, None)
    best = dict.fromkeys(calls_by_name, float("inf"))
    for _ in range(repeats):  # alternating, so drift hits all alike
        for name, call in calls_by_name.items():
            for _ in range(20):
                call()
            start = time.perf_counter()
            for _ in range(calls):
                call()
            best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e3)
    limit = best["unsplit step"]
    print(f"demo CNN, batch {batch_size}: one compiled call per step, best of {repeats} x "
          f"{calls} calls")
    print("| call | ms per step | unsplit / this |")
    print("|---|---:|---:|")
    for name, ms in best.items():
        print(f"| {name} | {ms:.3f} | {limit / ms:.3f} |")


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, received {text!r}")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive, default=21,
                        help="rounds: each path timed once per round, in rotated order")
    parser.add_argument("--epochs", type=positive, default=1, help="epochs per path per round")
    parser.add_argument("--verbose", action="store_true", help="print every round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--only", choices=["demo", "residual"], default=None)
    parser.add_argument("--anatomy", action="store_true",
                        help="time one compiled call per step, with parts of the split "
                             "step removed (demo CNN)")
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")
    (x, y), _, _ = keras_split.datasets.load_pneumoniamnist_balanced()
    y = y.reshape(-1)
    if args.anatomy:
        anatomy(x, y, args.batch_size)
        return
    if args.only in (None, "demo"):
        measure("demo CNN (28x28x1, cut pool2)", build_demo_cnn, "pool2", x, y, args)
    if args.only in (None, "residual"):
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(1024, 64, 64, 3)).astype("float32") / 255.0
        labels = rng.integers(0, 2, size=1024)
        measure("residual CNN (64x64x3, cut block1_pool)", residual_cnn, "block1_pool",
                images, labels, args)


if __name__ == "__main__":
    main()
