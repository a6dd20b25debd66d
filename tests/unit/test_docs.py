"""The repository stands alone: its documents cite only what it holds."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from pathlib import Path

from service.cli.main import parser

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
            missing_anchor = bool(anchor) and resolved.suffix == ".md" and (
                not resolved.exists() or anchor not in _anchors(resolved)
            )
            if not resolved.exists() or missing_anchor:
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []


def _subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return None


def _unknown_part(command: str, top: argparse.ArgumentParser) -> str | None:
    """What in a documented ``medvault …`` line the parser ``top`` (the CLI's full
    parser, only read here) does not know, or None."""
    try:
        words = shlex.split(command, comments=True)[1:]
    except ValueError:
        words = command.split()[1:]
    p, path = top, ["medvault"]
    while words and (subs := _subcommands(p)) is not None:
        names = words[0].split("|")  # `medvault stack up|down|status`
        if words[0].startswith("-") or words[0] in ("…", "..."):
            break
        if not all(name in subs for name in names):
            return f"command {' '.join([*path, words[0]])}"
        p, path, words = subs[names[0]], [*path, names[0]], words[1:]
    known = {flag for action in p._actions for flag in action.option_strings}
    for word in words:
        flag = word.strip("[]").split("=")[0]
        if re.fullmatch(r"--[a-z][a-z-]*", flag) and flag not in known:
            return f"flag {' '.join(path)} {flag}"
    return None


def test_documented_commands_exist() -> None:
    """Every ``medvault …`` in backticks or in a code block names real commands and flags."""
    unknown = []
    top = parser()  # built once: the walk only reads it (it was 5 s as one per command)
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        commands = re.findall(r"`(medvault [^`]+)`", text)
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
            commands += re.findall(r"^\s*(?:\.venv/bin/)?(medvault [^\n]+)$", block, re.M)
        for command in commands:
            problem = _unknown_part(command.replace("\\|", "|"), top)
            if problem:
                unknown.append(f"{doc.relative_to(ROOT)}: {problem}")
    assert unknown == []
