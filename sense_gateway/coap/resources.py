"""The gateway's CoAP resources and the tree they hang in.

``/.well-known/core`` lists every visible resource in the CoRE Link
Format (RFC 6690) and honours filter queries; txthings' own listing joins
``bytes`` path segments to ``str`` and fails on Python 3, so we walk the
tree ourselves. Ingest resources only describe their paths: readings
posted to them go from the dispatcher to the pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from twisted.internet import defer
from txthings import coap, resource

LINK_FORMAT = 40


class GatewayResource(resource.CoAPResource):
    """A resource that describes itself with link attributes.

    ``link_attributes`` maps attribute names to a value, a sequence of
    values (written space-separated, RFC 6690 3.2), or ``None`` for a
    valueless attribute such as ``obs``.
    """

    link_attributes: Mapping[str, object] = {}

    def __init__(self):
        super().__init__()
        self.visible = True


def _attribute_values(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def link_attributes(res) -> dict[str, list[str]]:
    """A resource's link attributes, from our own or txthings' way of saying them."""
    attributes: dict[str, list[str]] = {}
    for name, value in getattr(res, "link_attributes", {}).items():
        attributes[name] = _attribute_values(value)
    for name, params in getattr(res, "params", {}).items():
        attributes.setdefault(name, []).extend(str(p.value) for p in params)
    if getattr(res, "observable", False):
        attributes.setdefault("obs", [])
    return attributes


def walk(root, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(path, resource) for every resource below *root*, depth first, sorted."""
    for name in sorted(root.children):
        child = root.children[name]
        path = f"{prefix}/{name.decode('utf-8') if isinstance(name, bytes) else name}"
        yield path, child
        yield from walk(child, path)


def encode_link(path: str, attributes: Mapping[str, list[str]]) -> str:
    parts = [f"<{path}>"]
    for name, values in attributes.items():
        if not values:
            parts.append(name)
        elif name in ("ct", "sz") and len(values) == 1:
            parts.append(f"{name}={values[0]}")
        else:
            parts.append(f'{name}="{" ".join(values)}"')
    return ";".join(parts)


def _matches(path: str, attributes: Mapping[str, list[str]], name: str, wanted: str) -> bool:
    """RFC 6690 4.1: one filter ``name=value``, a trailing ``*`` matches a prefix."""
    if name == "href":
        candidates = [path]
    elif name in attributes:
        candidates = [v for value in attributes[name] for v in value.split()]
        if not candidates:  # a valueless attribute such as obs
            return wanted in ("", "*")
    else:
        return False
    if wanted.endswith("*"):
        return any(c.startswith(wanted[:-1]) for c in candidates)
    return wanted in candidates


class WellKnownCore(resource.CoAPResource):
    """``GET /.well-known/core``: the resource directory of this server."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def render_GET(self, request):
        filters = []
        for query in request.opt.uri_query:
            name, _, wanted = query.decode("utf-8", "replace").partition("=")
            filters.append((name, wanted))
        links = []
        for path, res in walk(self.root):
            if not getattr(res, "visible", False):
                continue
            attributes = link_attributes(res)
            if all(_matches(path, attributes, n, w) for n, w in filters):
                links.append(encode_link(path, attributes))
        response = coap.Message(code=coap.CONTENT, payload=",".join(links).encode("utf-8"))
        response.opt.content_format = LINK_FORMAT
        return defer.succeed(response)


class IngestResource(GatewayResource):
    """An ingest path in the tree: it lists the path in
    ``/.well-known/core`` and answers other methods with 4.05. POSTs to it
    never reach it: the dispatcher hands them to the pipeline."""

    def __init__(self, path: str, pipeline):
        super().__init__()
        self.path = path
        content_formats = sorted(cf for cf in pipeline.content_formats(path) if cf is not None)
        self.link_attributes = {"rt": "sense.readings", "if": "core.b", "ct": content_formats}


def build_tree(pipeline, extra: Mapping[str, object]) -> resource.CoAPResource:
    """The root resource: well-known core, one ingest resource per format
    path, and the resources plugins contributed (``{"/path": resource}``)."""
    root = resource.CoAPResource()
    resources = {path: IngestResource(path, pipeline) for path in pipeline.paths()}
    for path, res in extra.items():
        if path in resources:
            raise ValueError(f"two resources claim {path}")
        resources[path] = res
    for path, res in resources.items():
        _mount(root, path, res)
    well_known = resource.CoAPResource()
    well_known.putChild(b"core", WellKnownCore(root))
    root.putChild(b".well-known", well_known)
    return root


def _mount(root, path: str, res) -> None:
    segments = [s.encode("utf-8") for s in path.strip("/").split("/")]
    parent = root
    for segment in segments[:-1]:
        if segment not in parent.children:
            parent.putChild(segment, resource.CoAPResource())
        parent = parent.children[segment]
    if segments[-1] in parent.children:
        existing = parent.children[segments[-1]]
        res.children.update(existing.children)
    parent.putChild(segments[-1], res)
