"""The web's resources: the read-only JSON (and CSV) API over the registry
and the embedded store, ``/api/stats`` and ``/healthz``.

- ``/api/devices``: one object per device, with its liveness (``state``,
  ``interval``, ``interval_source``, ``silent``), offline and late ones
  first;
- ``/api/readings?device=ID&field=NAME&since=..&until=..``: one field's
  history (``points``: ``[[epoch ms, value], ...]``, ``unit``, ``symbol``);
- ``/api/series?device=ID&since=..&until=..``: every numeric field of a
  device (``fields``, ``units`` and ``symbols`` by field).

``since`` and ``until`` take a relative time (``-1h``, ``-30m``), an ISO
8601 time, or epoch seconds or milliseconds (a number from 10^11 up is
milliseconds: 10^11 seconds is in the year 5138). Both readings and
series answer CSV with ``?format=csv`` or ``Accept: text/csv``: a header,
then ``time,device,field,value,unit`` rows (ISO 8601 UTC times to the
millisecond). Text that came from a device and begins with ``= + - @`` or
a tab is written with a leading ``'``, so a spreadsheet does not run it
as a formula.
"""

from __future__ import annotations

import csv
import datetime
import io
import re
from dataclasses import dataclass

import orjson
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import pages, resource, server

from sense_gateway.liveness import fleet_order
from sense_gateway.units import symbol

log = Logger()

