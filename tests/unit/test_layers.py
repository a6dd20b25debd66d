"""No module uses another module's private names (docs/layers.md).

import-linter (``lint-imports``, contracts in pyproject.toml) checks which modules
import which; it cannot see names. This test reads the source of the runtime packages
and refuses ``from m import _name``, ``module._name`` and ``obj._name`` on anything but
``self``/``cls``: a private name is one its module may change without telling anyone,
so a second user means it should be promoted, or the code that needs it moved.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "storage", "keystore")

# Private names of third-party objects we use knowingly, each for a reason.
VENDOR_PRIVATE = {
    "_mapping",  # SQLAlchemy Row's documented mapping view (underscored to avoid columns)
    "_asdict",  # namedtuple API
    "_replace",  # namedtuple API
    "_fields",  # namedtuple API
    "_exit",  # os._exit: the fault-injection crash must skip every cleanup
    "_Hash",  # hashlib._Hash: the only name typeshed gives a hash object's type
    "_SubParsersAction",  # argparse: the type of add_subparsers(), no public alias
    "_base_url",  # minio: the endpoint for error messages, no public accessor
    "_config",  # pynetdicom._config: the library's documented settings module
    "_servers",  # pynetdicom AE: registering a server made by make_server, no public way
    "_map",  # asn1crypto's OID-to-name map: pyHanko registers its OIDs there, no public way
    "_get_scp",  # pynetdicom's C-GET SCP, extended by service.dicom.retrieve: no public hook
}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _sources() -> Iterator[Path]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_gen" not in path.relative_to(ROOT).parts:  # generated protobuf code
                yield path


def violations(source: str, where: str) -> list[str]:
    """Each use of another module's or object's private name in ``source``."""
    found: list[str] = []
    tree = ast.parse(source, filename=where)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found += [
                f"{where}:{node.lineno}: from {node.module} import {alias.name}"
                for alias in node.names
                if _is_private(alias.name)
            ]
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in {"self", "cls"}:
                continue
            if node.attr in VENDOR_PRIVATE:
                continue
            found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    found = [
        v
        for path in _sources()
        for v in violations(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())
    ]
    assert found == [], "promote these names or move the code that needs them:\n" + "\n".join(
        found
    )


def _without_line(violation: str) -> str:
    where, _, what = violation.partition(": ")
    return f"{where.rsplit(':', 1)[0]}: {what}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from storage.s3_blobs import _ChunkReader\n", 1),
        ("from storage.backup import snapshot\nsnapshot._decoded_lines(x)\n", 1),
        ("def f(self):\n    return self._store._translate('op', e)\n", 1),
        ("def f(self):\n    return self._store.translate_error('op', e)\n", 0),
        ("from storage.s3_blobs import ChunkReader, __all__\n", 0),
        ("def f(row):\n    return row._mapping\n", 0),
    ],
)
def test_the_check_sees_each_form(source: str, expected: int) -> None:
    """The check itself: each form of private use is found, public names pass."""
    assert len(violations(source, "probe.py")) == expected


@pytest.mark.parametrize("package", ["storage", "keystore"])
def test_each_face_exports_what_it_declares(package: str) -> None:
    """The face's lazy table, its ``__all__`` and its type-checking imports agree, and
    every name resolves to the object its defining module holds."""
    face = importlib.import_module(package)
    exports: dict[str, str] = face._EXPORTS  # the face's own table, under test
    assert sorted(face.__all__) == sorted(exports)  # ruff orders __all__ its own way
    tree = ast.parse((ROOT / package / "__init__.py").read_text(encoding="utf-8"))
    typed = {
        alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__"
        for alias in node.names
        if node.module.startswith(f"{package}.")
    }
    assert typed == exports
    for name, module in exports.items():
        assert getattr(face, name) is getattr(importlib.import_module(module), name)


def test_a_face_loads_nothing_until_asked() -> None:
    """Importing ``storage.errors`` (as the CLI does) does not load the whole package."""
    code = "import sys, storage.errors; print('storage.records' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
