"""Send one request with aiocoap's client; print "<code> <payload hex>".

Usage: aiocoap_request.py METHOD URL PAYLOAD_HEX|- CONTENT_FORMAT|-
Run as a subprocess by the tests: aiocoap needs an asyncio loop of its own.
"""

import asyncio
import sys

import aiocoap


async def main(method, url, payload_hex, content_format):
    context = await aiocoap.Context.create_client_context()
    try:
        request = aiocoap.Message(code=getattr(aiocoap.Code, method.upper()), uri=url)
        if payload_hex != "-":
            request.payload = bytes.fromhex(payload_hex)
        if content_format != "-":
            request.opt.content_format = int(content_format)
        response = await asyncio.wait_for(context.request(request).response, 20)
        print(f"{response.code.dotted} {response.payload.hex()}")
    finally:
        await context.shutdown()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
