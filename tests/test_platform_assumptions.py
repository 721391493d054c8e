"""What proxyproto relies on in the stdlib and the servers beyond their documented API holds.

One test per assumption listed in docs/platforms.rst ("What proxyproto relies on"): the
attribute exists and behaves as the code assumes.  When one fails after an upgrade, the
page says what uses it and what happens without it; nothing here may be skipped silently
for an installed package.
"""

from __future__ import annotations

import asyncio
import inspect
import select
import selectors
import socket
import socketserver
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from support import require_module

ROOT = Path(__file__).resolve().parent.parent


# -- the standard library -------------------------------------------------------------------------


def test_socket_accept_is_the_private_accept_plus_a_socket_object() -> None:
    """server.py: ``socket.socket._accept()`` returns ``(fd, address)`` without making a socket
    object (or, for an SSLSocket listener, without a handshake); without it, the public
    ``socket.socket.accept`` is used (one object more per connection)."""
    import ssl

    from proxyproto import server

    assert server._ACCEPT is socket.socket._accept  # type: ignore[attr-defined]
    with socket.create_server(("127.0.0.1", 0)) as plain:
        listener = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).wrap_socket(plain, server_side=True)
        client = socket.create_connection(listener.getsockname())
        try:
            fd, peer = socket.socket._accept(listener)  # type: ignore[attr-defined]
            assert isinstance(fd, int) and peer == client.getsockname()
            accepted = socket.socket(fileno=fd)
            client.sendall(b"not a ClientHello")
            assert accepted.recv(100) == b"not a ClientHello"  # no handshake ran
            accepted.close()
        finally:
            client.close()
            listener.detach()


def test_public_accept_fallback_gives_the_same_pair() -> None:
    from proxyproto import server

    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        try:
            fd, peer = server._public_accept(listener)
            assert isinstance(fd, int) and peer == client.getsockname()
            socket.socket(fileno=fd).close()
        finally:
            client.close()


def test_socketserver_is_shut_down_event_is_what_shutdown_waits_for() -> None:
    """server.py, udp.py: when the configuration check fails before ``serve_forever``'s loop
    starts, the mixins set ``_BaseServer__is_shut_down`` so that ``shutdown()`` returns."""
    server = socketserver.TCPServer(("127.0.0.1", 0), socketserver.BaseRequestHandler)
    try:
        event = server._BaseServer__is_shut_down  # type: ignore[attr-defined]
        assert isinstance(event, threading.Event)
        event.set()  # what the mixin does after a refused start
        done = threading.Thread(target=server.shutdown)
        done.start()
        done.join(5)
        assert not done.is_alive(), "shutdown() did not return once the event was set"
    finally:
        server.server_close()


@pytest.mark.skipif(not hasattr(select, "epoll"), reason="epoll is Linux's")
def test_epoll_selector_keeps_its_epoll_object_as_selector() -> None:
    """waiting.py: an ambiguous prefix is watched edge-triggered through the EpollSelector's
    ``_selector``; without it, the socket is re-examined after a short delay (slower, same result)."""
    with selectors.EpollSelector() as selector:
        assert isinstance(selector._selector, select.epoll)  # type: ignore[attr-defined]
        assert selector._selector.fileno() == selector.fileno()  # type: ignore[attr-defined]


def test_stream_reader_buffer_eof_and_wait_for_data_behave_as_read_header_assumes() -> None:
    """aio.py: ``read_header`` looks at the StreamReader's ``_buffer`` (the unread bytes) without
    consuming them, waits with ``_wait_for_data`` and stops at ``_eof``."""
    from proxyproto import aio

    async def scenario() -> None:
        reader = asyncio.StreamReader()
        aio._require_stream_internals(reader)
        reader.feed_data(b"PROXY ")
        assert bytes(reader._buffer) == b"PROXY "  # type: ignore[attr-defined]
        assert reader._eof is False  # type: ignore[attr-defined]
        waiting = asyncio.ensure_future(reader._wait_for_data("read_header"))  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        assert not waiting.done()
        reader.feed_data(b"TCP4")
        await asyncio.wait_for(waiting, 5)
        reader.feed_eof()
        assert reader._eof is True  # type: ignore[attr-defined]
        assert await reader.read() == b"PROXY TCP4"  # nothing was consumed by looking

    asyncio.run(scenario())


def test_stream_reader_without_its_internals_is_refused_at_start() -> None:
    from proxyproto import aio

    class Other:
        pass

    with pytest.raises(RuntimeError, match="_buffer"):
        aio._require_stream_internals(Other())


def test_frames_show_the_callers_locals() -> None:
    """uvicorn.py: ``inspect.currentframe()`` and ``f_back.f_locals`` (CPython and PyPy)."""

    def callee() -> Any:
        frame = inspect.currentframe()
        assert frame is not None and frame.f_back is not None
        return frame.f_back.f_locals.get("marker")

    marker = object()
    assert callee() is marker


