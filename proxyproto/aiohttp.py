"""aiohttp: a site whose connections start with a PROXY header, so ``request.remote`` is the real client.

:func:`run_app` is ``web.run_app`` with these sites: the application runs
until SIGINT or SIGTERM, with its startup, shutdown and cleanup hooks.

aiohttp serves an application through a runner (``web.AppRunner``) and one
or more *sites*; ``runner.server`` is a protocol factory that sites hand to
``loop.create_server``.  :class:`ProxyTCPSite` is ``web.TCPSite`` with that
factory wrapped by :func:`proxyproto.aio_protocol.wrap_protocol_factory`:
each connection reads its header first, and aiohttp's request handler
then sees a transport whose ``peername`` is the header's source, which is
where ``request.remote`` and ``request.transport.get_extra_info("peername")``
come from.  ``request.transport.get_extra_info("proxy_header")`` is the
parsed header (TLVs, SSL details), ``"proxy_peername"`` the proxy's own address.

``ssl_context`` is negotiated *after* the header (haproxy's ``send-proxy``
in front of TLS passthrough, aio-libs/aiohttp#11252): given to
``web.TCPSite``, the handshake would come first and read the header as a
broken ClientHello.

aiohttp is imported when this module is, which only its users do.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import inspect
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

# Without aiohttp installed (a [test]-only install), mypy sees Any here.
from aiohttp import web  # type: ignore[import-not-found,unused-ignore]

from .aio_protocol import ProxyProtocolFactory, wrap_protocol_factory
from .settings import KNOBS, Settings, split_knobs

__all__ = ["ProxyTCPSite", "run_app"]


#: The private slots of ``web.TCPSite`` that :meth:`ProxyTCPSite.start` reads and sets in its
#: place (docs/platforms.rst); ``_bound_port`` too where it exists (aiohttp 3.10 and later).
_SITE_SLOTS = ("_server", "_host", "_port", "_backlog", "_reuse_address", "_reuse_port")


def _require_site_slots() -> None:
    """Raise ``RuntimeError`` naming them when this aiohttp's ``TCPSite`` lacks :data:`_SITE_SLOTS`.

    The subclass has a ``__dict__``: without this check, a renamed slot would
    be set there silently, and ``BaseSite.stop`` would no longer close the
    listener.
    """
    slots = {name for klass in web.TCPSite.__mro__ for name in getattr(klass, "__slots__", ())}
    missing = [name for name in _SITE_SLOTS if name not in slots]
    if missing:
        raise RuntimeError(
            f"proxyproto.aiohttp: this aiohttp's web.TCPSite has no {', '.join(missing)}, which "
            "ProxyTCPSite.start sets in its place (see docs/platforms.rst)"
        )


class ProxyTCPSite(web.TCPSite):  # type: ignore[misc,unused-ignore]
    """``web.TCPSite`` for a backend behind a PROXY-protocol proxy.

    Takes ``web.TCPSite``'s arguments and the knobs of docs/configuration.rst,
    as keywords or as one :class:`~proxyproto.settings.Settings`
    (``settings=``, keywords on top): ``trusted`` is ``"127.0.0.1,::1"`` by
    default (loopback only; networks, ``"10.0.0.0/8,127.0.0.1"``, ``"*"``
    for every peer, ``""`` for none; None is refused).
    ``ssl_context`` (aiohttp's spelling of ``ssl``) is negotiated after
    the header, within ``ssl_handshake_timeout`` (default: ``header_timeout``).  Invalid knobs raise ``ValueError``
    here, before anything is bound.  :meth:`stop` (and so
    ``runner.cleanup()``) also closes the connections still waiting for
    their header, which aiohttp does not know of yet.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None = None,
        port: int | None = None,
        *,
        settings: Settings | None = None,
        ssl_context: ssl.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
        backlog: int = 128,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
        **knobs: Any,
    ) -> None:
        _require_site_slots()
        super().__init__(
            runner,
            host,
            port,
            ssl_context=ssl_context,
            backlog=backlog,
            reuse_address=reuse_address,
            reuse_port=reuse_port,
        )
        server = runner.server
        assert server is not None  # BaseSite.__init__ refuses a runner that is not set up
        #: The wrapped protocol factory: ``proxy_factory.pending`` counts connections waiting for a header.
        self.proxy_factory: ProxyProtocolFactory = wrap_protocol_factory(
            server, settings=settings, ssl=ssl_context, ssl_handshake_timeout=ssl_handshake_timeout, **knobs
        )

    async def start(self) -> None:
        # web.TCPSite.start would pass ssl= to create_server (TLS before the header):
        # register the site as BaseSite.start does, then listen with the wrapped factory.
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.proxy_factory,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        # TCPSite.port reports _bound_port (aiohttp >= 3.10); older releases have no such slot.
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        await super().stop()
        self.proxy_factory.close()


