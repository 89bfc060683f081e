"""The README and the documentation site: short, within 120 columns, every link landing on a page and heading that
exist, and every recipe key described (the site's key table is generated from those descriptions)."""

from __future__ import annotations

import re
from pathlib import Path

from finetune.config.keys import keys_markdown, recipe_keys

ROOT = Path(__file__).resolve().parents[1]
README, DOCS = ROOT / "README.md", ROOT / "docs"


def _slug(title: str) -> str:
    """The anchor MkDocs' toc extension (and GitHub) gives a heading."""
    return re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", title.lower()).strip())


def _anchors(page: Path) -> set[str]:
    """The page's headings as anchors (a ``#`` line inside a fenced code block is a comment, not a heading)."""
    out, fenced = set(), False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"#{1,4} ", line):
            out.add(_slug(line.lstrip("#").strip()))
    return out


def test_every_recipe_key_is_described() -> None:
    keys = list(recipe_keys())
    assert len(keys) > 100
    missing = [key for key, _, description in keys if not description.strip()]
    assert not missing, f"recipe keys without a Field description (the docs' table needs one): {missing}"
    table = keys_markdown()
    assert all(f"| `{key.partition('.')[2]}` |" in table for key, _, _ in keys)
    names = {key for key, _, _ in keys}
    assert {"freeze.stages[].epochs", "calibrate.classes.<class>.metric"} <= names  # a list's and a map's shape
    assert "&lt;split&gt;" in table  # angle brackets stay text, not an HTML tag the page would swallow


def test_readme_is_a_short_quickstart_whose_links_land() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 250 and max(map(len, lines)) <= 120
    text = README.read_text()
    targets = re.findall(r"\]\((docs/[^)]+)\)", text) + re.findall(r"^\[[^\]]+\]: (docs/\S+)$", text, re.M)
    assert len(targets) > 40
    for target in targets:
        path, _, anchor = target.partition("#")
        assert (ROOT / path).is_file(), target
        assert not anchor or anchor in _anchors(ROOT / path), target


def test_every_docs_section_is_one_click_from_the_readme() -> None:
    text = README.read_text()
    for page in DOCS.glob("*.md"):
        assert f"docs/{page.name})" in text, page.name
        for anchor in _anchors(page) - {_slug(page.read_text().splitlines()[0][2:])}:
            assert f"docs/{page.name}#{anchor}" in text, (page.name, anchor)