# -- uvicorn ------------------------------------------------------------------------------------


def test_uvicorn_config_load_asks_the_http_class_for_alpn_before_it_builds_the_context() -> None:
    """proxyproto.uvicorn: ``Config.load`` reads ``alpn_protocols`` from the ``--http`` class in
    its own frame (the config a local of it, its ``http_protocol_class`` set), before it sets
    ``ssl``; and ``is_ssl`` says whether it will.  Without this, a config with TLS is refused at
    its first connection (tests/web/test_uvicorn.py)."""
    import ssl

    uvicorn = require_module("uvicorn")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    seen: list[tuple[bool, bool, bool, bool]] = []

    class Probe(type):
        @property
        def alpn_protocols(cls) -> None:
            frame = inspect.currentframe()
            assert frame is not None and frame.f_back is not None
            caller = frame.f_back
            config = next(v for v in caller.f_locals.values() if isinstance(v, uvicorn.Config))
            seen.append(
                (
                    caller.f_code is uvicorn.Config.load.__code__,
                    vars(config).get("http_protocol_class") is cls,
                    "ssl" not in vars(config),
                    config.is_ssl,
                )
            )
            return None

    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HTTP(H11Protocol, metaclass=Probe):  # type: ignore[misc]
        pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    config = uvicorn.Config(app, http=HTTP, ssl_context_factory=lambda config, default: context)
    config.load()
    assert seen == [(True, True, True, True)]
    assert config.ssl is context and uvicorn.Config(app).is_ssl is False


def test_uvicorn_protocols_keep_config_server_state_and_app() -> None:
    """proxyproto.uvicorn: the protocols keep ``server_state`` (whose ``connections`` set lists
    waiting connections for shutdown) and ``app`` (replaced for trusted peers when uvicorn's
    X-Forwarded-For middleware must not act); ``config.loaded_app`` is that middleware, whose
    ``app`` is the application; uvicorn reads ``config.http_protocol_class`` per connection."""
    uvicorn = require_module("uvicorn")
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.server import ServerState

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    config = uvicorn.Config(app, lifespan="off")
    config.load()
    assert isinstance(config.loaded_app, ProxyHeadersMiddleware) and config.loaded_app.app is app
    state = ServerState()
    assert isinstance(state.connections, set)
    loop = asyncio.new_event_loop()
    try:
        protocol = H11Protocol(config=config, server_state=state, app_state={}, _loop=loop)
        assert protocol.server_state is state and protocol.app is config.loaded_app
    finally:
        loop.close()
    startup = inspect.getsource(uvicorn.Server.startup)
    assert "config.http_protocol_class(" in startup and "ssl=config.ssl" in startup


