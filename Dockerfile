# syntax=docker/dockerfile:1.7
# SENSE Gateway container: `twistd -n sense-gateway`, CoAP on UDP 5683, CoAPS on 5684.
#
#   docker build -t sense-gateway .
#   docker run -d --name sense-gateway --network host -v sense-gateway-data:/var/lib/sense-gateway sense-gateway
#
# --network host keeps the devices' own source addresses (the original SENSE
# text format identifies a device by it) and serves IPv6 without daemon
# settings; with -p 5683:5683/udp instead, see docs/deploy.md on IPv6.
# Configuration: SENSE_* variables (-e SENSE_ROLE=gateway ...), or a TOML
# file mounted over /etc/sense-gateway/sense-gateway.toml. Arguments after
# the image name are twistd sense-gateway options (--role, --coap-port ...).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# The dashboard's chart library (uPlot) from package.json, without the
# browser-test tooling (devDependencies).
FROM node:20-bookworm-slim AS web
WORKDIR /build
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund --loglevel=error

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/sense-gateway
WORKDIR /build
COPY pyproject.toml setup.cfg README.md ./
COPY sense_gateway ./sense_gateway
COPY twisted ./twisted
# twistd cannot write its plugin cache as the unprivileged user: write it now.
RUN /opt/sense-gateway/bin/pip install --quiet . \
 && /opt/sense-gateway/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && /opt/sense-gateway/bin/twistd sense-gateway --help > /dev/null

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 sense-gateway \
 && useradd --system --uid 10001 --gid sense-gateway --home-dir /var/lib/sense-gateway \
      --shell /usr/sbin/nologin sense-gateway \
 && install -d -o sense-gateway -g sense-gateway -m 0750 /var/lib/sense-gateway \
 && install -d -m 0755 /etc/sense-gateway/plugins
COPY --from=build /opt/sense-gateway /opt/sense-gateway
COPY --from=web /build/node_modules /opt/sense-gateway/node_modules
COPY etc/sense-gateway.toml /etc/sense-gateway/sense-gateway.toml
COPY --chmod=0755 <<'PYTHON' /opt/sense-gateway/bin/sense-healthcheck
#!/opt/sense-gateway/bin/python
"""Exit 0 when the gateway in this container answers, 1 when not."""
import os
import socket
import sys
import urllib.error
import urllib.request

try:
    port = os.environ.get("SENSE_WEB_PORT", "8080")
    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    sys.exit(0)
except urllib.error.HTTPError:
    sys.exit(1)  # 503: a part (queue, registry, sink) fails
except OSError:
    pass  # nothing on the web port (web.enabled = false): ask CoAP
# A CoAP ping: an empty confirmable message, answered with a Reset.
ping = bytes([0x40, 0x00, 0x5E, 0x5E])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(5)
    s.sendto(ping, ("127.0.0.1", int(os.environ.get("SENSE_COAP_PORT", "5683"))))
    try:
        answer = s.recv(64)
    except OSError:
        sys.exit(1)
sys.exit(0 if answer[:4] == bytes([0x70, 0x00, 0x5E, 0x5E]) else 1)
PYTHON
ENV PATH=/opt/sense-gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SENSE_CONFIG=/etc/sense-gateway/sense-gateway.toml \
    SENSE_DATA_DIR=/var/lib/sense-gateway \
    SENSE_PLUGINS_DIR=/etc/sense-gateway/plugins \
    SENSE_WEB_NODE_MODULES=/opt/sense-gateway/node_modules \
    SENSE_SECURITY_PLAIN_INGEST=off
USER sense-gateway
WORKDIR /var/lib/sense-gateway
VOLUME ["/var/lib/sense-gateway"]
# CoAP; /healthz and /metrics (every role), the dashboard and API (roles all and processor) on 8080.
EXPOSE 5683/udp 5684/udp 8080/tcp
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 CMD ["sense-healthcheck"]
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "--logfile=-", "sense-gateway"]
CMD []
