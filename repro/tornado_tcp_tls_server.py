"""A ProxyTCPServerMixin TCPServer with ssl_options (header_timeout=2): echoes a line (for attack_tornado_tcp_tls.py).

Usage: python repro/tornado_tcp_tls_server.py PORT CERT KEY
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys

from tornado.iostream import StreamClosedError
from tornado.tcpserver import TCPServer

from proxyproto.tornado import ProxyTCPServerMixin


class Echo(ProxyTCPServerMixin, TCPServer):
    async def handle_stream(self, stream, address):
        try:
            line = await stream.read_until(b"\n")
            await stream.write(line)
        except StreamClosedError:
            pass


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(sys.argv[2], sys.argv[3])
    Echo(ssl_options=context, header_timeout=2.0).listen(int(sys.argv[1]), "127.0.0.1")
    await asyncio.Event().wait()


try:
    asyncio.run(main())
except KeyboardInterrupt:
    pass
