"""Regenerate split_pb2.py and split_pb2_grpc.py from split.proto.

    python keras_split/proto/generate.py [OUTPUT_DIR]

Run it as a script, not with -m: importing keras_split loads TensorFlow, whose
protobuf runtime crashes beside grpc_tools in one process.

The generated files are committed; tests/test_wire.py checks they are fresh.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate(output_dir: Path) -> None:
    from grpc_tools import protoc  # development dependency (grpcio-tools)

    root = HERE.parent.parent
    args = [
        "protoc",
        f"-I{root}",
        f"--python_out={output_dir}",
        f"--grpc_python_out={output_dir}",
        str(HERE.relative_to(root) / "split.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent.parent)
