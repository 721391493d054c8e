"""docs/configuration.rst's settings table is every adapter's truth: same knobs, same defaults.

The table is parsed with docutils (as a reader's renderer sees it) and compared with what each
adapter really does by default: the one settings value (``proxyproto.settings.Settings``) every
keyword adapter holds and hands its keywords to, the mixins' class attributes, and the
environment's defaults (``settings_from_environment``).  ``trusted`` is loopback only
everywhere, and ``None`` (which used to mean every peer) is refused everywhere.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from doc_examples import DOCS
from support import require_module

import proxyproto
from proxyproto import aio, aio_protocol
from proxyproto.policy import UNIX_RESTRICTED, Policy, TrustedNetworks
from proxyproto.settings import ENVIRONMENT, KNOBS, VARIABLES, Settings, settings_from_environment
from proxyproto.udp import ProxyDatagramMixin, ProxyUDPServer

LOOPBACK = {ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")}
#: What ValueError says for ``None``, in every adapter (the knob named as the adapter spells it).
NONE_REFUSAL = r"trusted=None used to mean every peer; give '\*' for every peer or the networks to trust"
NONE_DEFAULT = r"\(the default, '127\.0\.0\.1,::1', trusts loopback only\)"


@dataclass
class Row:
    knob: str
    attribute: str | None  # the socketserver mixin's name
    variable: str | None  # uvicorn's environment variable
    default: Any
    udp: bool  # "*UDP too.*"


def settings_table() -> dict[str, Row]:
    """The settings table of docs/configuration.rst, one Row per knob, read with docutils."""
    core = require_module("docutils.core")
    from docutils import nodes

    tree = core.publish_doctree((DOCS / "configuration.rst").read_text())  # type: ignore[attr-defined]
    tables = [t for t in tree.findall(nodes.table) if "socketserver attribute" in t.astext()]
    assert len(tables) == 1, "one settings table, in one place"
    rows: dict[str, Row] = {}
    for row in tables[0].findall(nodes.row):
        entries = [entry for entry in row.children if isinstance(entry, nodes.entry)]
        literals = [[lit.astext() for lit in entry.findall(nodes.literal)] for entry in entries]
        if not literals[0]:
            continue  # the heading
        knob, names, default = literals[0][0], literals[1], literals[2][0]
        rows[knob] = Row(
            knob=knob,
            attribute=next((name for name in names if name.startswith("proxy_")), None),
            variable=next((name for name in names if name.startswith("PROXYPROTO_")), None),
            default=eval(default, {"Policy": proxyproto.Policy}),  # the page's own Python literals
            udp="UDP too" in entries[3].astext(),
        )
    return rows


TABLE = settings_table()

#: Every callable that takes the knobs as keywords, and the parameters that are its host's own
#: (not knobs of this library).  Besides those, an adapter has ``settings=`` (one Settings value),
#: ``**`` for the knobs as keywords, and the table's TLS knobs it supports.
KEYWORD_ADAPTERS: dict[str, tuple[Callable[..., Any], set[str]]] = {
    "aio.start_server": (aio.start_server, {"client_connected_cb", "host", "port"}),
    "aio.start_unix_server": (aio.start_unix_server, {"client_connected_cb", "path"}),
    "aio_protocol.wrap_protocol_factory": (aio_protocol.wrap_protocol_factory, {"factory"}),
    "aio_protocol.ProxyProtocolFactory": (aio_protocol.ProxyProtocolFactory, {"factory"}),
}
#: The knobs an adapter lacks, and why.
LACKS = {
    "TLS is negotiated by the host's own settings (config.certfile), moved after the header": ("hypercorn.serve",),
    "TLS is negotiated by Tornado's own ssl_options, moved after the header": (
        "tornado.ProxyHTTPServer",
        "tornado.ProxyTCPServerMixin",
    ),
    "waitress has no TLS": ("waitress.create_server", "waitress.ProxySettings"),
}
#: Where the host's spelling is kept (DESIGN.md: aiohttp's web.TCPSite says ssl_context).
SPELLING = {("aiohttp.ProxyTCPSite", "ssl"): "ssl_context", ("aiohttp.run_app", "ssl"): "ssl_context"}
TLS_KNOBS = {"ssl", "ssl_handshake_timeout", "ssl_before_header"}
#: Adapters whose TLS handshake (after the header) is bounded by header_timeout itself: ``ssl`` only.
SSL_ONLY = ("twisted.ProxyProtocolFactory", "twisted.wrap_endpoint", "sanic.wrap")


def optional_adapters() -> Iterator[tuple[str, Callable[..., Any], set[str]]]:
    """The web adapters, when their servers are installed."""
    try:
        import aiohttp  # noqa: F401  (the host server, not only the adapter module, must be installed)

        from proxyproto.aiohttp import ProxyTCPSite

        yield "aiohttp.ProxyTCPSite", ProxyTCPSite, {"runner", "host", "port", "backlog", "reuse_address", "reuse_port"}
        from proxyproto.aiohttp import run_app

        yield "aiohttp.run_app", run_app, {
            "app", "host", "port", "shutdown_timeout", "keepalive_timeout", "print", "backlog",
            "handle_signals", "reuse_address", "reuse_port", "loop",
        }  # fmt: skip
    except ImportError:
        pass
    try:
        import hypercorn as host  # noqa: F401  (proxyproto.hypercorn imports without it)

        from proxyproto import hypercorn

        yield "hypercorn.serve", hypercorn.serve, {"app", "config", "shutdown_trigger", "mode"}
    except ImportError:
        pass
    try:
        import waitress as host_waitress  # noqa: F401

        from proxyproto import waitress

        yield "waitress.create_server", waitress.create_server, {"application", "trusted_proxy_over_header"}
        yield "waitress.ProxySettings", waitress.ProxySettings, set()
    except ImportError:
        pass
    try:
        import uvicorn  # noqa: F401

        from proxyproto import uvicorn as ppu

        yield "uvicorn.wrap", ppu.wrap, {"http"}
    except ImportError:
        pass
    try:
        import tornado  # noqa: F401

        from proxyproto import tornado as ppt

        own = {"self", "request_callback", "args", "xheaders_over_header"}
        yield "tornado.ProxyHTTPServer", ppt.ProxyHTTPServer.initialize, own
        yield "tornado.ProxyTCPServerMixin", ppt.ProxyTCPServerMixin.__init__, {"self", "args"}
    except ImportError:
        pass
    try:
        import twisted.internet  # noqa: F401  (a bare "twisted" may be this checkout's plugin directory)

        from proxyproto import twisted as pptw

        yield "twisted.ProxyProtocolFactory", pptw.ProxyProtocolFactory.__init__, {"self", "wrappedFactory", "reactor"}
        yield "twisted.wrap_endpoint", pptw.wrap_endpoint, {"endpoint", "reactor"}
    except ImportError:
        pass
    try:
        import sanic  # noqa: F401

        from proxyproto import sanic as pps

        yield "sanic.wrap", pps.wrap, {"protocol_class"}
    except ImportError:
        pass


def keyword_adapters() -> list[tuple[str, Callable[..., Any], set[str]]]:
    return [(name, fn, own) for name, (fn, own) in KEYWORD_ADAPTERS.items()] + list(optional_adapters())


def expected_tls_knobs(adapter: str) -> set[str]:
    knobs = set(TLS_KNOBS)
    if adapter not in ("aio.start_server", "aio.start_unix_server"):
        knobs.discard("ssl_before_header")  # asyncio's own ssl=, which only proxyproto.aio mirrors
    if adapter == "uvicorn.wrap" or any(adapter in lacking for lacking in LACKS.values()):
        knobs.clear()  # uvicorn takes its own --ssl-* settings
    if adapter in SSL_ONLY:
        knobs = {"ssl"}
    return knobs


def test_the_tables_knobs_are_the_settings_value_with_its_defaults() -> None:
    assert set(TABLE) - TLS_KNOBS == set(KNOBS)
    defaults = Settings()
    for knob in KNOBS:
        expected = TABLE[knob].default
        if knob == "trusted":
            expected = TrustedNetworks(expected)
        assert getattr(defaults, knob) == expected, knob
    parameters = inspect.signature(Settings).parameters
    assert list(parameters) == list(KNOBS)  # one signature of the knobs, in the table's order


@pytest.mark.parametrize(("name", "adapter", "own"), keyword_adapters(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_keyword_adapter_takes_the_settings_value_and_the_knobs_and_nothing_else(
    name: str, adapter: Callable[..., Any], own: set[str]
) -> None:
    parameters = inspect.signature(adapter).parameters
    keywords = [p for p in parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    assert len(keywords) == 1, f"{name} takes the knobs as keywords"
    assert parameters["settings"].default is None
    tls = {SPELLING.get((name, knob), knob) for knob in expected_tls_knobs(name)}
    assert tls <= set(parameters), f"{name} lacks {sorted(tls - set(parameters))}"
    for knob in tls:
        assert parameters[knob].default is None, (name, knob)
    unknown = set(parameters) - tls - own - {"settings", keywords[0].name}
    assert not unknown, f"{name} takes {sorted(unknown)}, which docs/configuration.rst's table does not list"


#: Every knob away from its default (what a keyword adapter must hand to its Settings unchanged).
CHANGED = {
    "policy": Policy.USE,
    "trusted": "10.0.0.0/8",
    "untrusted_policy": Policy.REJECT,
    "policy_for": None,
    "header_timeout": 2.5,
    "max_header_size": 8192,
    "verify_checksum": False,
    "allow_v4_in_tcp6": True,
    "max_pending": 17,
    "log_rate": 3.0,
}


def built_settings() -> list[tuple[str, Callable[..., Settings]]]:
    builders: list[tuple[str, Callable[..., Settings]]] = [
        (
            "aio_protocol.wrap_protocol_factory",
            lambda **k: aio_protocol.wrap_protocol_factory(asyncio.Protocol, **k).settings,
        ),
        (
            "aio_protocol.ProxyProtocolFactory",
            lambda **k: aio_protocol.ProxyProtocolFactory(asyncio.Protocol, **k).settings,
        ),
    ]
    for name, fn, _ in optional_adapters():
        if name == "waitress.ProxySettings":
            builders.append((name, lambda fn=fn, **k: fn(**k).settings))
        elif name == "uvicorn.wrap":
            builders.append((name, lambda fn=fn, **k: fn("h11", **k).settings))
        elif name == "tornado.ProxyHTTPServer":
            from proxyproto.tornado import ProxyHTTPServer

            builders.append((name, lambda **k: ProxyHTTPServer(lambda request: None, **k).proxy_settings))
        elif name == "twisted.ProxyProtocolFactory":
            from twisted.internet.protocol import Factory

            from proxyproto.twisted import ProxyProtocolFactory

            builders.append((name, lambda **k: ProxyProtocolFactory(Factory(), **k).settings))
        elif name == "sanic.wrap":
            builders.append((name, lambda fn=fn, **k: fn(**k).proxy_settings))
    return builders


@pytest.mark.parametrize(("name", "build"), built_settings(), ids=[name for name, _ in built_settings()])
def test_an_adapter_holds_exactly_the_knobs_it_was_given(name: str, build: Callable[..., Settings]) -> None:
    assert build(**CHANGED) == Settings(**CHANGED)
    base = Settings(trusted="*", max_pending=5)
    assert build(settings=base, header_timeout=1.0) == base.replace(header_timeout=1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_pendin'"):
        build(max_pendin=5)


def test_the_socketserver_mixin_has_every_attribute_of_the_table_with_its_default() -> None:
    for row in TABLE.values():
        if row.attribute is None:
            continue
        value = getattr(proxyproto.ProxyProtocolMixin, row.attribute)
        if row.knob == "policy_for":
            assert callable(value)  # a method to override; its default applies the three trust knobs
        else:
            assert value == row.default, (row.attribute, value)
    attributes = {name for name in dir(proxyproto.ProxyProtocolMixin) if name.startswith("proxy_")}
    assert attributes == {row.attribute for row in TABLE.values() if row.attribute}


def test_the_datagram_mixin_has_exactly_the_attributes_marked_udp_too_with_their_defaults() -> None:
    attributes = {name for name in dir(ProxyDatagramMixin) if name.startswith("proxy_")}
    assert attributes == {row.attribute for row in TABLE.values() if row.udp}
    for row in TABLE.values():
        if row.udp and row.knob != "policy_for":
            assert getattr(ProxyDatagramMixin, row.attribute) == row.default, row.attribute  # type: ignore[arg-type]


def test_the_environments_variables_and_defaults_are_the_tables() -> None:
    variables = {row.variable: row for row in TABLE.values() if row.variable}
    assert set(ENVIRONMENT) == set(variables)
    assert settings_from_environment({}) == Settings()
    for variable, row in variables.items():
        assert VARIABLES[row.knob] == variable


# -- trust: loopback only, None refused ------------------------------------------------------------


def trusted_defaults() -> list[tuple[str, Any]]:
    # (One knob given: uvicorn.wrap() without any reads the environment, checked below.)
    found: list[tuple[str, Any]] = [(name, build(header_timeout=5.0).trusted) for name, build in built_settings()]
    found.append(("Settings", Settings().trusted))
    found.append(("ProxyProtocolMixin", proxyproto.ProxyProtocolMixin.proxy_trusted))
    found.append(("ProxyDatagramMixin", ProxyDatagramMixin.proxy_trusted))
    found.append(("environment", settings_from_environment({}).trusted))
    try:
        from gunicorn.config import Config

        from proxyproto.gunicorn import settings_from_gunicorn

        found.append(("gunicorn workers", settings_from_gunicorn(Config(), environ={}).trusted))
    except ImportError:
        pass
    return found


@pytest.mark.parametrize(("name", "default"), trusted_defaults(), ids=[name for name, _ in trusted_defaults()])
def test_trusted_is_loopback_only_by_default(name: str, default: Any) -> None:
    networks = default if isinstance(default, TrustedNetworks) else TrustedNetworks(default)
    assert set(networks.networks) == LOOPBACK, name
    assert networks.unix == UNIX_RESTRICTED  # UNIX peers only behind a socket file that is not world-writable
    assert "127.0.0.2" not in networks and "10.0.0.1" not in networks and "::ffff:127.0.0.1" in networks


def refusals() -> list[tuple[str, Callable[[], Any]]]:
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("wrap_protocol_factory", lambda: aio_protocol.wrap_protocol_factory(asyncio.Protocol, trusted=None)),
        (
            "aio.start_server",
            lambda: asyncio.run(aio.start_server(lambda r, w: None, "127.0.0.1", 0, trusted=None)),
        ),
        (
            "aio.start_unix_server",
            lambda: asyncio.run(aio.start_unix_server(lambda r, w: None, None, trusted=None)),
        ),
    ]
    for name, fn, _ in optional_adapters():
        if name == "waitress.create_server":
            cases.append((name, lambda fn=fn: fn(lambda e, s: [], listen="127.0.0.1:0", trusted=None)))
        elif name == "waitress.ProxySettings":
            cases.append((name, lambda fn=fn: fn(trusted=None)))
        elif name == "hypercorn.serve":
            from hypercorn.config import Config

            cases.append((name, lambda fn=fn: asyncio.run(fn(None, Config(), trusted=None))))
        elif name == "aiohttp.ProxyTCPSite":
            cases.append((name, lambda fn=fn: asyncio.run(aiohttp_site(fn))))
        elif name == "aiohttp.run_app":
            cases.append((name, lambda fn=fn: fn(None, host="127.0.0.1", port=0, print=None, trusted=None)))
    newer = ("tornado.", "twisted.", "sanic.")  # built with the knobs alone, like their settings above
    for name, build in built_settings():
        if name.startswith(newer):
            cases.append((name, lambda build=build: build(trusted=None)))
    try:
        from proxyproto import uvicorn as ppu

        cases.append(("uvicorn.wrap", lambda: ppu.wrap("h11", trusted=None)))
    except ImportError:
        pass
    return cases


async def aiohttp_site(site_class: Any) -> None:
    from aiohttp import web

    runner = web.AppRunner(web.Application())
    await runner.setup()
    try:
        site_class(runner, "127.0.0.1", 0, trusted=None)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("name", "build"), refusals(), ids=[name for name, _ in refusals()])
def test_trusted_none_is_refused_naming_both_meanings(name: str, build: Callable[[], Any]) -> None:
    with pytest.raises(ValueError, match=rf"^{NONE_REFUSAL} {NONE_DEFAULT}$"):
        build()


@pytest.mark.parametrize("server_class", [proxyproto.ThreadingProxyTCPServer, ProxyUDPServer])
def test_mixins_refuse_proxy_trusted_none_set_on_the_instance(server_class: Any) -> None:
    server = server_class(("127.0.0.1", 0), socketserver.BaseRequestHandler)
    try:
        with pytest.raises(ValueError, match=rf"^proxy_{NONE_REFUSAL}"):
            server.proxy_trusted = None
        assert server.proxy_trusted == "127.0.0.1,::1"
    finally:
        server.server_close()


@pytest.mark.parametrize("server_class", [proxyproto.ThreadingProxyTCPServer, ProxyUDPServer])
def test_mixins_refuse_proxy_trusted_none_on_the_class_at_construction(server_class: Any) -> None:
    subclass = type("Server", (server_class,), {"proxy_trusted": None})
    with pytest.raises(ValueError, match=rf"^proxy_{NONE_REFUSAL}"):
        subclass(("127.0.0.1", 0), socketserver.BaseRequestHandler)


def test_mixin_given_proxy_trusted_none_on_the_class_while_serving_closes_connections_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    served: list[Any] = []

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            served.append(self.client_address)

    server_class = type("Server", (proxyproto.ThreadingProxyTCPServer,), {})
    server = server_class(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        server_class.proxy_trusted = None  # behind __setattr__'s back
        header = proxyproto.encode_v1(("192.0.2.10", 51234), ("198.51.100.20", 443))
        with socket.create_connection(server.server_address, timeout=10) as sock:
            sock.sendall(header)
            try:
                closed = sock.recv(1) == b""
            except ConnectionResetError:  # closed with the header unread: a reset
                closed = True
            assert closed
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert served == []
    errors = [r.getMessage() for r in caplog.records if r.name == "proxyproto" and r.levelno == logging.ERROR]
    assert any("proxy_trusted=None used to mean every peer" in line for line in errors), caplog.text


# -- the default, on real connections --------------------------------------------------------------


HEADER = proxyproto.encode_v1(("192.0.2.10", 51234), ("198.51.100.20", 443))


def client_from(source: str, port: int, data: bytes) -> bytes:
    """Connect from ``source`` (a loopback address), send ``data``, half-close, read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        return answer


def test_socketserver_default_trusts_127_0_0_1_and_serves_127_0_0_2_untouched() -> None:
    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data = b""
            while chunk := self.request.recv(4096):
                data += chunk
            self.request.sendall(f"{self.client_address[0]} ".encode() + data)

    server = proxyproto.ThreadingProxyTCPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert client_from("127.0.0.1", port, HEADER + b"x") == b"192.0.2.10 x"
        assert client_from("127.0.0.2", port, HEADER + b"x") == b"127.0.0.2 " + HEADER + b"x"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_aio_start_server_default_trusts_127_0_0_1_and_serves_127_0_0_2_untouched() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{writer.get_extra_info('peername')[0]} ".encode() + await reader.read())
        await writer.drain()
        writer.close()

    async def main() -> tuple[bytes, bytes]:
        server = await aio.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            trusted = await asyncio.to_thread(client_from, "127.0.0.1", port, HEADER + b"x")
            stranger = await asyncio.to_thread(client_from, "127.0.0.2", port, HEADER + b"x")
        return trusted, stranger

    trusted, stranger = asyncio.run(asyncio.wait_for(main(), 20))
    assert trusted == b"192.0.2.10 x"
    assert stranger == b"127.0.0.2 " + HEADER + b"x"
