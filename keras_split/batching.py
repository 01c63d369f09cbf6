"""Turn what a Keras user passes to fit/evaluate/predict into batches.

Accepted, as by `keras.Model.fit`: numpy arrays (or anything `np.asarray`
takes), lists and dicts of them for multi-input and multi-output models; a
`tf.data.Dataset`, a `keras.utils.PyDataset` or a Python generator (any
iterator) yielding `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`. Batches
come out as numpy structures: they are what crosses to the server.

Epochs are drawn as Keras's own epoch iterator draws them. Without
`steps_per_epoch` an epoch is one pass over the data. With it, an epoch takes
that many batches from an iterator that carries on into the next epoch (an
infinite `dataset.repeat()` is read once, from start to end of the fit); a
finite input starts a new pass only when it is used up, and the epoch that
used it up ends early with Keras's "ran out of data" warning.
"""

from __future__ import annotations

import collections
import itertools
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import tensorflow as tf

# Keras's own wording (keras.src.trainers.epoch_iterator), so that users who
# searched for it find the same advice.
RAN_OUT = (
    "Your input ran out of data; interrupting training. Make sure that your dataset or "
    "generator can generate at least `steps_per_epoch * epochs` batches. You may need to use "
    "the `.repeat()` function when building your dataset."
)


class Batches:
    """The batches of one fit/evaluate/predict input, epoch by epoch.

    `epoch(start)` yields `(index, (x, y, sample_weight))` for one epoch, as
    described in the module docstring. `exhausted` is True after an epoch that
    found no data at all (a generator already used up): `fit` stops there.

    Resuming: `get_state()` says where the current pass is (the shuffling
    generator's state before the pass drew its order, and how many batches
    the pass has given); `set_state()` makes the next epoch replay that pass
    up to there.
    """

    def __init__(self, make_pass: Callable[[], Iterator[tuple]], num_batches: int | None,
                 steps_per_epoch: int | None = None, rng: np.random.Generator | None = None,
                 source=None, class_weight: Mapping | None = None):
        self._make_pass = make_pass
        self.num_batches = num_batches
        self.steps_per_epoch = steps_per_epoch
        self.rng = rng
        self._source = source  # a PyDataset, told when epochs begin and end
        self._class_weight = class_weight
        self._iterator: Iterator = iter(())
        self._open = False  # whether the next epoch carries on with `_iterator`
        self._drawn = 0  # batches the current pass has given
        self._pass_rng: dict | None = None
        self._resume: dict | None = None
        self.exhausted = False

    @property
    def steps(self) -> int | None:
        """Batches per epoch when known: for the progress bar."""
        return self.steps_per_epoch or self.num_batches

    def _new_pass(self) -> None:
        self._pass_rng = None if self.rng is None else self.rng.bit_generator.state
        self._iterator = iter(self._make_pass())
        self._open = True
        self._drawn = 0

    def _next(self) -> tuple:
        batch = next(self._iterator)
        self._drawn += 1
        return batch

    def _start_epoch(self) -> None:
        if self._resume is not None:
            state, self._resume = self._resume, None
            if self.rng is not None and state.get("rng") is not None:
                self.rng.bit_generator.state = state["rng"]
            self._new_pass()
            for _ in range(state.get("offset", 0)):
                try:
                    self._next()
                except StopIteration:
                    break
        elif not self._open or self.steps_per_epoch is None:
            self._new_pass()

    def epoch(self, start: int = 0) -> Iterator[tuple[int, tuple]]:
        """Yield `(index, (x, y, sample_weight))` for one epoch, from batch `start`."""
        self.exhausted = False
        if self._source is not None:
            self._source.on_epoch_begin()
        try:
            self._start_epoch()
            limit = self.steps_per_epoch or self.num_batches
            index = start
            while limit is None or index < limit:
                if self.num_batches is not None and self._drawn >= self.num_batches:
                    if index == 0:
                        # The pass ended exactly with the last epoch: a new one.
                        self._new_pass()
                    else:
                        warnings.warn(RAN_OUT, stacklevel=2)
                        break
                try:
                    batch = self._next()
                except StopIteration:
                    if self._drawn and index == 0:
                        # A pass of unknown length ended exactly with the last
                        # epoch: now its length is known; start another.
                        self.num_batches = self.num_batches or self._drawn
                        self._new_pass()
                        try:
                            batch = self._next()
                        except StopIteration:
                            self.exhausted = True
                            break
                    elif index == 0:
                        self.exhausted = True
                        break
                    else:
                        if self.steps_per_epoch is not None:
                            warnings.warn(RAN_OUT, stacklevel=2)
                        self.num_batches = self.num_batches or self._drawn
                        self._open = False
                        break
                yield index, self._weighted(batch)
                index += 1
            if self.num_batches is not None and self._drawn >= self.num_batches:
                self._open = False  # a fresh pass for the next epoch
        finally:
            if self._source is not None:
                self._source.on_epoch_end()

    def _weighted(self, batch: tuple) -> tuple:
        if self._class_weight is None:
            return batch
        x, y, sample_weight = batch
        if y is None:
            return batch  # the loop says that labels are missing
        if sample_weight is not None:
            raise ValueError(
                "`class_weight` and a `sample_weight` yielded by the data cannot be used "
                "together: the class weights become the sample weights. Drop one of them.")
        return x, y, class_sample_weight(y, self._class_weight)

    def get_state(self) -> dict:
        return {"rng": self._pass_rng, "offset": self._drawn}

    def set_state(self, state: dict | None) -> None:
        self._resume = state

    def reset(self) -> None:
        """Start from a fresh pass at the next epoch (as each `evaluate` does)."""
        self._open = False


