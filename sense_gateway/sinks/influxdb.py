"""Built-in plugin: the ``influxdb`` metric sink.

Writes points as InfluxDB line protocol, with influxdb-client, to any
server speaking the InfluxDB 2 write API (``/api/v2/write``: InfluxDB 2.x
and 3.x, 1.8+ in compatibility mode, VictoriaMetrics), or with
``api = "v1"`` to the ``/write?db=`` endpoint of InfluxDB 1.x.

Configuration (``[influxdb]``; enable with ``sinks.enabled = ["sqlite", "influxdb"]``)::

    url = "http://127.0.0.1:8086"
    api = "v2"            # or "v1"
    token = ""            # v2: API token
    org = ""              # v2
    bucket = "sense"      # v2
    database = "sense"    # v1
    username = ""         # v1, optional
    password = ""         # v1, optional
    precision = "ns"      # or "ms", "s"
    timeout = 10.0        # seconds per request
    retries = 3           # quick retries on 5xx, 429 and connection errors

Schema: measurement ``sense`` (or the reading's own), tag ``device`` plus
the reading's tags, one field per value (numbers as floats), the unit of
a field, when the device named one, as the string field ``<field>_unit``
beside it (``temperature_unit="Cel"``: a field, not a tag, so a unit
never splits a series and each field has its own), and the
measurement ``sense_device`` with the per-device counters (received,
duplicates, lost, resets, unsequenced). A server that is down or
overloaded gets ``retries`` quick retries, then the batch goes back to
the queue. A server that refuses a batch (4xx other than 429) gets no
retry. When its message names the lines at fault, the points they came
from are reported (``SinkError.refused``), and the processor sends only
their messages to the dead letters, with the server's message, and
writes the rest again at once. Two forms are recognised, as InfluxDB 1.x
and 2.x word them:

- ``unable to parse '<line>': <why>``, the line quoted;
- ``field type conflict: input field "t" on measurement "sense" is type
  string, already exists as type float``: the points of that measurement
  whose field ``t`` is of the type named.

VictoriaMetrics never refuses a line: it skips one it cannot parse and
logs it, and answers 204 for the rest.
"""

from __future__ import annotations

import json
import math
import re
import time
from urllib.parse import urlencode

import urllib3
from influxdb_client import InfluxDBClient, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException

from sense_gateway.hookspecs import hookimpl
from sense_gateway.liveness import DeviceState
from sense_gateway.sinks import DEVICE_MEASUREMENT, MetricPoint, MetricSink, SinkError

_PRECISION = {"ns": (WritePrecision.NS, 1), "ms": (WritePrecision.MS, 1_000_000),
              "s": (WritePrecision.S, 1_000_000_000)}


_ESCAPE_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t",
                                     "\r": r"\r"})
_ESCAPE_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t",
                             "\r": r"\r"})
_ESCAPE_STRING = str.maketrans({'"': r'\"', "\\": r"\\"})
_isfinite = math.isfinite


def _measurement(name: str) -> str:
    return name.translate(_ESCAPE_MEASUREMENT)


def _tags(tags: dict[str, str]) -> str:
    out = ""
    for key in sorted(tags):
        value = tags[key]
        if value is None:
            continue
        key = str(key).translate(_ESCAPE_KEY)
        value = str(value).translate(_ESCAPE_KEY)
        if value.endswith("\\"):
            value += " "
        if key and value:
            out += f",{key}={value}"
    return out


#: line heads (measurement and device tag) an InfluxSink keeps escaped
HEADS_CACHED = 20_000

#: a point's field names in its own order (or its one field's name) ->
#: ((name, "escaped name="), ...) in line order (sorted): points of one
#: kind share one layout
_LAYOUTS: dict = {}


def _layout(fields: dict) -> tuple:
    names = tuple(fields) if len(fields) != 1 else next(iter(fields))
    layout = _LAYOUTS.get(names)
    if layout is None:
        layout = tuple((key, f"{str(key).translate(_ESCAPE_KEY)}=") for key in sorted(fields))
        if len(_LAYOUTS) < 10_000:
            _LAYOUTS[names] = layout
    return layout


