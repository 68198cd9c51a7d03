"""Every PowerShell script in the repository parses, and none evaluates text as code.

No machine here runs PowerShell, so a parser (tree-sitter-powershell) is the first line of
defence against a script that would fail on the server before doing anything.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tree_sitter
import tree_sitter_powershell

REPO_ROOT = Path(__file__).resolve().parents[1]
_SKIPPED_DIRS = {"build", "dist", "node_modules"}
_PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))
_EVALUATES_TEXT = re.compile(r"\b(Invoke-Expression|iex)\b", re.IGNORECASE)


def repository_scripts() -> list[Path]:
    return sorted(
        path
        for path in REPO_ROOT.rglob("*.ps1")
        if not any(part.startswith(".") or part in _SKIPPED_DIRS for part in path.parts)
    )


def syntax_errors(source: bytes) -> list[str]:
    """The positions of ERROR and MISSING nodes, empty when the script parses cleanly."""
    found: list[str] = []
    stack = [_PARSER.parse(source).root_node]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            row, column = node.start_point
            found.append(f"line {row + 1}, column {column + 1}: {node.type}")
        stack.extend(node.children)
    return found


def test_the_check_catches_broken_scripts() -> None:
    assert syntax_errors(b"$params = @{ Identity = $id }\nEnable-Mailbox @params\n") == []
    assert syntax_errors(b"if ($true) { Write-Output 1\n") != []


@pytest.mark.parametrize(
    "script", repository_scripts(), ids=lambda p: str(p.relative_to(REPO_ROOT))
)
def test_script_parses_and_never_evaluates_text(script: Path) -> None:
    source = script.read_bytes()
    assert syntax_errors(source) == []
    assert not _EVALUATES_TEXT.search(source.decode("utf-8-sig")), "Invoke-Expression is banned"
