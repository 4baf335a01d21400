"""Regenerate ``agent/api/_proto/`` from ``agent/api/grpc_service.proto``.

    python -m agent.api._gen        (needs grpcio-tools, in the dev extra)

Writes the message and stub modules for clients (``grpc_service_pb2.py``, ``.pyi``,
``grpc_service_pb2_grpc.py``) and the binary descriptor set (``grpc_service.desc``) that the
server builds its message classes from, in a private descriptor pool (see ``agent.api._messages``).
The generated files are committed; only this script touches them.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "grpc_service.proto"
OUT = HERE / "_proto"


def main() -> int:
    try:
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError:
        print("grpcio-tools is not installed (pip install grpcio-tools)", file=sys.stderr)
        return 1
    import grpc_tools

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    OUT.mkdir(exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{HERE}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--descriptor_set_out={OUT / 'grpc_service.desc'}",
        str(PROTO),
    ]
    code = int(protoc.main(args))
    if code != 0:
        return code
    # protoc writes `import grpc_service_pb2`; make it a package-relative import.
    stub = OUT / "grpc_service_pb2_grpc.py"
    text = stub.read_text(encoding="utf-8")
    stub.write_text(
        text.replace(
            "import grpc_service_pb2 as", "from agent.api._proto import grpc_service_pb2 as"
        ),
        encoding="utf-8",
    )
    (OUT / "__init__.py").write_text(
        '"""Generated from agent/api/grpc_service.proto by `python -m agent.api._gen`."""\n',
        encoding="utf-8",
    )
    print(f"generated {sorted(p.name for p in OUT.iterdir() if p.is_file())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