def _fields(fields: dict) -> str:
    parts = []
    append = parts.append
    layout = None
    if len(fields) == 1:
        # Most points are a reading of one field.
        for key in fields:
            layout = _LAYOUTS.get(key)
    for key, name in layout or _layout(fields):
        value = fields[key]
        kind = type(value)
        if kind is float:
            if value - value == 0.0:  # finite: inf - inf and nan are nan
                append(name + _float(value))
        elif kind is int:
            append(f"{name}{value}i")
        elif kind is str:
            append(f'{name}"{value.translate(_ESCAPE_STRING)}"')
        elif kind is bool:
            append(name + ("true" if value else "false"))
        elif value is not None:
            raise ValueError(f'Type: "{kind}" of field: "{key}" is not supported.')
    return ",".join(parts)


def _float(value: float) -> str:
    text = repr(value)
    return text[:-2] if text[-2:] == ".0" else text


#: the liveness states: nothing in them to escape
_STATES = frozenset(state.value for state in DeviceState)


def _device_fields(fields: dict) -> str | None:
    """The fields of a ``sense_device`` point as :func:`_fields` writes
    them, in one format instead of eight type checks (one such line per
    device per batch); None for any other layout or type, which
    :func:`_fields` then writes."""
    count = len(fields)
    if count != 7 and count != 8:
        return None
    try:
        duplicates, lost, received = fields["duplicates"], fields["lost"], fields["received"]
        resets, unsequenced = fields["resets"], fields["unsequenced"]
        state, silent = fields["state"], fields["silent"]
        interval = fields["interval"] if count == 8 else None
    except KeyError:
        return None
    if not (type(duplicates) is type(lost) is type(received) is type(resets)
            is type(unsequenced) is int and type(state) is str
            and type(silent) is float and silent - silent == 0.0):
        return None
    if interval is None:
        between = ""
    elif type(interval) is float and interval - interval == 0.0:
        between = f"interval={_float(interval)},"
    else:
        return None
    return (f"duplicates={duplicates}i,{between}lost={lost}i,received={received}i,"
            f"resets={resets}i,silent={_float(silent)},"
            f'state="{state if state in _STATES else state.translate(_ESCAPE_STRING)}",'
            f"unsequenced={unsequenced}i")


_CONFLICT = re.compile(r'field type conflict: input field "((?:[^"\\]|\\.)*)" on measurement '
                       r'"((?:[^"\\]|\\.)*)" is type (\w+)')
_TYPES = {"float": float, "integer": int, "string": str, "boolean": bool}


def _server_message(body: str) -> str:
    """The error text of a response body (JSON ``error`` or ``message``)."""
    try:
        document = json.loads(body)
    except ValueError:
        return body
    if isinstance(document, dict):
        text = document.get("error") or document.get("message")
        if isinstance(text, str):
            return text
    return body


def _retryable(status: int | None) -> bool:
    # 401/403/404 are the server's set-up (token, bucket), not the data's fault.
    return status is None or status in (401, 403, 404, 429) or status >= 500


