"""Every fenced block in README.md and docs/*.md names a language the docs tests know, so a
new block cannot slip past ``conftest.py`` unrun: bash, python and console blocks run (or
carry a visible skip reason); text blocks are output and syntax."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
KNOWN = {"bash", "python", "console", "text"}


def fences(text: str) -> list[tuple[int, str]]:
    """(line number, language) of each opening fence."""
    out, inside = [], False
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^(```+)(.*)$", line)
        if m:
            if not inside:
                out.append((n, m.group(2).strip()))
            inside = not inside
    return out


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_block_names_a_known_language(path):
    bad = [(n, lang) for n, lang in fences(path.read_text()) if lang not in KNOWN]
    assert not bad, f"{path.name}: blocks without a known language (line, language): {bad}"


def test_the_checker_sees_a_bare_block():
    assert fences("a\n```\nx\n```\n```bash\ny\n```\n") == [(2, ""), (5, "bash")]
