"""CoAP for the gateway: txthings, adapted where it falls short.

This package speaks CoAP and nothing else: it turns datagrams into
requests for resources and sends back what the resources answer. The
pipeline behind the ingest resources knows nothing about UDP.
"""

from sense_gateway.coap import _txthings_log

_txthings_log.install()