class _Transport(asyncio.Transport):
    """The least of a transport uvicorn's HTTP protocols use to serve one request."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.mark.parametrize("impl", ["h11", "httptools"])
def test_uvicorn_receive_is_a_bound_method_of_a_cycle_that_keeps_the_transport(impl: str) -> None:
    """proxyproto.uvicorn: the application given to trusted peers finds the connection's header
    through ``receive.__self__.transport`` (the request cycle's); its HTTP protocols take their
    WebSocket class from ``config.ws_protocol_class``, and the WebSocket protocols keep ``app``."""
    uvicorn = require_module("uvicorn")
    require_module(impl)
    from uvicorn.config import HTTP_PROTOCOLS, WS_PROTOCOLS
    from uvicorn.importer import import_from_string
    from uvicorn.server import ServerState

    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["transport"] = receive.__self__.transport
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def scenario() -> None:
        config = uvicorn.Config(app, lifespan="off", ws="wsproto" if "wsproto" in WS_PROTOCOLS else "auto")
        config.load()
        protocol = import_from_string(HTTP_PROTOCOLS[impl])(config=config, server_state=ServerState(), app_state={})
        assert protocol.ws_protocol_class is config.ws_protocol_class
        transport = _Transport()
        protocol.connection_made(transport)
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(100):
            if "transport" in seen:
                break
            await asyncio.sleep(0.01)
        assert seen["transport"] is transport
        if config.ws_protocol_class is not None:
            ws = config.ws_protocol_class(config=config, server_state=ServerState(), app_state={})
            assert ws.app is config.loaded_app

    asyncio.run(scenario())


def test_uvicorn_command_line_reports_a_click_exception_from_config_load_in_one_line() -> None:
    """proxyproto.uvicorn: its start-up refusal is click's ``ClickException``; uvicorn's ``main``
    is a click command that lets exceptions of ``Config.load`` reach click (tested end to end
    in tests/web/test_uvicorn.py)."""
    require_module("uvicorn")
    import click
    from uvicorn.main import main

    from proxyproto.uvicorn import _StartupError

    assert isinstance(main, click.Command)
    error = _StartupError("proxyproto.uvicorn: PROXYPROTO_POLICY='x': not a policy")
    assert isinstance(error, click.ClickException) and isinstance(error, ValueError) and error.exit_code == 3


# -- hypercorn ----------------------------------------------------------------------------------


def test_hypercorn_serve_calls_worker_serve_which_calls_asyncio_start_server() -> None:
    """proxyproto.hypercorn: ``serve`` calls the module global ``worker_serve``, which makes each
    TCP listener with ``asyncio.start_server(..., sock=..., ssl=...)`` through its module global
    ``asyncio``.  Without it, ``proxyproto.hypercorn.serve`` raises RuntimeError before binding."""
    require_module("hypercorn")
    from hypercorn.asyncio import serve
    from hypercorn.asyncio.run import worker_serve

    from proxyproto.hypercorn import _serve_with_own_start_server

    assert serve.__globals__["worker_serve"] is worker_serve
    assert worker_serve.__globals__["asyncio"] is asyncio
    source = inspect.getsource(worker_serve)
    assert "asyncio.start_server(" in source and "sock=sock" in source and "ssl=ssl_context" in source
    _serve_with_own_start_server(serve)  # does not raise


def test_hypercorn_worker_serve_makes_each_connections_tcp_server_from_its_global() -> None:
    """proxyproto.hypercorn: ``worker_serve`` makes ``TCPServer(app, ..., writer)`` per connection
    through its module global ``TCPServer``; its copy gives trusted peers' connections an ``app``
    that puts the header in the scope.  Without it, ``serve`` raises RuntimeError before binding."""
    require_module("hypercorn")
    from hypercorn.asyncio.run import worker_serve
    from hypercorn.asyncio.tcp_server import TCPServer

    from proxyproto.hypercorn import _names_in

    assert worker_serve.__globals__["TCPServer"] is TCPServer
    assert "TCPServer" in _names_in(worker_serve.__code__)
    parameters = list(inspect.signature(TCPServer).parameters)
    assert parameters[0] == "app" and parameters[-1] == "writer"


def test_hypercorn_adapter_refuses_a_worker_serve_without_its_tcp_server() -> None:
    from proxyproto.hypercorn import _serve_with_own_start_server

    # A serve and worker_serve as hypercorn's, module globals included, whose connections are
    # served by something else than a TCPServer.
    module: dict[str, Any] = {"asyncio": asyncio}
    exec(
        "async def worker_serve(app, config):\n"
        "    await asyncio.start_server(lambda reader, writer: app(reader, writer), sock=None)\n"
        "async def serve(app, config):\n"
        "    await worker_serve(app, config)\n",
        module,
    )
    with pytest.raises(RuntimeError, match="TCPServer"):
        _serve_with_own_start_server(module["serve"])


def test_hypercorn_adapter_refuses_a_serve_that_does_not_use_asyncio_start_server() -> None:
    from proxyproto.hypercorn import _serve_with_own_start_server

    async def serve(app: Any, config: Any) -> None:
        pass

    with pytest.raises(RuntimeError, match=r"asyncio\.start_server"):
        _serve_with_own_start_server(serve)


# -- aiohttp ------------------------------------------------------------------------------------


def test_aiohttp_tcp_site_keeps_its_settings_and_server_in_these_slots() -> None:
    """proxyproto.aiohttp: ``ProxyTCPSite.start`` reads ``_host``, ``_port``, ``_backlog``,
    ``_reuse_address``, ``_reuse_port`` and sets ``_server`` (which ``BaseSite.stop`` closes)
    and ``_bound_port`` (which ``port`` reports); without them, ProxyTCPSite refuses to be made."""
    require_module("aiohttp")
    from aiohttp import web

    from proxyproto import aiohttp as ppa

    slots = {name for klass in web.TCPSite.__mro__ for name in getattr(klass, "__slots__", ())}
    assert set(ppa._SITE_SLOTS) <= slots
    ppa._require_site_slots()

    async def scenario() -> None:
        runner = web.AppRunner(web.Application())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            assert isinstance(site._server, asyncio.AbstractServer)
            assert site.port == site._bound_port == site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            assert (site._host, site._backlog, site._reuse_address, site._reuse_port) == ("127.0.0.1", 128, None, None)
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_every_assumption_is_on_the_platforms_page() -> None:
    page = (ROOT / "docs" / "platforms.rst").read_text()
    for name in (
        "socket.socket._accept",
        "_BaseServer__is_shut_down",
        "_selector",
        "_buffer",
        "_eof",
        "_wait_for_data",
        "alpn_protocols",
        "worker_serve",
        "TCPServer",
        "receive.__self__.transport",
        "ws_protocol_class",
        "_bound_port",
        "inspect.currentframe",
    ):
        assert name in page, name
    assert sys.version_info >= (3, 9)
