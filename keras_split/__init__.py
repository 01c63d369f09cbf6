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

from keras_split import codecs, datasets
from keras_split.grpc_transport import GrpcTransport, ServerError, SplitClient
from keras_split.messages import Activations, Reply
from keras_split.partition import CutCandidate, CutSpec, cut_candidates
from keras_split.roles import ClientRole, ClientStep, ServerRole
from keras_split.server import SplitServer
from keras_split.split_model import SplitModel, split
from keras_split.transport import ByteCounter, InProcessTransport, Transport

__version__ = "0.1.0"

__all__ = [
    "Activations",
    "ByteCounter",
    "ClientRole",
    "ClientStep",
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
    "split",
]
