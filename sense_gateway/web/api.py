"""The read-only JSON (and CSV) API over the registry and the embedded store.

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

import orjson
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

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


#: kept for callers of the name it had
parse_since = parse_time


def json_response(request, status: int, body) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return orjson.dumps(body)


class AsyncResource(resource.Resource):
    """A leaf answering GET with the result of ``respond(request)`` (a Deferred)."""

    isLeaf = True

    def __init__(self, web):
        super().__init__()
        self.web = web

    def render_GET(self, request):
        def failed(failure):
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


def _arguments(request) -> dict[str, str]:
    return {k.decode(errors="replace"): v[0].decode(errors="replace")
            for k, v in request.args.items()}


def _window(args, now) -> tuple[int, int | None]:
    """(since, until) in nanoseconds; ValueError naming the argument."""
    bounds = []
    for name, default in (("since", "-1h"), ("until", None)):
        text = args.get(name, default)
        if text is None:
            bounds.append(None)
            continue
        try:
            bounds.append(int(parse_time(text, now) * 1e9))
        except (ValueError, OverflowError):
            raise ValueError(f"{name}: {TIME_HELP}") from None
    return bounds[0], bounds[1]


def wants_csv(request, args) -> bool:
    if args.get("format") == "csv":
        return True
    accept = request.getHeader(b"accept") or b""
    return args.get("format") is None and b"text/csv" in accept


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


class ReadingsResource(AsyncResource):
    def respond(self, request):
        args = _arguments(request)
        if "device" not in args or "field" not in args:
            return json_response(request, 400, {"error": "device and field are required"})
        try:
            since, until = _window(args, self.web.reactor.seconds())
        except ValueError as e:
            return json_response(request, 400, {"error": str(e)})
        device, field = args["device"], args["field"]
        d = self.web.in_thread(self.web.backends.readings, device, field, since, until)

        def answer(rows):
            if wants_csv(request, args):
                return csv_response(request, device, ((t, field, v, u) for t, v, u in rows))
            unit = next((u for _, _, u in reversed(rows) if u), None)
            return json_response(request, 200, {
                "device": device, "field": field, "unit": unit, "symbol": symbol(unit),
                "points": [[t // 1_000_000, v] for t, v, _ in rows]})
        return d.addCallback(answer)


class SeriesResource(AsyncResource):
    def respond(self, request):
        args = _arguments(request)
        if "device" not in args:
            return json_response(request, 400, {"error": "device is required"})
        try:
            since, until = _window(args, self.web.reactor.seconds())
        except ValueError as e:
            return json_response(request, 400, {"error": str(e)})
        device = args["device"]
        d = self.web.in_thread(self.web.backends.series, device, since, until)

        def answer(fields):
            if wants_csv(request, args):
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
        return d.addCallback(answer)