_RELATIVE = re.compile(r"-(\d+)([smhd])\Z")
_NUMBER = re.compile(r"\d+(\.\d+)?\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: from here on a bare number is epoch milliseconds
EPOCH_MS_FROM = 1e11
TIME_HELP = "-<n>[smhd], an ISO 8601 time, or epoch seconds or milliseconds"


def parse_time(text: str, now: float) -> float:
    """Epoch seconds of ``-1h`` (relative to *now*), an ISO 8601 time, or
    epoch seconds or milliseconds."""
    match = _RELATIVE.match(text)
    if match:
        return now - int(match.group(1)) * _UNITS[match.group(2)]
    if _NUMBER.match(text):
        value = float(text)
        return value / 1000 if value >= EPOCH_MS_FROM else value
    moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def json_response(request, status: int, body) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return orjson.dumps(body)


class Folder(resource.Resource):
    """A path segment with fixed children; anything else is a plain 404."""

    def getChild(self, path, request):
        return pages.notFound()


class BadQuery(ValueError):
    """A request's arguments are wrong: 400, with this message."""


class AsyncResource(resource.Resource):
    """A leaf answering GET with the result of ``respond(request)`` (a Deferred)."""

    isLeaf = True

    def __init__(self, web):
        super().__init__()
        self.web = web

    def render_GET(self, request):
        def failed(failure):
            if failure.check(BadQuery):
                request.write(json_response(request, 400, {"error": str(failure.value)}))
                return
            log.failure("{path} failed", failure, path=request.path)
            request.write(json_response(request, 500, {"error": "internal error"}))
        d = defer.maybeDeferred(self.respond, request)
        d.addCallbacks(request.write, failed).addBoth(lambda _: request.finish())
        return server.NOT_DONE_YET


class DevicesResource(AsyncResource):
    def respond(self, request):
        now = self.web.reactor.seconds()

        def rows(records):
            return json_response(request, 200, [{
                "id": r.id, "first_seen": r.first_seen, "last_seen": r.last_seen,
                "last_source": r.last_source, "last_seq": r.state.last_seq,
                **{k: getattr(r.state.counters, k) for k in
                   ("received", "lost", "duplicates", "resets", "unsequenced")},
                "state": judged.state.value, "interval": judged.interval,
                "interval_source": judged.interval_source, "silent": round(judged.silent, 3),
            } for r, judged in fleet_order(records, now, self.web.policy)])
        return self.web.in_thread(self.web.backends.devices).addCallback(rows)


@dataclass(frozen=True)
class ReadingsQuery:
    """What ``/api/readings`` and ``/api/series`` were asked, parsed once."""

    device: str
    #: the one field (readings), or None (series: every field)
    field: str | None
    since_ns: int
    until_ns: int | None
    csv: bool

    @classmethod
    def parse(cls, request, now: float, *, with_field: bool) -> "ReadingsQuery":
        """The request's arguments; :class:`BadQuery` naming what is wrong."""
        args = {k.decode(errors="replace"): v[0].decode(errors="replace")
                for k, v in request.args.items()}
        if "device" not in args or (with_field and "field" not in args):
            raise BadQuery("device and field are required" if with_field
                           else "device is required")
        bounds = []
        for name, default in (("since", "-1h"), ("until", None)):
            text = args.get(name, default)
            try:
                bounds.append(None if text is None else int(parse_time(text, now) * 1e9))
            except (ValueError, OverflowError):
                raise BadQuery(f"{name}: {TIME_HELP}") from None
        form = args.get("format")
        wants_csv = form == "csv" or (form is None
                                      and b"text/csv" in (request.getHeader(b"accept") or b""))
        return cls(args["device"], args.get("field") if with_field else None, *bounds, wants_csv)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _text_cell(text: str) -> str:
    return "'" + text if text.startswith(_FORMULA_START) else text


def _iso_ms(time_ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(time_ns / 1e9, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def csv_response(request, device: str, rows) -> bytes:
    """*rows* of (time_ns, field, value, unit) as CSV with a header."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["time", "device", "field", "value", "unit"])
    for time_ns, field, value, unit in rows:
        writer.writerow([_iso_ms(time_ns), _text_cell(device), _text_cell(field),
                         _text_cell(value) if isinstance(value, str) else repr(value),
                         _text_cell(unit) if unit else ""])
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"text/csv; charset=utf-8")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", device)[:64] or "device"
    request.setHeader(b"content-disposition", f'attachment; filename="{name}.csv"'.encode())
    return out.getvalue().encode("utf-8")


class _StoreResource(AsyncResource):
    """A query of the embedded store: parse, read on the web's thread, answer."""

    with_field = True

    def respond(self, request):
        query = ReadingsQuery.parse(request, self.web.reactor.seconds(),
                                    with_field=self.with_field)
        return self.web.in_thread(self.read, query).addCallback(
            lambda found: self.answer(request, query, found))


class ReadingsResource(_StoreResource):
    def read(self, query: ReadingsQuery):
        return self.web.backends.readings(query.device, query.field, query.since_ns,
                                          query.until_ns)

    def answer(self, request, query: ReadingsQuery, rows):
        device, field = query.device, query.field
        if query.csv:
            return csv_response(request, device, ((t, field, v, u) for t, v, u in rows))
        unit = next((u for _, _, u in reversed(rows) if u), None)
        return json_response(request, 200, {
            "device": device, "field": field, "unit": unit, "symbol": symbol(unit),
            "points": [[t // 1_000_000, v] for t, v, _ in rows]})


class SeriesResource(_StoreResource):
    with_field = False

    def read(self, query: ReadingsQuery):
        return self.web.backends.series(query.device, query.since_ns, query.until_ns)

    def answer(self, request, query: ReadingsQuery, fields):
        device = query.device
        if query.csv:
            rows = sorted((t, name, v, u) for name, points in fields.items()
                          for t, v, u in points)
            return csv_response(request, device, rows)
        units = {name: next((u for _, _, u in reversed(points) if u), None)
                 for name, points in fields.items()}
        units = {name: unit for name, unit in units.items() if unit}
        return json_response(request, 200, {
            "device": device,
            "fields": {name: [[t // 1_000_000, v] for t, v, _ in points]
                       for name, points in fields.items()},
            "units": units, "symbols": {name: symbol(u) for name, u in units.items()}})


class StatsResource(AsyncResource):
    def respond(self, request):
        return self.web.stats().addCallback(lambda stats: json_response(request, 200, stats))


class HealthResource(AsyncResource):
    def respond(self, request):
        def answer(failing):
            if failing:
                return json_response(request, 503, {"status": "failing", "failing": failing})
            return json_response(request, 200, {"status": "ok"})
        return self.web.health().addCallback(answer)
