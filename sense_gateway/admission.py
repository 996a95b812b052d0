"""Who may write as which device (docs/security.md).

Over DTLS the PSK identity is the device: a payload that names another
device is refused 4.03. Over plain CoAP, ``security.plain_ingest`` says
what is still allowed: ``open`` (any device), ``uncredentialed`` (only
devices without a credential: a credentialed device cannot be
impersonated, 4.01) or ``off`` (no ingest, 4.01). A device new to the
registry may be created over plain CoAP only within ``registry.max_devices``
and ``registry.new_devices_per_minute`` per source address (4.03 beyond).
Every refusal is counted by reason.
"""

from __future__ import annotations

from collections import Counter

from sense_gateway.errors import Forbidden, Unauthorized, Unavailable


class IngestPolicy:
    def __init__(self, directory, plain_ingest: str):
        self.directory = directory
        self.plain_ingest = plain_ingest
        #: refusals by reason (the same names in /metrics)
        self.refused: Counter[str] = Counter()

    def check_transfer(self, identity) -> None:
        """A block-wise upload starting: refused at its first block when
        plain CoAP may not write at all (its blocks would only take room)."""
        if identity is None and self.plain_ingest == "off":
            self.refused["plain_ingest_off"] += 1
            raise Unauthorized("write over coaps (DTLS) only")

    def check(self, device: str, context) -> None:
        """Raise the error the device gets, or return if it may write."""
        identity = context.identity
        if identity is not None:
            if device != identity:
                self.refused["identity_mismatch"] += 1
                raise Forbidden(f"{identity} may not write as another device")
            return
        mode = self.plain_ingest
        if mode == "off":
            self.refused["plain_ingest_off"] += 1
            raise Unauthorized("write over coaps (DTLS) only")
        directory = self.directory
        if not directory.ready:
            self.refused["starting"] += 1
            raise Unavailable("starting", max_age=2)
        if mode == "uncredentialed" and directory.has_credential(device):
            self.refused["credentialed_on_plain"] += 1
            raise Unauthorized("this device must write over coaps (DTLS)")
        refusal = directory.admit(device, context.source_host)
        if refusal is not None:
            self.refused["device_limit" if refusal.startswith("device limit")
                         else "new_device_rate"] += 1
            raise Forbidden(refusal)
