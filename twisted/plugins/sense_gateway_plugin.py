"""twistd plugin: ``twistd -n sense-gateway``."""

from twisted.application.service import ServiceMaker

senseGateway = ServiceMaker(
    "SENSE Gateway",
    "sense_gateway.tap",
    "CoAP sensor gateway: ingest, durable queue, metrics",
    "sense-gateway",
)
