"""Regenerate the gRPC stubs in ``service/_gen`` from ``proto/``.

Run ``python -m service.protogen``; ``--check`` exits non-zero when the committed stubs
are stale. protoc writes ``from medvault.v1 import x_pb2``; the stubs live inside the
``service`` package, so those imports are rewritten to ``service._gen.medvault.v1``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
GEN_DIR = ROOT / "service" / "_gen"
_IMPORT = re.compile(r"^from medvault\.v1 import", re.MULTILINE)


def generate(out: Path) -> None:
    """Write the stubs for every proto under ``proto/`` into ``out``."""
    import grpc_tools  # noqa: PLC0415  (a dev-only dependency)
    from grpc_tools import protoc  # noqa: PLC0415

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in out.rglob("*.py*"):
        path.write_text(_IMPORT.sub("from service._gen.medvault.v1 import", path.read_text()))
    for pkg in [out, *[d for d in out.rglob("*") if d.is_dir()]]:
        (pkg / "__init__.py").touch()


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def main(argv: list[str] | None = None) -> int:
    """Regenerate, or with ``--check`` compare against the committed stubs."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the stubs are stale")
    ns = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if ns.check:
            if _snapshot(fresh) != _snapshot(GEN_DIR):
                print("gRPC stubs are stale: run `python -m service.protogen`", file=sys.stderr)
                return 1
            return 0
        shutil.rmtree(GEN_DIR, ignore_errors=True)
        shutil.copytree(fresh, GEN_DIR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
