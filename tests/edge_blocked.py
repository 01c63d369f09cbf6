"""Run `python -m keras_split_edge ...` where TensorFlow, Keras and keras_split
cannot be imported, as on a device that does not have them."""

import importlib.abc
import runpy
import sys

BLOCKED = {"tensorflow", "keras", "keras_split", "tf_keras", "tf2onnx"}


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the device runtime must not need it")
        return None


if __name__ == "__main__":
    sys.meta_path.insert(0, Blocker())
    sys.argv = ["keras_split_edge", *sys.argv[1:]]
    try:
        runpy.run_module("keras_split_edge", run_name="__main__")
    finally:
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(f"blocked modules loaded: {loaded}")
