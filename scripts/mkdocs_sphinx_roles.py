"""A griffe extension for the docs site (mkdocs.yml): our docstrings are Google style but name other
objects with Sphinx roles (``:class:`~spectral_plugins.core.snapshot.Snapshot```, ``:meth:`step```),
which mkdocstrings does not read. Each role becomes an mkdocs-autorefs cross-reference, so a target
that is not documented fails ``mkdocs build --strict``; an unqualified name is resolved in the scope
of the documented object (mkdocstrings' ``scoped_crossrefs``). An RST literal-block marker (a line
ending in ``::``) becomes a plain colon; the indented block after it renders as code anyway."""

from __future__ import annotations

import re
from typing import Any

import griffe

# :role:`target`, :role:`~target` (show the last name only) or :role:`title <target>`.
_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj|const):`(~?)([^`<]+?)(?:\s*<([^`>]+)>)?`")
_LITERAL_MARKER = re.compile(r"(?m)(\S)?::$")


def _link(match: re.Match[str]) -> str:
    short, text, target = match.group(1), match.group(2).strip(), match.group(3)
    if target:  # explicit title
        return f"[{text}][{target.strip()}]"
    title = text.rsplit(".", 1)[-1] if short else text
    return f"[`{title}`][{text}]"


def convert(docstring: str) -> str:
    """``docstring`` with its Sphinx roles as autorefs links and its ``::`` markers as colons."""
    docstring = _ROLE.sub(_link, docstring)
    return _LITERAL_MARKER.sub(lambda m: f"{m.group(1)}:" if m.group(1) else "", docstring)


class SphinxRoles(griffe.Extension):
    """Rewrites each docstring as the package is loaded (before mkdocstrings parses it)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
