"""A real proxyproto.tornado.ProxyHTTPServer on 127.0.0.1:PORT reporting what the app saw (for repro/attack_tornado.py).

Usage: python repro/tornado_server.py PORT [xheaders] [tls=CERT,KEY] [knob=value ...]
"""

from __future__ import annotations

import asyncio
import logging
import sys

from tornado.web import Application, RequestHandler

from proxyproto.tornado import ProxyHTTPServer, header


class Report(RequestHandler):
    def get(self) -> None:
        found = header(self.request)
        self.finish(
            {
                "client": [self.request.remote_ip, self.request.connection.context.address[1]],
                "header": None if found is None else found.command.name,
                "protocol": self.request.protocol,
            }
        )


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    port = int(sys.argv[1])
    xheaders = "xheaders" in sys.argv[2:]
    knobs = dict(arg.split("=", 1) for arg in sys.argv[2:] if "=" in arg)
    tls = knobs.pop("tls", None)
    extra = {}
    if tls:
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls.split(","))
        extra["ssl_options"] = context
    if "header_timeout" in knobs:
        knobs["header_timeout"] = float(knobs["header_timeout"])  # type: ignore[assignment]
    if "max_pending" in knobs:
        knobs["max_pending"] = int(knobs["max_pending"])  # type: ignore[assignment]
    server = ProxyHTTPServer(Application([(r"/.*", Report)]), xheaders=xheaders, **extra, **knobs)
    server.listen(port, "127.0.0.1")
    await asyncio.Event().wait()


try:
    asyncio.run(main())
except KeyboardInterrupt:  # SIGINT: the harness stopping us
    pass
