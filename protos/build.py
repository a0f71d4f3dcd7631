"""Generate the Python gRPC stubs from protos/cleave/v1/*.proto (run at install time)."""
from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc


def main() -> int:
    root = pathlib.Path(__file__).resolve().parent
    protos = sorted(str(p.relative_to(root)) for p in (root / "cleave").rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={root}",
            f"--pyi_out={root}", f"--grpc_python_out={root}", *protos]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
