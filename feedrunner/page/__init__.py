"""The status page: one HTML file, one script, one stylesheet, shipped in the package.

Hand-written, no build step and no CDN (the runner's host may have no internet): the page polls
/status and /status/latency and draws with the DOM and SVG. It is text only here; the control server
decides who may see and steer it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

ASSETS = {"/page.js": ("page.js", "application/javascript"), "/page.css": ("page.css", "text/css")}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@cache
def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


def render(steer: bool, token: bool) -> str:
    """The page, told whether this viewer may steer and whether calls need the bearer token."""
    html = _read("index.html").decode()
    return html.replace("{{steer}}", "1" if steer else "0").replace("{{token}}", "1" if token else "0")


def asset(path: str) -> tuple[bytes, str]:
    name, content_type = ASSETS[path]
    return _read(name), content_type
