"""The repository stands alone: its documents cite only what it holds."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    lines = path.read_text().splitlines()
    fenced, found = False, set()
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(_anchor(line.lstrip("#")))
    return found


def test_nothing_cites_a_design_file_outside_the_repository() -> None:
    citing = [str(p.relative_to(ROOT)) for p in _tracked("*.py", "*.md", "*.sh", "*.toml")
              if p.name != "test_docs.py" and "DESIGN.md" in p.read_text()]  # fmt: skip
    assert citing == []


def test_architecture_page_has_what_the_code_cites() -> None:
    anchors = _anchors(ROOT / "docs" / "architecture.md")
    for section in ("layers", "write-path-putrecord", "read-path-getrecord",
                    "encryption-format", "keys-all-in-the-pkcs11-token-none-extractable",
                    "audit-trail", "rows-are-not-trusted", "threat-model", "errors",
                    "scale"):  # fmt: skip
        assert section in anchors, section


def test_relative_links_in_documents_resolve() -> None:
    broken = []
    for doc in _tracked("*.md"):
        for target in _LINK.findall(doc.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            resolved = (doc.parent / path) if path else doc
            if not resolved.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []
