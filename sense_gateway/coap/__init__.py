"""CoAP for the gateway, in layers (docs/coap.md):

- ``message``: the one parser and encoder of CoAP messages;
- ``layer``: the message layer (types, ids, retransmissions, one ``answer()``);
- ``transport``: where datagrams come from (plain UDP here; DTLS plugs in
  the same way);
- ``dispatch``: readings to the pipeline, anything else to the resource
  tree (``tree``, over txthings' resources), uploads assembled by
  ``blockwise``.

The pipeline behind the dispatcher knows nothing about CoAP or UDP.
"""
