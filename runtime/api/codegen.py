"""Regenerate the protobuf/gRPC modules from the .proto: ``python -m runtime.api.codegen``.

The generated files are committed (so serving needs no grpcio-tools); a test checks that they
match the .proto. grpc_tools writes absolute imports (``from wattserve.v1 import ...``), which
would collide with our ``wattserve`` package, so they are rewritten as relative imports.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
PROTO_ROOT = HERE / "proto"
PROTO = Path("wattserve/v1/wattserve.proto")
OUT = HERE / "gen"
FILES = ("wattserve_pb2.py", "wattserve_pb2.pyi", "wattserve_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(
            [
                "protoc",
                f"-I{PROTO_ROOT}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(PROTO),
            ]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            text = (Path(tmp) / PROTO.parent / name).read_text()
            text = text.replace("from wattserve.v1 import", "from . import")
            (out_dir / name).write_text(text)
    (out_dir / "__init__.py").write_text('"""Generated from proto/wattserve/v1/wattserve.proto by codegen.py."""\n')


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
    print(f"generated {', '.join(FILES)} in {OUT}")
