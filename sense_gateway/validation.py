"""Built-in plugin: the checks every envelope passes before it is queued.

A request that fails one gets 4.00 Bad Request with the first problem as
its diagnostic, phrased for the device's developer, e.g.
``reading 2: field 'temp!': bad name``. Readings are numbered from 1.
Limits come from the ``[validation]`` table (``SENSE_VALIDATION_*``):

- the device id is required: 1 to ``max_device_length`` (64) printable
  ASCII characters, no spaces;
- a sequence number, if any, is an integer from 0 to 2**32 - 1, and so
  is a boot counter;
- 1 to ``max_readings`` (100) readings, each with 1 to ``max_fields``
  (32) fields;
- field, tag and measurement names are 1 to ``max_name_length`` (64)
  characters of ASCII letters, digits and ``_ - . : /``, not starting
  with ``_`` (InfluxDB reserves those) and not ``time`` (InfluxDB's
  timestamp column);
- field values are booleans, integers within signed 64 bits, finite
  floats, or strings of at most ``max_string_length`` (256) characters;
  tag values are non-empty strings of that length; neither may hold
  control characters (line protocol cannot carry a newline);
- a unit (SenML ``u``, SENSE v1 ``units``) names a field of its reading
  and is 1 to ``max_name_length`` characters without control characters;
- timestamps are finite epoch seconds, not before ``min_timestamp``
  (946684800, 2000-01-01) and at most ``max_future`` (300) seconds
  ahead of the gateway's receive time.
"""

from __future__ import annotations

import math
import re
from typing import Any

from sense_gateway.config import Config, ValidationConfig
from sense_gateway.envelope import Envelope, Reading
from sense_gateway.hookspecs import hookimpl

# Compiled once: validation runs for every request on the reactor thread.
_NAME = re.compile(r"[A-Za-z0-9.:/-][A-Za-z0-9_.:/-]*")
_DEVICE = re.compile(r"[!-~]+")  # printable ASCII without the space
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")

_RESERVED_NAMES = frozenset({"time"})
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1
_SEQ_LIMIT = 2 ** 32


def _shown(name: Any) -> str:
    """A name as a diagnostic shows it: quoted, escaped, clipped."""
    text = name if isinstance(name, str) else str(name)
    return repr(text if len(text) <= 20 else text[:20] + "...")


def _name_problem(name: Any, limits: ValidationConfig) -> str | None:
    if not isinstance(name, str):
        return "name is not a string"
    if not name:
        return "empty name"
    if len(name) > limits.max_name_length:
        return f"name longer than {limits.max_name_length}"
    if name in _RESERVED_NAMES:
        return "reserved name"
    if not _NAME.fullmatch(name):
        return "bad name"
    return None


def _text_problem(text: str, limits: ValidationConfig) -> str | None:
    if len(text) > limits.max_string_length:
        return f"string longer than {limits.max_string_length}"
    if _CONTROL_CHARACTER.search(text):
        return "control characters in string"
    return None


def _value_problem(value: Any, limits: ValidationConfig) -> str | None:
    # bool before int: True is an int to Python but a boolean to the store.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if _INT64_MIN <= value <= _INT64_MAX else "integer out of 64-bit range"
    if isinstance(value, float):
        return None if math.isfinite(value) else "not a finite number"
    if isinstance(value, str):
        return _text_problem(value, limits)
    return "not a number, boolean or string"


def device_problem(device: Any, limits: ValidationConfig) -> str | None:
    """Why *device* is not an acceptable device id, or ``None``."""
    if device is None or device == "":
        return "device id missing"
    if not isinstance(device, str):
        return "device id is not a string"
    if len(device) > limits.max_device_length:
        return f"device id longer than {limits.max_device_length}"
    if not _DEVICE.fullmatch(device):
        return "device id: printable ASCII only, no spaces"
    return None


def _seq_problem(seq: Any) -> str | None:
    if seq is None:
        return None
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < _SEQ_LIMIT:
        return f"seq must be an integer from 0 to {_SEQ_LIMIT - 1}"
    return None


def _boot_problem(boot: Any) -> str | None:
    if boot is None:
        return None
    if isinstance(boot, bool) or not isinstance(boot, int) or not 0 <= boot < _SEQ_LIMIT:
        return f"boot must be an integer from 0 to {_SEQ_LIMIT - 1}"
    return None


def _timestamp_problem(ts: Any, limits: ValidationConfig, latest: float) -> str | None:
    if ts is None:
        return None  # the core stamps it with the receive time
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return "timestamp is not a finite number"
    if ts < limits.min_timestamp:
        return f"timestamp {math.floor(ts)} before {limits.min_timestamp:.0f}"
    if ts > latest:
        return f"timestamp more than {limits.max_future:.0f} s in the future"
    return None


def _reading_problems(reading: Reading, where: str, limits: ValidationConfig,
                      latest: float) -> list[str]:
    problems = []
    fields = reading.fields
    if not isinstance(fields, dict) or not fields:
        problems.append(f"{where}: no fields")
    elif len(fields) > limits.max_fields:
        problems.append(f"{where}: more than {limits.max_fields} fields")
    else:
        for name, value in fields.items():
            problem = _name_problem(name, limits) or _value_problem(value, limits)
            if problem:
                problems.append(f"{where}: field {_shown(name)}: {problem}")
    tags = reading.tags
    if not isinstance(tags, dict):
        problems.append(f"{where}: tags are not a mapping")
    else:
        for name, value in tags.items():
            problem = _name_problem(name, limits)
            if problem is None:
                if not isinstance(value, str) or not value:
                    problem = "value must be a non-empty string"
                else:
                    problem = _text_problem(value, limits)
            if problem:
                problems.append(f"{where}: tag {_shown(name)}: {problem}")
    units = reading.units
    if units:
        for name, unit in units.items():
            if not isinstance(fields, dict) or name not in fields:
                problems.append(f"{where}: unit for {_shown(name)}: no such field")
            elif not isinstance(unit, str) or not unit or len(unit) > limits.max_name_length:
                problems.append(f"{where}: unit for {_shown(name)}: must be 1 to "
                                f"{limits.max_name_length} characters")
            elif _CONTROL_CHARACTER.search(unit):
                problems.append(f"{where}: unit for {_shown(name)}: control character")
    problem = _name_problem(reading.measurement, limits)
    if problem:
        problems.append(f"{where}: measurement {_shown(reading.measurement)}: {problem}")
    problem = _timestamp_problem(reading.ts, limits, latest)
    if problem:
        problems.append(f"{where}: {problem}")
    return problems


def envelope_problems(envelope: Envelope, limits: ValidationConfig) -> list[str]:
    """Everything wrong with *envelope*, most basic first; empty if it is fine."""
    problems = []
    for problem in (device_problem(envelope.device, limits), _seq_problem(envelope.seq),
                    _boot_problem(envelope.boot)):
        if problem:
            problems.append(problem)
    readings = envelope.readings
    if not readings:
        problems.append("no readings")
        return problems
    if len(readings) > limits.max_readings:
        # Do not spend time on the contents of a request refused anyway.
        problems.append(f"more than {limits.max_readings} readings")
        return problems
    latest = envelope.received + limits.max_future
    for number, reading in enumerate(readings, 1):
        problems.extend(_reading_problems(reading, f"reading {number}", limits, latest))
    return problems


@hookimpl
def sense_validate(envelope: Envelope, config: Config) -> list[str]:
    return envelope_problems(envelope, config.validation)
