"""The CPUs this process may run on, without importing TensorFlow (which sizes
its thread pools by them): for `keras_split/__init__.py` and `keras_split.compiled`."""

import os


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
