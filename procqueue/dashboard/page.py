"""The dashboard's page: page.html with page.css and page.js put inline.

The three files are kept apart to be edited as what they are; served as one document, so the
page needs no second request and no network (no CDN), and the Content-Security-Policy can
allow exactly this style and this script by their nonce.
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import re

_SLOT = re.compile(r"\{\{(\w+)\}\}")


@functools.cache
def _asset(name: str) -> str:
    return importlib.resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def render_page(kind: str, title: str, nonce: str) -> bytes:
    """The page for a source of this kind ("store" or "pool"); ``nonce`` marks its inline
    style and script as the ones the CSP allows."""
    values = {"kind": html.escape(kind), "title": html.escape(title), "nonce": nonce,
              "css": _asset("page.css"), "js": _asset("page.js")}
    # one pass: a title that reads "{{js}}" stays text
    page = _SLOT.sub(lambda m: values[m.group(1)], _asset("page.html"))
    return page.encode("utf-8")