# -- checks --------------------------------------------------------------------


def check_steps(name: str, value, caller: str) -> None:
    """`steps_per_epoch`, `validation_steps`, `steps`: None or a positive integer."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"`{caller}` received `{name}={value!r}`; expected None or a positive integer, "
            f"the number of batches to draw (e.g. {name}=100).")


def check_class_weight(class_weight) -> dict[int, float] | None:
    """A dict from class index to weight, as `keras.Model.fit` takes it."""
    if class_weight is None:
        return None
    if not isinstance(class_weight, Mapping):
        raise TypeError(
            "`class_weight` must be a dict mapping class indices to weights, e.g. "
            f"{{0: 1.0, 1: 5.0}}; received {type(class_weight).__name__}.")
    checked = {}
    for key, value in class_weight.items():
        if isinstance(key, bool) or not isinstance(key, numbers.Integral) or key < 0:
            raise TypeError(
                f"`class_weight` keys must be class indices (integers >= 0); received "
                f"{key!r} ({type(key).__name__}). Use the label values themselves as keys, "
                "e.g. {0: 1.0, 1: 5.0}.")
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not math.isfinite(value) or value < 0):
            raise ValueError(
                f"`class_weight[{key}]` must be a finite number >= 0; received {value!r}.")
        checked[int(key)] = float(value)
    return checked


def class_sample_weight(y, class_weight: Mapping[int, float]) -> np.ndarray:
    """Per-sample weights from class weights, by Keras's rule.

    Labels of shape (n,) or (n, 1) are class indices (rounded); labels of
    shape (n, k>1) are one-hot or probabilities (their argmax). A class with
    no weight weighs 1.
    """
    if keras.tree.is_nested(y):
        raise ValueError(
            "`class_weight` is only supported for models with a single output; this model's "
            "labels are a structure of several arrays. Pass `sample_weight` (one array per "
            "output) instead.")
    labels = np.asarray(y)
    if labels.ndim > 1:
        labels = np.argmax(labels, axis=-1) if labels.shape[-1] != 1 else labels[..., 0]
    if labels.ndim != 1:
        raise ValueError(
            "`class_weight` needs one class per sample (labels of shape (n,), (n, 1) or "
            f"one-hot (n, classes)); received labels of shape {np.shape(y)}. Pass "
            "`sample_weight` instead.")
    classes = np.round(labels).astype("int64")
    weights = np.ones(classes.shape, dtype=keras.backend.floatx())
    for cls, weight in class_weight.items():
        weights[classes == cls] = weight
    return weights


# -- sources -------------------------------------------------------------------


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


def _unpack(element, kind: str):
    if isinstance(element, tuple):
        if len(element) == 1:
            return element[0], None, None
        if len(element) == 2:
            return element[0], element[1], None
        if len(element) == 3:
            return element
        raise ValueError(
            f"A {kind} element must be x, (x, y) or (x, y, sample_weight); received a tuple "
            f"of {len(element)} items."
        )
    return element, None, None


def _numpy_batches(elements: Iterator, kind: str) -> Iterator[tuple]:
    for element in elements:
        if kind == "PyDataset" and isinstance(element, list):
            element = tuple(element)  # as Keras's PyDataset adapter reads a list
        bx, by, bw = _unpack(element, kind)
        yield _to_numpy(bx), _to_numpy(by), _to_numpy(bw)


def is_data_stream(x) -> bool:
    """A dataset, PyDataset or generator: data that cannot be sliced like arrays."""
    return isinstance(x, (tf.data.Dataset, keras.utils.PyDataset, Iterator))


def _stream_kind(x) -> str:
    if isinstance(x, tf.data.Dataset):
        return "tf.data.Dataset"
    if isinstance(x, keras.utils.PyDataset):
        return "PyDataset"
    return "Python generator"


def _py_dataset_pass(data: keras.utils.PyDataset, num_batches: int | None,
                     order: np.ndarray | None) -> Iterator:
    indices: Iterator[int] = (
        iter(order.tolist()) if order is not None
        else iter(range(num_batches)) if num_batches is not None
        else itertools.count())
    workers = int(getattr(data, "workers", 1) or 1)
    if workers <= 1:
        for i in indices:
            yield data[i]
        return
    # Keras reads a PyDataset with `workers` threads (or processes) ahead of
    # the training loop, in order; threads do the same here, at most
    # `max_queue_size` batches ahead.
    ahead = max(int(getattr(data, "max_queue_size", 10) or 10), workers)
    pool = ThreadPoolExecutor(max_workers=workers)
    pending: collections.deque = collections.deque()
    try:
        for i in indices:
            pending.append(pool.submit(data.__getitem__, i))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _infinite(caller: str, steps_name: str, kind: str) -> ValueError:
    return ValueError(
        f"`{caller}` received an infinite {kind} (e.g. after `.repeat()`) and no "
        f"`{steps_name}`, so an epoch would never end. Pass `{steps_name}=` the number of "
        "batches to draw.")


def make_batches(x, y=None, sample_weight=None, batch_size=None, shuffle=False,
                 seed=None, caller="fit", steps=None, steps_name="steps_per_epoch",
                 class_weight=None) -> Batches:
    """Build batches from arrays, a dataset, a PyDataset or a generator.

    Sizes and arguments are checked up front, before any batch is drawn.
    `steps` is the number of batches per epoch (`steps_per_epoch`, or
    `validation_steps`/`steps` for evaluation, named by `steps_name`).
    """
    check_steps(steps_name, steps, caller)
    class_weight = check_class_weight(class_weight)
    if class_weight is not None and sample_weight is not None:
        raise ValueError(
            "`class_weight` and `sample_weight` cannot be used together: the class weights "
            "become the sample weights. Pass one of them (e.g. multiply the class weight into "
            "your sample weights).")
    if is_data_stream(x):
        return _stream_batches(x, y, sample_weight, shuffle, seed, caller, steps, steps_name,
                               class_weight)

    if x is None:
        raise ValueError(f"`{caller}` needs input data `x`; received None.")
    x, y, sample_weight = _to_numpy(x), _to_numpy(y), _to_numpy(sample_weight)
    n = _num_samples("x", x)
    for name, value in (("y", y), ("sample_weight", sample_weight)):
        m = _num_samples(name, value)
        if m is not None and m != n:
            raise ValueError(
                f"`x` and `{name}` must have the same number of samples, received {n} vs. {m}."
            )
    if class_weight is not None:
        if y is None:
            raise ValueError("`class_weight` needs labels: pass `y`.")
        sample_weight = class_sample_weight(y, class_weight)
    if batch_size is None:
        # Keras's rule: with `steps` and no batch size, the steps cover the data once.
        batch_size = math.ceil(n / steps) if steps else 32
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) \
            or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, received {batch_size!r}.")
    batch_size = int(batch_size)
    num_batches = math.ceil(n / batch_size)
    rng = np.random.default_rng(seed)

    def iterate_arrays():
        order = rng.permutation(n) if shuffle else None
        for i in range(num_batches):
            if order is None:
                index = slice(i * batch_size, (i + 1) * batch_size)
            else:
                index = order[i * batch_size : (i + 1) * batch_size]

            def take(structure, index=index):
                if structure is None:
                    return None
                return keras.tree.map_structure(lambda a: a[index], structure)

            yield take(x), take(y), take(sample_weight)

    return Batches(iterate_arrays, num_batches, steps, rng)


def _stream_batches(x, y, sample_weight, shuffle, seed, caller, steps, steps_name,
                    class_weight) -> Batches:
    kind = _stream_kind(x)
    if y is not None or sample_weight is not None:
        given = "`y`" if y is not None else "`sample_weight`"
        raise ValueError(
            f"`{caller}` received a {kind} as `x` and also {given}. A {kind} must yield "
            f"(x, y) or (x, y, sample_weight) itself; pass {given.strip('`')}=None.")
    if isinstance(x, tf.data.Dataset):
        if class_weight is not None:
            spec = x.element_spec
            if isinstance(spec, tuple) and len(spec) == 3:
                raise ValueError(
                    "`class_weight` and a dataset that yields (x, y, sample_weight) cannot be "
                    "used together: the class weights become the sample weights. Drop one.")
            if isinstance(spec, tuple) and len(spec) == 2 and keras.tree.is_nested(spec[1]):
                raise ValueError(
                    "`class_weight` is only supported for models with a single output; this "
                    "dataset yields a structure of labels. Yield sample weights instead.")
        cardinality = int(x.cardinality())
        if cardinality == tf.data.INFINITE_CARDINALITY and steps is None:
            raise _infinite(caller, steps_name, "tf.data.Dataset")
        dataset = x
        return Batches(lambda: _numpy_batches(iter(dataset), kind),
                       cardinality if cardinality >= 0 else None, steps,
                       class_weight=class_weight)
    if isinstance(x, keras.utils.PyDataset):
        num_batches = x.num_batches
        if num_batches is None and steps is None:
            raise _infinite(caller, steps_name, "PyDataset (its `num_batches` is None)")
        rng = np.random.default_rng(seed)
        data = x

        def iterate_py_dataset():
            # Keras shuffles the order of a finite PyDataset's batches when
            # `shuffle=True`; the seeded generator makes it replayable here.
            order = rng.permutation(num_batches) if shuffle and num_batches else None
            return _numpy_batches(_py_dataset_pass(data, num_batches, order), kind)

        return Batches(iterate_py_dataset, num_batches, steps, rng, source=x,
                       class_weight=class_weight)
    # A generator can be read once: every "pass" continues the same one.
    stream = _numpy_batches(x, kind)
    return Batches(lambda: stream, None, steps, class_weight=class_weight)
