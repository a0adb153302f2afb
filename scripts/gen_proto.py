"""Regenerate the Python gRPC stubs in embedforge/_proto/ from protos/embedforge/v1/embedding.proto.

Usage: python scripts/gen_proto.py [OUTPUT_DIR]   (default: embedforge/_proto)

protoc names modules after the proto path (embedforge.v1), which is not a Python package here, so the
generated imports are rewritten to point at embedforge._proto.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_FILE = "embedforge/v1/embedding.proto"
GENERATED = ("embedding_pb2.py", "embedding_pb2.pyi", "embedding_pb2_grpc.py")


def generate(output_dir: Path) -> list[Path]:
    """Run grpcio-tools' protoc and write the stubs into output_dir; returns the written files."""
    from grpc_tools import protoc

    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", str(PROTO_ROOT / PROTO_FILE)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILE}")
        written = []
        for name in GENERATED:
            text = (Path(tmp) / "embedforge" / "v1" / name).read_text()
            text = text.replace("from embedforge.v1 import", "from embedforge._proto import")
            target = output_dir / name
            target.write_text(text)
            written.append(target)
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "embedforge" / "_proto"
    for path in generate(out):
        print(path)
