"""keras_split: split learning for TensorFlow/Keras.

Cut an existing Keras model into a client half and a server half, and train it
across the cut: only cut activations go up and cut gradients come down.
"""

import importlib
import os
import sys
from typing import TYPE_CHECKING

from keras_split._cpus import usable_cpus as _usable_cpus

_before = {name: os.environ.get(name) for name in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY")}
# TensorFlow's C++ INFO lines (oneDNN, CUDA probing) drown the progress bar;
# warnings and errors still show. A user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# gRPC's C core logs every closed connection at INFO; errors still show.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def _tensorflow_started() -> bool:
    context = sys.modules.get("tensorflow.python.eager.context")
    return context is not None and bool(getattr(context.context(), "_initialized", True))


# A split step on the message path waits at the cut on one of TensorFlow's
# inter-op threads while a server in this process needs another for its step;
# TensorFlow gives a one-CPU process a single one. Read when TensorFlow starts
# (too late once it has: keras_split.compiled then explains instead of
# hanging); a setting of the user's (here or in tf.config.threading) wins.
if _usable_cpus() < 2 and not _tensorflow_started():
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "2")

__version__ = "0.1.0"

# What the user had set, before the defaults above: the command line quiets
# TensorFlow further when the user set nothing (keras_split.apps.quiet).
_user_environment = {name: value for name, value in _before.items() if value is not None}

# The public names and the modules that define them, imported on first use
# (PEP 562): `import keras_split` costs nothing, and a command that needs no
# TensorFlow (`keras-split certs`) never imports it.
_EXPORTS = {
    "RelayRole": "keras_split.configurations.chain",
    "SplitChain": "keras_split.configurations.chain",
    "split_chain": "keras_split.configurations.chain",
    "RoundRobin": "keras_split.configurations.federation",
    "SplitFed": "keras_split.configurations.federation",
    "fedavg": "keras_split.configurations.federation",
    "ParallelRole": "keras_split.configurations.parallel",
    "FanOut": "keras_split.configurations.multitask",
    "MultiTaskSplit": "keras_split.configurations.multitask",
    "split_multitask": "keras_split.configurations.multitask",
    "VerticalSplit": "keras_split.configurations.vertical",
    "split_vertical": "keras_split.configurations.vertical",
    "DistributedServerRole": "keras_split.devices",
    "Activations": "keras_split.messages",
    "Reply": "keras_split.messages",
    "SplitClient": "keras_split.network.client",
    "SplitServer": "keras_split.network.server",
    "GrpcTransport": "keras_split.network.transport",
    "ServerError": "keras_split.network.transport",
    "CutCandidate": "keras_split.partition",
    "CutSpec": "keras_split.partition",
    "CutTable": "keras_split.partition",
    "cut_candidates": "keras_split.planning",
    "Cost": "keras_split.planning",
    "CostPlan": "keras_split.planning",
    "plan": "keras_split.planning",
    "ClientRole": "keras_split.roles",
    "ClientStep": "keras_split.roles",
    "ServerRole": "keras_split.roles",
    "SplitModel": "keras_split.split_model",
    "split": "keras_split.split_model",
    "ByteCounter": "keras_split.transport",
    "InProcessTransport": "keras_split.transport",
    "Transport": "keras_split.transport",
}
# Modules reached as attributes (`keras_split.datasets.load_...`).
_MODULES = {"datasets": "keras_split.datasets", "privacy": "keras_split.privacy",
            "plot": "keras_split.plot", "sharding": "keras_split.configurations.sharding",
            "codecs": "keras_split_wire.codecs", "flower": "keras_split.flower"}

if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from keras_split import datasets, plot, privacy
    from keras_split.configurations import sharding
    from keras_split.configurations.chain import RelayRole, SplitChain, split_chain
    from keras_split.configurations.federation import RoundRobin, SplitFed, fedavg
    from keras_split.configurations.multitask import FanOut, MultiTaskSplit, split_multitask
    from keras_split.configurations.parallel import ParallelRole
    from keras_split.configurations.vertical import VerticalSplit, split_vertical
    from keras_split.devices import DistributedServerRole
    from keras_split.messages import Activations, Reply
    from keras_split.network.client import SplitClient
    from keras_split.network.server import SplitServer
    from keras_split.network.transport import GrpcTransport, ServerError
    from keras_split.partition import CutCandidate, CutSpec, CutTable
    from keras_split.planning import Cost, CostPlan, cut_candidates, plan
    from keras_split.roles import ClientRole, ClientStep, ServerRole
    from keras_split.split_model import SplitModel, split
    from keras_split.transport import ByteCounter, InProcessTransport, Transport
    from keras_split_wire import codecs


def __getattr__(name):
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'keras_split' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS, *_MODULES})


__all__ = [
    "Activations",
    "ByteCounter",
    "FanOut",
    "MultiTaskSplit",
    "ParallelRole",
    "RelayRole",
    "RoundRobin",
    "SplitChain",
    "SplitFed",
    "VerticalSplit",
    "ClientRole",
    "ClientStep",
    "Cost",
    "CostPlan",
    "CutCandidate",
    "CutSpec",
    "CutTable",
    "DistributedServerRole",
    "InProcessTransport",
    "GrpcTransport",
    "Reply",
    "ServerError",
    "ServerRole",
    "SplitClient",
    "SplitModel",
    "SplitServer",
    "Transport",
    "codecs",
    "cut_candidates",
    "datasets",
    "fedavg",
    "plan",
    "plot",
    "privacy",
    "sharding",
    "split",
    "split_chain",
    "split_multitask",
    "split_vertical",
]