class InfluxSink(MetricSink):
    name = "influxdb"

    def __init__(self, settings, sleep=time.sleep):
        self.settings = settings
        self.sleep = sleep
        self.precision, self.divisor = _PRECISION[settings.precision]
        #: (measurement, device) -> its line's escaped head
        self._heads: dict[tuple[str, str], str] = {}
        timeout_ms = int(settings.timeout * 1000)
        if settings.api == "v2":
            self.client = InfluxDBClient(url=settings.url, token=settings.token or "unused",
                                         org=settings.org or "-", timeout=timeout_ms)
            self.write_api = self.client.write_api(write_options=SYNCHRONOUS)
        else:
            self.http = urllib3.PoolManager(
                timeout=urllib3.Timeout(total=settings.timeout), retries=False)
            query = {"db": settings.database, "precision": settings.precision}
            if settings.username:
                query.update(u=settings.username, p=settings.password)
            self.write_url = f"{settings.url.rstrip('/')}/write?{urlencode(query)}"

    def lines(self, points: list[MetricPoint]) -> list[str]:
        """Line protocol, the same text influxdb-client's ``Point`` makes
        (sorted tags and fields, floats without a trailing ``.0``,
        non-finite floats and empty tags left out), at a fraction of its
        cost: a batch of thousands of points is encoded per request.
        Measurement and tag texts repeat from point to point and batch to
        batch: each device's is escaped once (up to ``HEADS_CACHED``)."""
        divisor = self.divisor
        heads = self._heads
        out = []
        append = out.append
        layouts = _LAYOUTS
        for point in points:
            units = point.units
            fields = None
            values = point.fields
            if not units:
                if len(values) == 1:
                    # Most points: a reading of one finite float field
                    # whose name is escaped already.
                    for name, value in values.items():
                        layout = layouts.get(name)
                        if (layout is not None and type(value) is float
                                and value - value == 0.0):
                            fields = layout[0][1] + _float(value)
                elif point.measurement == DEVICE_MEASUREMENT:
                    fields = _device_fields(values)
            if fields is None:
                fields = _fields(point.fields if not units else
                                 {**point.fields, **{f"{name}_unit": unit
                                                     for name, unit in units.items()
                                                     if name in point.fields}})
            if not fields:
                continue
            tags = point.tags
            # Nearly every point is tagged with its device only.
            key = (point.measurement, tags.get("device")) if len(tags) == 1 else None
            head = heads.get(key) if key is not None else None
            if head is None:
                head = f"{_measurement(point.measurement)}{_tags(tags)} "
                if key is not None and key[1] is not None and len(heads) < HEADS_CACHED:
                    heads[key] = head
            append(f"{head}{fields} {point.time_ns // divisor}")
        return out

    def write(self, points: list[MetricPoint]) -> None:
        if not points:
            return
        body = "\n".join(self.lines(points)).encode("utf-8")
        for attempt in range(self.settings.retries + 1):
            status, text = self._send(body)
            if status is not None and status < 300:
                return
            if status is None:
                reason = f"cannot reach {self.settings.url}: {text}"
            else:
                text = _server_message(text)
                reason = f"HTTP {status}: {text[:300]}"
            if not _retryable(status):
                raise SinkError(f"influxdb: {reason}", retryable=False,
                                refused=self.refused_points(text, points))
            if attempt == self.settings.retries:
                raise SinkError(f"influxdb: {reason}")
            self.sleep(min(0.25 * 2 ** attempt, 4.0))

    def refused_points(self, message: str, points: list[MetricPoint]) -> frozenset[int]:
        """Indices of the *points* the server's *message* names as refused."""
        conflicts = [(field.replace('\\"', '"'), measurement.replace('\\"', '"'), _TYPES.get(kind))
                     for field, measurement, kind in _CONFLICT.findall(message)]
        quoted = "unable to parse '" in message
        refused = set()
        for i, point in enumerate(points):
            for field, measurement, kind in conflicts:
                if (point.measurement == measurement and field in point.fields
                        and type(point.fields[field]) is kind):
                    refused.add(i)
            if quoted and i not in refused:
                line = self.lines([point])
                if line and f"unable to parse '{line[0]}'" in message:
                    refused.add(i)
        return frozenset(refused)

    def _send(self, body: bytes) -> tuple[int | None, str]:
        """(HTTP status or None if the server was not reached, its answer)."""
        try:
            if self.settings.api == "v2":
                self.write_api.write(bucket=self.settings.bucket, org=self.settings.org or "-",
                                     record=body, write_precision=self.precision)
                return 204, ""
            response = self.http.request("POST", self.write_url, body=body,
                                         headers={"Content-Type": "text/plain; charset=utf-8"})
            return response.status, response.data[:64_000].decode("utf-8", "replace")
        except ApiException as e:
            body = e.body or ""
            if isinstance(body, bytes):
                body = body.decode("utf-8", "replace")
            return e.status, body[:64_000]
        except (urllib3.exceptions.HTTPError, OSError) as e:
            return None, type(e).__name__

    def check(self) -> None:
        try:
            urllib3.PoolManager(retries=False).request(
                "GET", f"{self.settings.url.rstrip('/')}/ping", timeout=self.settings.timeout)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise SinkError(f"cannot reach {self.settings.url}: {type(e).__name__}") from None

    def close(self) -> None:
        if self.settings.api == "v2":
            self.client.close()
        else:
            self.http.clear()


@hookimpl
def sense_register_sinks():
    return {"influxdb": lambda config: InfluxSink(config.influxdb)}