def _require_runner_shutdown_timeout() -> None:
    """Raise ``RuntimeError`` when this aiohttp's runners do not take ``shutdown_timeout`` (aiohttp 3.8).

    :func:`run_app` gives it to ``web.AppRunner``, as ``web.run_app`` does
    from aiohttp 3.9 on; an older runner would hand it to each request
    handler, and every connection would fail.
    """
    if "shutdown_timeout" not in inspect.signature(web.BaseRunner.__init__).parameters:
        raise RuntimeError(
            "proxyproto.aiohttp.run_app needs aiohttp 3.9 or later (web.AppRunner's shutdown_timeout); "
            "with this aiohttp, serve a web.AppRunner through ProxyTCPSite"
        )


def _check_server_keywords(names: Sequence[str]) -> None:
    """Raise ``TypeError`` for a keyword that neither aiohttp's request handler nor its server takes.

    ``web.AppRunner`` hands its keywords on, through ``web.Server``, to
    each connection's ``web.RequestHandler``: a misspelt knob would
    otherwise fail there, at every connection, instead of here.
    """
    accepted = {"access_log_class"}  # AppRunner's own
    for function in (web.Server.__init__, web.RequestHandler.__init__):
        for parameter in inspect.signature(function).parameters.values():
            if parameter.kind is parameter.VAR_KEYWORD and function is web.RequestHandler.__init__:
                return  # a handler that takes any keyword: nothing to check against
            if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD):
                accepted.add(parameter.name)
    accepted -= {"self", "handler", "manager", "request_factory", "loop"}  # run_app's to give, not the caller's
    unknown = sorted(set(names) - accepted)
    if unknown:
        raise TypeError(
            f"run_app() got an unexpected keyword argument {unknown[0]!r}: neither a knob "
            f"({', '.join(KNOBS)}) nor a keyword of aiohttp's web.run_app"
        )


def _refuse_unused_factory() -> asyncio.Protocol:
    raise RuntimeError("proxyproto.aiohttp.run_app: the factory that checks the knobs serves nothing")


def _checked_arguments(
    settings: Settings | None,
    ssl_context: ssl.SSLContext | None,
    ssl_handshake_timeout: float | None,
    host: str | Sequence[str] | None,
    kwargs: dict[str, Any],
) -> tuple[ProxyProtocolFactory, dict[str, Any], list[str | None]]:
    """:func:`run_app`'s checks, before anything starts: the checked knobs, the runner's keywords, the hosts."""
    for name in ("path", "sock"):
        if name in kwargs:
            raise TypeError(
                f"proxyproto.aiohttp.run_app serves TCP only: no {name}= (give host= and port=, "
                "or wrap your listener with proxyproto.aio_protocol.wrap_protocol_factory)"
            )
    _require_runner_shutdown_timeout()
    _require_site_slots()
    knobs, runner_kwargs = split_knobs(kwargs)
    _check_server_keywords(list(runner_kwargs))
    # The sites need a runner that has run on_startup; check their knobs before that, here.
    checked = ProxyProtocolFactory(
        _refuse_unused_factory,
        settings=settings,
        ssl=ssl_context,
        ssl_handshake_timeout=ssl_handshake_timeout,
        **knobs,
    )
    hosts: list[str | None] = [host] if host is None or isinstance(host, str) else list(host)
    if not hosts:
        raise ValueError("host: an empty sequence of hosts (give None for every interface)")
    return checked, runner_kwargs, hosts


