"""keras_split: split learning for TensorFlow/Keras.

Cut an existing Keras model into a client half and a server half, and train it
across the cut: only cut activations go up and cut gradients come down.
"""

import os

# TensorFlow's C++ INFO lines (oneDNN, CUDA probing) drown the progress bar;
# warnings and errors still show. A user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# gRPC's C core logs every closed connection at INFO; errors still show.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# ruff: noqa: E402

from keras_split import datasets
from keras_split.configurations import sharding
from keras_split.configurations.chain import RelayRole, SplitChain, split_chain
from keras_split.configurations.federation import RoundRobin, SplitFed, fedavg
from keras_split.configurations.multitask import FanOut, MultiTaskSplit, split_multitask
from keras_split.configurations.vertical import VerticalSplit, split_vertical
from keras_split.messages import Activations, Reply
from keras_split.network.client import SplitClient
from keras_split.network.server import SplitServer
from keras_split.network.transport import GrpcTransport, ServerError
from keras_split.partition import CutCandidate, CutSpec, cut_candidates
from keras_split.planning import Cost, CostPlan, plan
from keras_split.roles import ClientRole, ClientStep, ServerRole
from keras_split.split_model import SplitModel, split
from keras_split.transport import ByteCounter, InProcessTransport, Transport
from keras_split_wire import codecs

__version__ = "0.1.0"


def __getattr__(name):
    # `keras_split.privacy` (defences on top of the core) and `keras_split.plot`
    # (matplotlib, an extra) are imported on first use, so `import keras_split`
    # loads neither.
    if name in ("privacy", "plot"):
        import importlib

        return importlib.import_module(f"keras_split.{name}")
    raise AttributeError(f"module 'keras_split' has no attribute {name!r}")


__all__ = [
    "Activations",
    "ByteCounter",
    "FanOut",
    "MultiTaskSplit",
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
