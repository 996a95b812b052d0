"""How units are shown: SenML's registered unit names (RFC 8428 section
12.1, the names devices send in ``u``) as the symbols people read.

Stores keep a unit as the device named it (``Cel``); only what is shown
to a person (the dashboard, through ``/api/series`` and
``/api/readings``) uses the symbol. A unit not in the table is shown as
it was sent.
"""

from __future__ import annotations

SYMBOLS = {
    "Cel": "°C", "K": "K", "%RH": "% RH", "%EL": "% EL", "%": "%", "/": "",
    "Ohm": "Ω", "deg": "°", "lat": "° lat", "lon": "° lon", "rad": "rad",
    "m2": "m²", "m3": "m³", "m/s2": "m/s²", "m3/s": "m³/s", "W/m2": "W/m²",
    "cd/m2": "cd/m²", "kg/m3": "kg/m³", "1/s": "/s", "1/min": "/min",
    "beat/min": "bpm", "count": "", "dBW": "dBW", "Bspl": "dB SPL",
}


def symbol(unit: str | None) -> str | None:
    """The symbol of *unit* (``Cel`` -> ``°C``), or *unit* itself."""
    if unit is None:
        return None
    return SYMBOLS.get(unit, unit)
