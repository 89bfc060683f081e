"""MkDocs hooks: the recipe-key table, generated from the schema (finetune/config/keys.py) where a page says so, and
the package's Sphinx cross-reference roles (``:class:`Run```) shown as plain code in the API pages."""

from __future__ import annotations

import re
from typing import Any

MARKER = "<!-- recipe-keys -->"


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Replace the marker with the table of every recipe key."""
    if MARKER not in markdown:
        return markdown
    from finetune.config.keys import keys_markdown

    return markdown.replace(MARKER, keys_markdown())


ROLE = re.compile(r":(?:class|func|mod|meth|attr|data|exc|obj):<code>~?([^<]*)</code>")


def on_page_content(html: str, **kwargs: Any) -> str:
    """``:class:<code>~finetune.errors.UserError</code>`` (a role mkdocstrings leaves as text) -> ``UserError``."""

    def code(m: re.Match[str]) -> str:
        target = m.group(1)
        return f"<code>{target.rsplit('.', 1)[-1] if m.group(0).find('~') >= 0 else target}</code>"

    return ROLE.sub(code, html)
