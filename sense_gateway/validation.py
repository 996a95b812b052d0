"""Built-in plugin: the checks every envelope passes before it is queued.

A request that fails one gets 4.00 Bad Request with the problem as its
diagnostic, e.g. ``reading 2: field 'temp!': bad name``. Limits come from
the ``[validation]`` table:

- the device id is required, at most ``max_device_length`` characters, no
  spaces or control characters;
- a sequence number, if any, is an unsigned 32-bit integer;
- 1 to ``max_readings`` readings, each with 1 to ``max_fields`` fields;
- field, tag and measurement names are 1 to ``max_name_length``
  characters of letters, digits and ``_ - . : /``, not starting with
  ``_`` (reserved by InfluxDB);
- values are finite numbers (integers within 64 bits), booleans, or
  strings of at most ``max_string_length`` characters; tags are strings;
- timestamps are after ``min_timestamp`` and at most ``max_future``
  seconds ahead of the gateway's clock.
"""

from __future__ import annotations

import math
import re

from sense_gateway.hookspecs import hookimpl

_NAME = re.compile(r"[A-Za-z0-9.:/-][A-Za-z0-9_.:/-]*\Z")
_DEVICE = re.compile(r"[\x21-\x7e]+\Z")
_INT64 = range(-(2 ** 63), 2 ** 63)
_UINT32 = range(0, 2 ** 32)


def _name_problem(name, limits) -> str | None:
    if not isinstance(name, str) or not name:
        return "empty name"
    if len(name) > limits.max_name_length:
        return "name too long"
    if not _NAME.match(name):
        return "bad name"
    return None


def _value_problem(value, limits) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if value in _INT64 else "integer out of 64-bit range"
    if isinstance(value, float):
        return None if math.isfinite(value) else "not a finite number"
    if isinstance(value, str):
        return None if len(value) <= limits.max_string_length else "string too long"
    return "not a number, boolean or string"


def problems(envelope, limits) -> list[str]:
    """Everything wrong with *envelope*, most basic first."""
    found = []
    device = envelope.device
    if not device:
        return ["device id missing"]
    if len(device) > limits.max_device_length:
        found.append(f"device id longer than {limits.max_device_length}")
    elif not _DEVICE.match(device):
        found.append("device id has spaces or control characters")
    if envelope.seq is not None and envelope.seq not in _UINT32:
        found.append("seq must be 0 to 4294967295")
    readings = envelope.readings
    if not readings:
        found.append("no readings")
    elif len(readings) > limits.max_readings:
        found.append(f"more than {limits.max_readings} readings")
        return found
    latest = envelope.received + limits.max_future
    for i, reading in enumerate(readings, 1):
        where = f"reading {i}" if len(readings) > 1 else "reading"
        fields = reading.fields
        if not fields:
            found.append(f"{where}: no fields")
        elif len(fields) > limits.max_fields:
            found.append(f"{where}: more than {limits.max_fields} fields")
        for name, value in fields.items():
            problem = _name_problem(name, limits) or _value_problem(value, limits)
            if problem:
                found.append(f"{where}: field {str(name)[:20]!r}: {problem}")
        for name, value in reading.tags.items():
            problem = _name_problem(name, limits) or (
                None if isinstance(value, str) and len(value) <= limits.max_string_length
                else "bad tag value")
            if problem:
                found.append(f"{where}: tag {str(name)[:20]!r}: {problem}")
        problem = _name_problem(reading.measurement, limits)
        if problem:
            found.append(f"{where}: measurement: {problem}")
        if reading.ts is not None:
            if reading.ts < limits.min_timestamp:
                found.append(f"{where}: timestamp before {limits.min_timestamp:.0f}")
            elif reading.ts > latest:
                found.append(f"{where}: timestamp in the future")
    return found


@hookimpl
def sense_validate(envelope, config):
    return problems(envelope, config.validation)
