"""The main job: split training of a CNN on real chest X-rays, beside the unsplit model.

Trains the same CNN twice from the same initial weights and in the same batch
order: once split at `cut` (client half and server half exchanging only cut
activations and gradients), once as a plain `keras.Model.fit`. Split learning
does the same arithmetic, so the two test accuracies should agree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import keras
import numpy as np

from keras_split.datasets import load_pneumoniamnist_balanced
from keras_split.split_model import split
from keras_split.trainer import ByteCountProgbar  # the apps' progress bar (netdemo imports it here)

DEFAULT_CUT = "pool2"


def build_demo_cnn(input_shape=(28, 28, 1), num_classes=2) -> keras.Model:
    """The demo CNN: two conv blocks (a natural client half) and a dense head."""
    layers = keras.layers
    inputs = keras.Input(input_shape, name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = layers.Conv2D(16, 3, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(32, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name="dense")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="xray_cnn")


def demo_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def format_logs(logs: dict) -> str:
    """`loss 0.3419, accuracy 0.8654, bytes_up 1,501,344`: byte counters as integers."""
    return ", ".join(f"{k} {int(v):,}" if "bytes_" in k else f"{k} {v:.4f}"
                     for k, v in logs.items())


@dataclass
class DemoResult:
    split_accuracy: float
    unsplit_accuracy: float
    bytes_up_per_sample: float
    bytes_down_per_sample: float
    raw_bytes_per_sample: int
    split_seconds: float
    unsplit_seconds: float


def run_demo(epochs=5, cut=DEFAULT_CUT, batch_size=64, learning_rate=1e-3, seed=0, verbose=1,
             print_fn=print) -> DemoResult:
    """Train split and unsplit on the balanced PneumoniaMNIST subset and compare."""
    keras.utils.set_random_seed(seed)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = load_pneumoniamnist_balanced()
    # One fixed shuffle, then the same batch order for both runs, so any gap
    # between them is the protocol's and not the data order's.
    order = np.random.default_rng(seed).permutation(len(x_train))
    x_train, y_train = x_train[order], y_train[order]

    model = build_demo_cnn()
    reference = build_demo_cnn()
    reference.set_weights(model.get_weights())

    split_model = split(model, cut)
    print_fn(f"Split model: {split_model!r}")
    print_fn(
        f"Data: balanced PneumoniaMNIST subset, {len(x_train):,} train / {len(x_val):,} val / "
        f"{len(x_test):,} test chest X-rays (half of each class in every split)."
    )
    split_model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=demo_loss(),
                        metrics=["accuracy"])
    print_fn("Training split (client half -> cut -> server half):")
    start = time.perf_counter()
    history = split_model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs,
                              validation_data=(x_val, y_val), shuffle=False, verbose=verbose,
                              callbacks=[ByteCountProgbar()])
    split_seconds = time.perf_counter() - start
    _, split_accuracy = split_model.evaluate(x_test, y_test, verbose=0)

    reference.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=demo_loss(),
                      metrics=["accuracy"])
    print_fn("Training the same model unsplit (keras.Model.fit):")
    start = time.perf_counter()
    reference.fit(x_train, y_train, batch_size=batch_size, epochs=epochs,
                  validation_data=(x_val, y_val), shuffle=False, verbose=verbose)
    unsplit_seconds = time.perf_counter() - start
    _, unsplit_accuracy = reference.evaluate(x_test, y_test, verbose=0)

    samples = len(x_train) * epochs
    result = DemoResult(
        split_accuracy=float(split_accuracy),
        unsplit_accuracy=float(unsplit_accuracy),
        bytes_up_per_sample=sum(history.history["bytes_up"]) / samples,
        bytes_down_per_sample=sum(history.history["bytes_down"]) / samples,
        raw_bytes_per_sample=int(np.prod(x_train.shape[1:])) * x_train.itemsize,
        split_seconds=split_seconds,
        unsplit_seconds=unsplit_seconds,
    )
    print_fn("")
    print_fn("Results on the balanced PneumoniaMNIST subset (test set):")
    print_fn(f"  split test accuracy:    {result.split_accuracy:.4f}")
    print_fn(f"  unsplit test accuracy:  {result.unsplit_accuracy:.4f}")
    print_fn(f"  difference:             {result.split_accuracy - result.unsplit_accuracy:+.4f}")
    spec = ", ".join(f"{s.name} {s.shape[1:]} {s.dtype}" for s in split_model.cut_specs)
    print_fn(f"  cut:                    {spec}")
    print_fn(
        f"  bytes/sample up:        {result.bytes_up_per_sample:,.0f} "
        f"(activations {split_model.bytes_per_sample:,} + label {y_train.itemsize})"
    )
    print_fn(f"  bytes/sample down:      {result.bytes_down_per_sample:,.0f} (cut gradient)")
    print_fn(f"  raw image bytes/sample: {result.raw_bytes_per_sample:,} (never sent)")
    print_fn(
        f"  training time:          split {split_seconds:.1f}s, unsplit {unsplit_seconds:.1f}s"
    )
    return result
