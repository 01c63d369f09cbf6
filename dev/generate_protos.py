"""Regenerate the protocol's Python code from split.proto (a development script).

    python dev/generate_protos.py [OUTPUT_ROOT]

Writes `keras_split_wire/proto/split_pb2.py` (with its `.pyi` types) and
`split_pb2_grpc.py` under
`wire/` (or under OUTPUT_ROOT, for the freshness test). There is one copy: the
TensorFlow library and the device runtime both import it from
`keras_split_wire`.

Use the grpcio-tools pinned in the wire package's `generate` extra
(`pip install -e "./wire[generate]"`, in an environment of its own):
its protoc (protobuf 6.31.1) writes code that loads on every protobuf the wire
package declares: protobuf's runtime accepts generated code as old as itself or
older (6.31.1 up to 7.x). Run it as a script, in a process that has not
imported TensorFlow.

The generated files are committed; tests/test_wire.py checks they are fresh.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIRE = ROOT / "wire"
PROTO = Path("keras_split_wire") / "proto" / "split.proto"


def generate(output_root: Path) -> None:
    from grpc_tools import protoc  # development dependency (grpcio-tools)

    output_root.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{WIRE}", f"--python_out={output_root}", f"--pyi_out={output_root}",
            f"--grpc_python_out={output_root}", str(WIRE / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else WIRE)
