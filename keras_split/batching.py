"""Turn what a Keras user passes to fit/evaluate/predict into batches.

Accepted, as in `keras.Model.fit`: numpy arrays (or anything `np.asarray`
takes), lists and dicts of them for multi-input and multi-output models, and a
`tf.data.Dataset` yielding `x`, `(x, y)` or `(x, y, sample_weight)`. Batches
come out as numpy structures: they are what crosses to the server.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf


@dataclass
class Batches:
    """A re-iterable source of `(x, y, sample_weight)` batches.

    With arrays, `rng` draws each epoch's shuffle; its state, taken before an
    epoch, replays that epoch's order (for resuming from a checkpoint).
    """

    make: Callable[[], Iterator[tuple]]
    steps: int | None
    rng: np.random.Generator | None = None

    def __iter__(self):
        return self.make()

    def get_state(self) -> dict | None:
        return None if self.rng is None else self.rng.bit_generator.state

    def set_state(self, state: dict | None) -> None:
        if self.rng is not None and state is not None:
            self.rng.bit_generator.state = state


def _to_numpy(structure):
    return keras.tree.map_structure(lambda v: v if v is None else np.asarray(v), structure)


def _num_samples(name: str, structure) -> int | None:
    if structure is None:
        return None
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in keras.tree.flatten(structure)}
    if None in sizes:
        raise ValueError(f"Every array in `{name}` needs a batch dimension; received a scalar.")
    if len(sizes) != 1:
        raise ValueError(
            f"All arrays in `{name}` must have the same number of samples, received sizes "
            f"{sorted(sizes)}."
        )
    return sizes.pop()


def _unpack(element):
    if isinstance(element, tuple):
        if len(element) == 1:
            return element[0], None, None
        if len(element) == 2:
            return element[0], element[1], None
        if len(element) == 3:
            return element
        raise ValueError(
            "A dataset element must be x, (x, y) or (x, y, sample_weight); received a tuple "
            f"of {len(element)} items."
        )
    return element, None, None


def make_batches(x, y=None, sample_weight=None, batch_size=None, shuffle=False,
                 seed=None, caller="fit") -> Batches:
    """Build batches from arrays or a dataset, validating sizes up front."""
    if isinstance(x, tf.data.Dataset):
        if y is not None or sample_weight is not None:
            raise ValueError(
                f"`{caller}` received a tf.data.Dataset as `x` and also `y` or "
                "`sample_weight`. A dataset must yield (x, y) or (x, y, sample_weight) itself; "
                "pass y=None."
            )
        cardinality = int(x.cardinality())
        steps = cardinality if cardinality >= 0 else None

        def iterate_dataset():
            for element in x:
                bx, by, bw = _unpack(element)
                yield _to_numpy(bx), _to_numpy(by), _to_numpy(bw)

        return Batches(iterate_dataset, steps)

    if x is None:
        raise ValueError(f"`{caller}` needs input data `x`; received None.")
    if isinstance(x, (Iterator,)) or callable(getattr(x, "__next__", None)):
        raise TypeError(
            f"`{caller}` received a Python generator as `x`. Wrap it in "
            "tf.data.Dataset.from_generator(...) or pass numpy arrays."
        )
    x, y, sample_weight = _to_numpy(x), _to_numpy(y), _to_numpy(sample_weight)
    n = _num_samples("x", x)
    for name, value in (("y", y), ("sample_weight", sample_weight)):
        m = _num_samples(name, value)
        if m is not None and m != n:
            raise ValueError(
                f"`x` and `{name}` must have the same number of samples, received {n} vs. {m}."
            )
    batch_size = 32 if batch_size is None else batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, received {batch_size!r}.")
    steps = math.ceil(n / batch_size)
    rng = np.random.default_rng(seed)

    def iterate_arrays():
        order = rng.permutation(n) if shuffle else None
        for i in range(steps):
            if order is None:
                index = slice(i * batch_size, (i + 1) * batch_size)
            else:
                index = order[i * batch_size : (i + 1) * batch_size]

            def take(structure, index=index):
                if structure is None:
                    return None
                return keras.tree.map_structure(lambda a: a[index], structure)

            yield take(x), take(y), take(sample_weight)

    return Batches(iterate_arrays, steps, rng)