def run_app(
    app: web.Application | Awaitable[web.Application],
    *,
    host: str | Sequence[str] | None = None,
    port: int | None = None,
    settings: Settings | None = None,
    ssl_context: ssl.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
    shutdown_timeout: float = 60.0,
    keepalive_timeout: float = 75.0,
    print: Callable[..., None] | None = builtins.print,
    backlog: int = 128,
    handle_signals: bool = True,
    reuse_address: bool | None = None,
    reuse_port: bool | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
    **kwargs: Any,
) -> None:
    """``web.run_app`` for a backend behind a PROXY-protocol proxy: every listener is a :class:`ProxyTCPSite`.

    Runs ``app`` (a ``web.Application``, or an awaitable that returns one)
    until SIGINT or SIGTERM (aiohttp's ``GracefulExit``; with
    ``handle_signals=False``, until ``KeyboardInterrupt``), then returns:
    ``on_startup`` runs before the listeners open; on a signal the
    listeners close, connections still waiting for their header are closed,
    ``on_shutdown`` runs, requests in progress get ``shutdown_timeout``
    seconds, and ``on_cleanup`` runs.  An exception from startup, from
    binding or from cleanup propagates.  The event loop (a new one, or
    ``loop``) is closed on return.

    ``host``: one host or a sequence of them, each a listener on ``port``;
    None, every interface.  ``port``: by default 8080, or 8443 with
    ``ssl_context``, whose TLS handshake comes *after* the header (within
    ``ssl_handshake_timeout``, by default ``header_timeout``).
    ``shutdown_timeout``, ``keepalive_timeout``, ``backlog``,
    ``reuse_address``, ``reuse_port`` and ``handle_signals`` mean what they
    mean to ``web.run_app``.  ``print`` (None for silence) gets the start
    line, aiohttp's with the PROXY-protocol trust rule.

    The knobs of docs/configuration.rst come as keywords or as one
    ``settings=`` (keywords on top); ``trusted`` is ``"127.0.0.1,::1"`` by
    default (loopback only).  Every other keyword goes to
    ``web.AppRunner`` as ``web.run_app`` passes it (``access_log``,
    ``access_log_class``, ``access_log_format``, ``handler_cancellation``,
    the request handler's ``max_line_size``...).

    Raises, before the application starts and before anything is bound:
    ``ValueError`` for an invalid knob or an empty ``host`` sequence,
    ``TypeError`` for a keyword that is neither a knob nor aiohttp's, and
    for ``path`` or ``sock`` (TCP listeners only), ``RuntimeError`` on
    aiohttp before 3.9.
    """
    try:
        checked, runner_kwargs, hosts = _checked_arguments(settings, ssl_context, ssl_handshake_timeout, host, kwargs)
    except BaseException:
        if asyncio.iscoroutine(app):
            app.close()  # never to be awaited: no "never awaited" warning beside the error
        raise

    def make_site(runner: web.AppRunner, site_host: str | None) -> ProxyTCPSite:
        return ProxyTCPSite(
            runner,
            site_host,
            port,
            settings=checked.settings,
            ssl_context=ssl_context,
            ssl_handshake_timeout=ssl_handshake_timeout,
            backlog=backlog,
            reuse_address=reuse_address,
            reuse_port=reuse_port,
        )

    async def serve() -> None:
        application = app if isinstance(app, web.Application) else await app
        runner = web.AppRunner(
            application,
            handle_signals=handle_signals,
            shutdown_timeout=shutdown_timeout,
            keepalive_timeout=keepalive_timeout,
            **runner_kwargs,
        )
        await runner.setup()
        try:
            for site_host in hosts:
                await make_site(runner, site_host).start()
            if print is not None:
                names = ", ".join(sorted(str(site.name) for site in runner.sites))
                print(f"======== Running on {names} ({_rule(checked.settings)}) ========\n(Press CTRL+C to quit)")
            while True:  # until run_app cancels this task
                await asyncio.sleep(3600)
        finally:
            await runner.cleanup()

    _run_until_signal(asyncio.new_event_loop() if loop is None else loop, serve())


def _rule(settings: Settings) -> str:
    """The trust rule in a few words, for the start line."""
    if settings.policy_for is not None:
        return "PROXY protocol: policy_for decides per connection"
    return (
        f"PROXY protocol: {settings.policy.name} for {settings.trusted.describe()}, "
        f"{settings.untrusted_policy.name} for other peers"
    )


def _run_until_signal(loop: asyncio.AbstractEventLoop, main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on ``loop`` until it ends or a signal stops it; cancel it then and let it clean up; close ``loop``.

    aiohttp's signal handlers raise ``GracefulExit`` out of the loop, not
    inside ``main``: it is caught here, and ``main`` is then cancelled and
    run to its end, so its ``finally`` (the runner's cleanup) runs, and what
    that raises propagates.  Whatever other tasks are left are cancelled,
    their errors reported to the loop's exception handler.
    """
    task = loop.create_task(main)
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(task)
        finally:
            try:
                _cancel_the_rest(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()


def _cancel_the_rest(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks still on ``loop`` and wait for them; report those that fail otherwise."""
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "proxyproto.aiohttp.run_app: a task failed while cancelled at exit",
                    "exception": task.exception(),
                    "task": task,
                }
            )
