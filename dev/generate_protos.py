"""Regenerate the protocol's Python code from split.proto, for both packages.

    python keras_split/proto/generate.py [OUTPUT_ROOT]

Writes `keras_split/proto/split_pb2*.py` and, for the TensorFlow-free device
runtime, a copy of `split.proto` and its message code under
`edge/keras_split_edge/proto/` (the edge package may not import keras_split).
The copy declares the protobuf package `keras_split_edge.v1`, so both packages
can be loaded in one process without clashing in protobuf's descriptor pool;
field numbers and types are what go on the wire, and they are the same. The
edge calls the server's methods by their path (`/keras_split.v1.SplitLearning/...`).
Run it as a script, not with -m: importing keras_split loads TensorFlow, whose
protobuf runtime crashes beside grpc_tools in one process.

The generated files are committed; tests/test_grpc.py checks they are fresh.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
EDGE_PROTO = Path("keras_split_edge") / "proto"


def _protoc(include: Path, proto: Path, output_dir: Path, services: bool = True) -> None:
    from grpc_tools import protoc  # development dependency (grpcio-tools)

    args = ["protoc", f"-I{include}", f"--python_out={output_dir}", str(proto)]
    if services:
        args.insert(3, f"--grpc_python_out={output_dir}")
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def generate(output_root: Path) -> None:
    _protoc(ROOT, HERE.relative_to(ROOT) / "split.proto", output_root)
    edge = output_root / "edge"
    (edge / EDGE_PROTO).mkdir(parents=True, exist_ok=True)
    text = (HERE / "split.proto").read_text()
    (edge / EDGE_PROTO / "split.proto").write_text(
        text.replace("package keras_split.v1;", "package keras_split_edge.v1;"))
    _protoc(edge, EDGE_PROTO / "split.proto", edge, services=False)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
