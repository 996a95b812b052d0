"""Send one request with aiocoap's client; print "<code> <payload hex> <content format|->".

Usage: aiocoap_request.py METHOD URL PAYLOAD_HEX|- CONTENT_FORMAT|- [ACCEPT|-]
Run as a subprocess by the tests: aiocoap needs an asyncio loop of its own.
"""

import asyncio
import sys

import aiocoap


async def main(method, url, payload_hex, content_format, accept="-"):
    context = await aiocoap.Context.create_client_context()
    try:
        request = aiocoap.Message(code=getattr(aiocoap.Code, method.upper()), uri=url)
        if payload_hex != "-":
            request.payload = bytes.fromhex(payload_hex)
        if content_format != "-":
            request.opt.content_format = int(content_format)
        if accept != "-":
            request.opt.accept = int(accept)
        response = await asyncio.wait_for(context.request(request).response, 20)
        response_format = response.opt.content_format
        print(f"{response.code.dotted} {response.payload.hex() or '-'} "
              f"{'-' if response_format is None else int(response_format)}")
    finally:
        await context.shutdown()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
