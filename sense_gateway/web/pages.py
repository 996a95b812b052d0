"""The dashboard's files: the page and its assets (``static/``), and the
few files of npm's uPlot package it draws with (``/vendor/``)."""

from __future__ import annotations

from pathlib import Path

from twisted.web import resource, static

from sense_gateway.web.api import Folder

STATIC = Path(__file__).with_name("static")
#: what the dashboard needs from npm's uPlot package, by the name it is served under
UPLOT_FILES = {b"uPlot.iife.min.js": "uplot/dist/uPlot.iife.min.js",
               b"uPlot.min.css": "uplot/dist/uPlot.min.css"}
#: the page loads nothing from elsewhere: it works offline, and a device id
#: that smuggles markup could not load a script anyway
PAGE_POLICY = b"default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'"


class _Page(static.File):
    """A static file of the dashboard, never cached stale, never framed."""

    def render_GET(self, request):
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"content-security-policy", PAGE_POLICY)
        request.setHeader(b"x-content-type-options", b"nosniff")
        return super().render_GET(request)


class _Missing(resource.Resource):
    isLeaf = True

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def render_GET(self, request):
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"{self.what} is not installed: run `make run` (npm ci) in the checkout\n".encode()


def find_node_modules(configured: str) -> Path | None:
    """The node_modules holding uPlot: *configured*, else the checkout's, else ./node_modules."""
    candidates = ([Path(configured)] if configured else
                  [Path(__file__).resolve().parents[2] / "node_modules", Path("node_modules")])
    for candidate in candidates:
        if (candidate / "uplot" / "dist").is_dir():
            return candidate
    return None


def vendor_resource(node_modules: Path | None) -> resource.Resource:
    """``/vendor/``: only the files of uPlot the page uses, from npm's install."""
    vendor = Folder()
    for name, relative in UPLOT_FILES.items():
        path = node_modules / relative if node_modules is not None else None
        vendor.putChild(name, _Page(str(path)) if path is not None and path.is_file()
                        else _Missing("uPlot (npm package uplot)"))
    return vendor


def add_dashboard(root: resource.Resource, node_modules: Path | None) -> None:
    """The page at ``/``, its assets at ``/static/``, uPlot at ``/vendor/``."""
    root.putChild(b"", _Page(str(STATIC / "index.html")))
    assets = Folder()
    for name in ("dashboard.js", "dashboard.css"):
        assets.putChild(name.encode(), _Page(str(STATIC / name)))
    root.putChild(b"static", assets)
    root.putChild(b"vendor", vendor_resource(node_modules))
