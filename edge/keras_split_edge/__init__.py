"""keras_split_edge: the TensorFlow-free device runtime of keras_split.

Load a client half exported with `keras_split.export.export_client` (LiteRT
`.tflite` or `.onnx`), and train it on the device against a keras_split
server: the forward pass, the backward pass from the server's cut gradient and
the optimizer update all run here. Depends on numpy, grpcio, protobuf and the
LiteRT interpreter and/or onnxruntime; never on TensorFlow or keras_split.
`RoundClient` takes part in a server's rounds (round-robin, SplitFed).
"""

from keras_split_edge.client import EdgeClient
from keras_split_edge.link import LinkError, ServerLink
from keras_split_edge.rounds import RoundClient, TurnResult
from keras_split_edge.runtime import ExportedModel, LiteRTModel, OnnxModel, load

__version__ = "0.1.0"

__all__ = ["EdgeClient", "ExportedModel", "LinkError", "LiteRTModel", "OnnxModel",
           "RoundClient", "ServerLink", "TurnResult", "load"]
