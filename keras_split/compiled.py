"""Compiled steps called without `tf.function`'s per-call dispatch.

Calling a `tf.function` binds its arguments to the signature, canonicalises
and flattens them, and looks the traced graph up by their types: 0.2-0.5 ms per
call in this project's steps (measured on the demo CNN's fused split step,
about a tenth of its 3 ms). `Compiled` calls the same traced graph, the
`ConcreteFunction` that `tf.function` would pick, found in a dictionary by a
key of the arguments' shapes and dtypes that takes a couple of microseconds to
compute, and hands it the tensors straight, in the order its own call would
(found once per signature, by identity; where that cannot be told, the concrete
function is called as usual). The graph is the same, so are the results, bit
for bit.

Arguments it cannot key cheaply (anything but arrays, tensors, None, Python
scalars and strings, and lists, tuples and dicts of them) go through the
`tf.function` as usual.

TensorFlow's inter-op threads. A client's compiled step on the message path
waits at the cut, inside a `tf.numpy_function`, on one of TensorFlow's inter-op
threads, while the server's step runs; a server in the same process needs
another inter-op thread for its own compiled call. TensorFlow sizes that pool
by the CPUs the process may use, so on a one-CPU machine every such step
would wait forever. `import keras_split` therefore asks for two threads
(`TF_NUM_INTEROP_THREADS=2`, read when TensorFlow starts) when nobody has set
the size and the process may use one CPU only; an explicit setting is never
changed. A compiled call that could never start (one inter-op thread, held by
a step waiting at the cut) raises a `RuntimeError` that says so, instead of
hanging.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from keras_split._cpus import usable_cpus

_SCALARS = (bool, int, float, str, bytes)


# Threads waiting at the cut inside a compiled step (`waiting_at_the_cut`).
_waiting = 0
_waiting_lock = threading.Lock()


def inter_op_threads() -> int:
    """The size of TensorFlow's inter-op thread pool: as configured, else as the
    environment says (`TF_NUM_INTEROP_THREADS`), else one per usable CPU."""
    configured = tf.config.threading.get_inter_op_parallelism_threads()
    if configured:
        return configured
    try:
        return int(os.environ.get("TF_NUM_INTEROP_THREADS", "")) or usable_cpus()
    except ValueError:
        return usable_cpus()


@contextlib.contextmanager
def waiting_at_the_cut() -> Iterator[None]:
    """Marks the current thread as a compiled step's callback waiting for its reply."""
    global _waiting
    with _waiting_lock:
        _waiting += 1
    try:
        yield
    finally:
        with _waiting_lock:
            _waiting -= 1


@functools.cache
def _pool_size() -> int:
    """`inter_op_threads()`, asked once TensorFlow runs (fixed from then on)."""
    return inter_op_threads()


def _refuse_if_no_thread_is_free() -> None:
    """Called while a step waits at the cut (`_waiting`)."""
    if _pool_size() <= 1:
        raise RuntimeError(
            "This compiled call cannot start: TensorFlow's inter-op thread pool has one "
            "thread, and a split step holds it while it waits at the cut for its reply "
            "(a server in this same process needs a thread of its own for its step, so "
            "the step would wait forever). Give TensorFlow two inter-op threads at the "
            "start of the program, before any TensorFlow op runs: "
            "`tf.config.threading.set_inter_op_parallelism_threads(2)`; or run the server "
            "in a process of its own.")


class _Unkeyable(Exception):
    """An argument whose tracing type this module does not compute."""


def _key(value) -> Any:
    if isinstance(value, np.ndarray):
        return ("a", value.shape, value.dtype.str)
    if isinstance(value, tf.Tensor):
        return ("t", tuple(value.shape), value.dtype.name)
    if value is None:
        return None
    if isinstance(value, _SCALARS):
        # tf.function traces on the Python value of scalars (and 1 == 1.0 == True).
        return (type(value).__name__, value)
    if isinstance(value, tuple | list):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return ("d", tuple((k, _key(value[k])) for k in sorted(value)))
    raise _Unkeyable


def _flat_positions(concrete, args) -> list[int] | None:
    """Where, in `tf.nest.flatten(args)`, each tensor input of `concrete` comes
    from, as its own structured call would unpack `args`; None when that cannot
    be told by identity (the concrete function is then called as usual)."""
    call_flat = getattr(concrete, "_call_flat", None)
    function_type = getattr(concrete, "function_type", None)
    if call_flat is None or function_type is None:
        return None
    as_tensors = tf.nest.map_structure(
        lambda v: tf.convert_to_tensor(v) if isinstance(v, np.ndarray) else v, args)
    leaves = tf.nest.flatten(as_tensors)
    where = {id(leaf): i for i, leaf in enumerate(leaves) if isinstance(leaf, tf.Tensor)}
    try:
        from tensorflow.python.eager.polymorphic_function import function_type_utils
        bound = function_type_utils.canonicalize_function_inputs(as_tensors, {}, function_type)
        flat = function_type.unpack_inputs(bound)
    except Exception:  # noqa: BLE001 (any change in TensorFlow's internals: the usual call)
        return None
    positions = [where.get(id(t)) for t in flat]
    if None in positions or len(set(positions)) != len(where):
        return None
    return positions  # type: ignore[return-value]


class Compiled:
    """A `tf.function` of `python_function`, called through its concrete functions.

    Args:
        python_function: what to compile.
        max_signatures: concrete functions kept (a fit sees one or two batch
            shapes); past it, the cache starts again.
        **options: for `tf.function` (e.g. `reduce_retracing=True`).
    """

    def __init__(self, python_function: Callable, max_signatures: int = 32, **options):
        self.function = tf.function(python_function, **options)
        self._concrete: dict = {}
        self._max = max_signatures
        # A concrete function takes every argument (it applies no defaults): the
        # defaults of trailing parameters are added here, as tf.function would.
        # (Python puts every parameter with a default after those without.)
        parameters = list(inspect.signature(python_function).parameters.values())
        plain = all(p.kind is p.POSITIONAL_OR_KEYWORD for p in parameters)
        self._arity = len(parameters) if plain else -1
        self._defaults = [p.default for p in parameters]
        self._required = sum(p.default is p.empty for p in parameters)

    def __call__(self, *args, **kwargs):
        if _waiting:
            _refuse_if_no_thread_is_free()
        if kwargs or not self._required <= len(args) <= self._arity:
            return self.function(*args, **kwargs)
        args = args + tuple(self._defaults[len(args):])
        try:
            key = _key(args)
        except _Unkeyable:
            return self.function(*args)
        entry = self._concrete.get(key)
        if entry is None:
            if len(self._concrete) >= self._max:
                self._concrete.clear()
            concrete = self.function.get_concrete_function(*args)
            entry = self._concrete[key] = (concrete, _flat_positions(concrete, args))
        concrete, positions = entry
        if positions is None:
            return concrete(*args)
        # The graph's inputs, as the concrete function's own call would unpack
        # them (positions found once per signature, by identity): no binding,
        # canonicalising or casting per call.
        leaves = tf.nest.flatten(args)
        return concrete._call_flat(
            [tf.convert_to_tensor(leaves[i]) for i in positions], concrete.captured_inputs)

    @property
    def signatures(self) -> int:
        """How many argument signatures have a concrete function here."""
        return len(self._concrete)
