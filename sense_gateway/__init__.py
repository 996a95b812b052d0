"""SENSE Gateway: CoAP readings in, durably queued, out as metrics."""

__version__ = "0.1.0"
