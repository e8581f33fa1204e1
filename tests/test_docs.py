"""The Markdown pages render: every table has as many cells per row as its header, every relative link resolves."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("**/*.md")])
ALIGNMENT_ROW = re.compile(r"^\|\s*:?-")
CELL_SEPARATOR = re.compile(r"(?<!\\)\|")  # GitHub splits cells on every unescaped '|', inside code spans too
LINK = re.compile(r"\]\(([^)\s]+)\)")


def cell_count(line: str) -> int:
    return len(CELL_SEPARATOR.split(line.strip().strip("|")))


def table_defects(text: str) -> list[str]:
    """``'line N: ...'`` for each table row whose cell count differs from its header's (outside code fences)."""
    lines, defects, in_fence, i = text.split("\n"), [], False, 0
    while i < len(lines):
        if lines[i].startswith("```"):
            in_fence = not in_fence
        if not in_fence and lines[i].startswith("|") and i + 1 < len(lines) and ALIGNMENT_ROW.match(lines[i + 1]):
            header, j = cell_count(lines[i]), i + 1
            while j < len(lines) and lines[j].startswith("|"):
                if cell_count(lines[j]) != header:
                    defects.append(f"line {j + 1}: {cell_count(lines[j])} cells, header has {header}")
                j += 1
            i = j
            continue
        i += 1
    return defects


def test_table_defects_finds_a_pipe_in_a_code_span():
    table = "| loss | `p(y|x)` |\n|---|---|\n| a | b |\n"
    assert table_defects(table) == ["line 2: 2 cells, header has 3", "line 3: 2 cells, header has 3"]
    assert table_defects(table.replace("y|x", "y\\|x")) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_tables_are_well_formed(page):
    assert table_defects(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    targets = [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:|#", t)]
    missing = [t for t in targets if not (page.parent / t.split("#")[0]).exists()]
    assert missing == []
