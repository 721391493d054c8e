"""gunicorn workers that read the PROXY header first: ``gunicorn -k proxyproto.gunicorn.Sync app:app``.

Four worker classes, each gunicorn's own (or uvicorn's) with the header read
by this library before anything else touches the connection (TLS included)::

    gunicorn -k proxyproto.gunicorn.Sync app:app                 # WSGI, gunicorn's sync worker
    gunicorn -k proxyproto.gunicorn.GThread --threads 8 app:app  # WSGI, gunicorn's gthread worker
    gunicorn -k proxyproto.gunicorn.UvicornWorker app:app        # ASGI, uvicorn's httptools protocol
    gunicorn -k proxyproto.gunicorn.UvicornH11Worker app:app     # ASGI, uvicorn's h11 protocol

Settings (docs/gunicorn.rst): gunicorn's ``--proxy-allow-from`` is the trust
list, ``--proxy-protocol`` chooses the policy (:data:`PROXY_PROTOCOL_POLICIES`),
and the ``PROXYPROTO_*`` environment variables
(:func:`proxyproto.settings.settings_from_environment`) give the rest; a flag
and its variable that disagree stop gunicorn at start, naming both
(:func:`settings_from_gunicorn`).  gunicorn's own PROXY parsing is turned off
in these workers, so a header is never read twice.  Each worker logs one
line at start naming the policy and the trusted peers.

What the application sees: the WSGI workers put the real client in
``REMOTE_ADDR`` and ``REMOTE_PORT`` and a trusted peer's parsed header
(TLVs included) in ``environ["proxyproto.header"]``; the uvicorn workers
are :mod:`proxyproto.uvicorn`'s classes (``scope["client"]``, and the header
at ``scope["extensions"]["proxyproto"]["header"]``).  With gunicorn's
``--certfile``/``--keyfile``, TLS is negotiated after the header.

Importing this module imports gunicorn (its users' only); the uvicorn
workers import uvicorn when first used.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any, Callable, ClassVar

from gunicorn import util as _util  # type: ignore[import-untyped,import-not-found,unused-ignore]
from gunicorn.workers import gthread as _gthread  # type: ignore[import-untyped,import-not-found,unused-ignore]
from gunicorn.workers import sync as _sync  # type: ignore[import-untyped,import-not-found,unused-ignore]

from .advice import note_untrusted_header
from .header import ProxyHeader
from .logs import show_through
from .peers import socket_family
from .policy import Policy, TrustedNetworks, served_address
from .refusal_log import RefusalLog, listener_text
from .settings import VARIABLES, Settings, settings_from_environment
from .sock import take_complete_header
from .waiting import ParkedConnections
from .watcher import Watcher

__all__ = [
    "GThread",
    "Sync",
    "UvicornH11Worker",
    "UvicornWorker",
    "settings_from_gunicorn",
]

logger = logging.getLogger("proxyproto")

#: The WSGI environ key holding a trusted peer's parsed :class:`~proxyproto.ProxyHeader` (or None).
ENVIRON_KEY = "proxyproto.header"

#: gunicorn's ``--proxy-protocol`` values (as its validator normalises them) and the policy each means
#: for trusted peers.  ``off`` (gunicorn's default, which cannot be told from an absent flag) leaves the
#: policy to ``PROXYPROTO_POLICY`` (default REQUIRE): these workers exist to read the header.
PROXY_PROTOCOL_POLICIES: Mapping[str, Policy | None] = {
    "off": None,
    "v1": Policy.REQUIRE,
    "v2": Policy.REQUIRE,
    "auto": Policy.USE,
}

_FLAGS = {"trusted": "--proxy-allow-from", "policy": "--proxy-protocol"}


class GunicornSettings(Settings):
    """:class:`~proxyproto.settings.Settings` that know which flag or variable gave ``policy`` and ``trusted``.

    Refusal lines name the flag for a knob a flag gave (``--proxy-allow-from``),
    else its variable; :meth:`source` says where a value came from, for the
    worker's start line.
    """

    __slots__ = ("flags", "given")
    flags: frozenset[str]
    given: frozenset[str]

    def name_of(self, knob: str) -> str:
        if knob in self.flags:
            return _FLAGS[knob]
        return VARIABLES.get(knob, knob)

    def source(self, knob: str) -> str:
        """``--proxy-allow-from``, ``PROXYPROTO_ALLOW_IPS`` or ``the default``: where ``knob``'s value came from."""
        if knob in self.flags or knob in self.given:
            return self.name_of(knob)
        return "the default"


def settings_from_gunicorn(cfg: Any, environ: Mapping[str, str] | None = None) -> GunicornSettings:
    """The settings of a worker: gunicorn's flags in ``cfg``, the ``PROXYPROTO_*`` variables of ``environ``.

    * ``trusted``: ``--proxy-allow-from`` when it is not gunicorn's default
      (``127.0.0.1,::1``, also proxyproto's), else ``PROXYPROTO_ALLOW_IPS``.
    * ``policy``: ``--proxy-protocol`` as :data:`PROXY_PROTOCOL_POLICIES`
      maps it, else ``PROXYPROTO_POLICY``.
    * everything else: the ``PROXYPROTO_*`` variables.

    A flag and its variable both given with different meanings raise
    ``ValueError`` naming both (which of them should win is the operator's
    call, not a guess); so does any invalid variable.  ``environ`` defaults to
    ``os.environ`` (in a worker, gunicorn's ``--env`` values are there too).
    """
    env = os.environ if environ is None else environ
    settings = settings_from_environment(env)
    changes: dict[str, Any] = {}
    flags = set()
    allow = ",".join(cfg.proxy_allow_ips)
    if TrustedNetworks(allow) != TrustedNetworks(cfg.settings["proxy_allow_ips"].default):
        variable = env.get(VARIABLES["trusted"])
        if variable is not None and settings.trusted != TrustedNetworks(allow):
            raise ValueError(
                f"--proxy-allow-from {allow} and {VARIABLES['trusted']}={variable.strip()} disagree: "
                "give the peers trusted to send a PROXY header once"
            )
        changes["trusted"] = allow
        flags.add("trusted")
    mode = cfg.proxy_protocol
    if mode not in PROXY_PROTOCOL_POLICIES:  # a value a later gunicorn may add: never guessed
        raise ValueError(f"--proxy-protocol {mode}: not one of {', '.join(PROXY_PROTOCOL_POLICIES)}")
    policy = PROXY_PROTOCOL_POLICIES[mode]
    if policy is not None:
        variable = env.get(VARIABLES["policy"])
        if variable is not None and settings.policy is not policy:
            raise ValueError(
                f"--proxy-protocol {mode} (policy {policy.name}) and {VARIABLES['policy']}={variable.strip()} "
                "disagree: give the policy once"
            )
        changes["policy"] = policy
        flags.add("policy")
    made = GunicornSettings(**{**settings.values(), **changes})
    object.__setattr__(made, "flags", frozenset(flags))
    object.__setattr__(made, "given", frozenset(knob for knob, name in VARIABLES.items() if name in env))
    return made


def _startup_check(cfg: Any, *, tls_after_header_async: bool = False) -> GunicornSettings:
    """The settings for ``cfg`` in the arbiter's environment (with ``--env``); RuntimeError naming what is wrong.

    gunicorn's arbiter calls a worker class's ``check_config`` before it
    forks any worker, and shows a ``RuntimeError`` as one ``Error:`` line
    before exiting with status 1: a misconfiguration stops gunicorn at start.
    """
    try:
        settings = settings_from_gunicorn(cfg, {**os.environ, **cfg.env})
    except ValueError as exc:
        raise RuntimeError(f"proxyproto.gunicorn: {exc}") from None
    if tls_after_header_async and cfg.is_ssl:
        from .aio_protocol import ProxyProtocolFactory

        try:  # the asyncio adapters' rule for TLS after the header, asked of the factory itself
            ProxyProtocolFactory(_never_called, ssl=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), settings=settings)
        except ValueError as exc:
            setting, _, reason = str(exc).partition(" with ssl=: ")
            knob, _, value = setting.partition("=")
            raise RuntimeError(
                f"proxyproto.gunicorn: {knob} {value} (from {settings.source(knob)}) cannot be used with "
                f"--certfile/--keyfile by the uvicorn workers: {reason or exc}"
            ) from None
    return settings


def _never_called() -> Any:  # pragma: no cover - the factory above is only checked
    raise RuntimeError("never called")


def _log_policy(settings: GunicornSettings, tls: bool) -> None:
    """The INFO line a WSGI worker writes at start: its policy, the trusted peers, where they come from, TLS.

    (The uvicorn workers write :mod:`proxyproto.uvicorn`'s line, from the settings made here.)
    """
    show_through("gunicorn.error")  # under gunicorn's logging, proxyproto's lines show with its format
    after = "; TLS is negotiated after the header" if tls else ""
    logger.info(
        "PROXY header policy %s for %s, %s for other peers (policy: %s, trusted peers: %s; "
        "gunicorn's own PROXY parsing is off)%s",
        settings.policy.name,
        settings.trusted.describe(),
        settings.untrusted_policy.name,
        settings.source("policy"),
        settings.source("trusted"),
        after,
    )


# -- uvicorn's workers --------------------------------------------------------------------------


def _uvicorn_worker_base() -> type:
    """uvicorn's gunicorn worker: the ``uvicorn-worker`` package's, else ``uvicorn.workers``' (deprecated there)."""
    try:
        from uvicorn_worker import UvicornWorker as base  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from uvicorn.workers import UvicornWorker as base  # type: ignore[import-untyped,import-not-found,unused-ignore]
    made: type = base
    return made


#: Made on first use by the module's ``__getattr__`` (uvicorn is imported then).
UvicornWorker: type
UvicornH11Worker: type


def __getattr__(name: str) -> Any:
    """``UvicornWorker`` and ``UvicornH11Worker``, made on first use (uvicorn is imported then, not before)."""
    if name in ("UvicornWorker", "UvicornH11Worker"):
        made = _UVICORN.get(name)
        if made is None:
            made = _UVICORN[name] = _make_uvicorn_worker(name)
        return made
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_UVICORN: dict[str, type] = {}


def _make_uvicorn_worker(name: str) -> type:
    base = _uvicorn_worker_base()
    http = "httptools" if name == "UvicornWorker" else "h11"
    loop = "auto" if name == "UvicornWorker" else "asyncio"

    class ProxyUvicornWorker(base):  # type: ignore[valid-type,misc]
        """uvicorn's gunicorn worker serving through :mod:`proxyproto.uvicorn`'s HTTP class (``http``)."""

        CONFIG_KWARGS: ClassVar[dict[str, Any]] = {**getattr(base, "CONFIG_KWARGS", {}), "loop": loop, "http": http}

        @classmethod
        def check_config(cls, cfg: Any, log: Any) -> None:
            checked = getattr(super(), "check_config", None)
            if checked is not None:
                checked(cfg, log)
            _startup_check(cfg, tls_after_header_async=True)

        def run(self) -> Any:
            from . import uvicorn as proxy_uvicorn

            settings = settings_from_gunicorn(self.cfg)  # its INFO line comes from proxyproto.uvicorn
            self.config.http = proxy_uvicorn.wrap(http, settings=settings)
            allowed = self.config.forwarded_allow_ips
            if isinstance(allowed, list):  # gunicorn's list: as uvicorn's own text, so its default is seen as such
                self.config.forwarded_allow_ips = ",".join(allowed)
            return super().run()

    ProxyUvicornWorker.__name__ = ProxyUvicornWorker.__qualname__ = name
    ProxyUvicornWorker.__module__ = __name__
    ProxyUvicornWorker.__doc__ = (
        f"``gunicorn -k {__name__}.{name}``: uvicorn's worker with uvicorn's {http} protocol after the PROXY header."
    )
    return ProxyUvicornWorker


# -- gunicorn's WSGI workers ----------------------------------------------------------------------

#: The header of the connection a worker thread is serving (the sync worker's one thread, or a
#: gthread pool thread), for the application wrapper to put in the environ.
_serving = threading.local()


def _with_header(app: Any) -> Any:
    """The WSGI ``app`` with ``environ["proxyproto.header"]`` set: the serving connection's header, or None."""

    def app_with_header(environ: dict[str, Any], start_response: Any) -> Any:
        environ[ENVIRON_KEY] = getattr(_serving, "header", None)
        return app(environ, start_response)

    return app_with_header


class _Live:
    """What :class:`~proxyproto.waiting.ParkedConnections` reads: the settings, fixed for the worker's life."""

    __slots__ = ("current", "hooked")

    def __init__(self, settings: Settings) -> None:
        self.current = settings
        self.hooked = settings.policy_for is not None


#: ``serve(sock, header, address, listener)``: a connection whose header is decided and that is served.
Serve = Callable[[socket.socket, "ProxyHeader | None", Any, Any], None]


class _Reception:
    """A worker's connections until their header is decided, never blocking the worker's loop.

    A connection whose header came with it (what real proxies do) is
    served at once; the others wait in a
    :class:`~proxyproto.waiting.ParkedConnections` (the socketserver mixin's:
    the policy table, refusal lines, ``max_pending`` eviction), watched by a
    :class:`~proxyproto.watcher.Watcher` whose descriptor the worker's own
    loop polls (gunicorn's ``select`` for the sync worker, gthread's
    poller): :meth:`poll` when it is readable, :meth:`expire` after every
    wake-up, no wait longer than :meth:`timeout` allows.  ``serve`` gets
    each connection to serve with its header (a trusted peer's only) and the
    address it is served with.
    """

    def __init__(self, settings: Settings, listeners: list[Any], serve: Serve) -> None:
        self.settings = settings
        self.serve = serve
        self.log = RefusalLog(logger, settings.log_rate)
        self.log.listener = listener_text(*(listener.getsockname() for listener in listeners))
        watcher = Watcher.open(listeners[0])
        if watcher is None:  # pragma: no cover - platforms whose selector has no descriptor
            raise RuntimeError("proxyproto.gunicorn needs a pollable selector (epoll, kqueue, devpoll)")
        watcher.listen(listeners[0], False)  # gunicorn's loop accepts; the watcher sees parked headers only
        self.watcher = watcher
        self.descriptor = watcher.descriptor
        self.parked = ParkedConnections(_Live(settings), watcher, self.log, self._served)  # type: ignore[arg-type]
        self.waiting = self.parked.parking.waiting
        #: The listener of each connection not served yet (gunicorn's workers pass it on).
        self.listeners: weakref.WeakKeyDictionary[socket.socket, Any] = weakref.WeakKeyDictionary()

    def arrive(self, sock: socket.socket, peer: Any, listener: Any) -> None:
        """A connection just accepted: serve it now (header in, or SKIP), park it, or close it (logged)."""
        settings = self.settings
        try:
            policy, trusted = settings.trust(peer, sock)
        except Exception as exc:  # a user's hook: its failure closes this connection, nothing else
            self.log.hook_failed(peer, exc)
            sock.close()
            return
        if policy is Policy.SKIP:
            self.serve(sock, None, peer, listener)
            return
        saved = sock.gettimeout()
        if saved:
            sock.settimeout(0.0)  # a timeout would make CPython wait before recv, whatever the flags
        elif policy is not Policy.REJECT:  # the common case: the header came with the connection
            try:
                header = take_complete_header(
                    sock, settings.max_header_size, settings.verify_checksum, settings.allow_v4_in_tcp6
                )
            except OSError as exc:
                self.parked.read_failed(sock, peer, exc)
                return
            if header is not None:
                self._served(sock, header, policy, peer, trusted, listener)
                return
        self.listeners[sock] = listener
        self.parked.park(sock, peer, policy, trusted, saved, time.monotonic())  # type: ignore[arg-type]

    def poll(self) -> None:
        """The watcher's descriptor is readable: advance the parked headers that progressed, then the deadlines."""
        now = time.monotonic()
        for key, _ in self.watcher.ready():
            parked = key.data
            if parked in self.waiting:  # (one concluded earlier in this batch is gone)
                self.parked.step(parked, now)
        self.expire()

    def expire(self) -> None:
        """Conclude the connections whose deadline passed; write a due summary of refusal lines."""
        if self.waiting:
            self.parked.expire(time.monotonic())
        if self.log.suppressed:
            self.log.flush()

    def timeout(self, longest: float) -> float:
        """How long the worker's loop may wait, at most ``longest``: until the next deadline or retry."""
        if not self.waiting:
            return longest
        now = time.monotonic()
        soonest = next(iter(self.waiting)).deadline  # oldest first, and every one waits as long
        for parked in self.waiting:
            if parked.attempt.needs_retry and not parked.edge:
                soonest = min(soonest, parked.retry_at)
        return max(0.0, min(longest, soonest - now))

    def close(self) -> None:
        """Close every connection still waiting for its header (the worker stops: nothing was served on them)."""
        for parked in list(self.waiting):
            self.parked.parking.discard(parked)
            self.watcher.unwatch(parked)
            parked.attempt.sock.close()

    def shut(self) -> None:
        """:meth:`close`, then the watcher."""
        self.close()
        self.watcher.close()

    def _served(
        self, sock: Any, header: ProxyHeader | None, policy: Policy, peer: Any, trusted: bool, listener: Any = None
    ) -> None:
        """ParkedConnections' hand-out (and the fast path's): the address to serve with, the header if trusted."""
        if not trusted:
            if header is not None and not self.parked.live.hooked:
                note_untrusted_header(self.log, self.settings, peer, policy)
            header = None
        address = served_address(policy, header, peer, socket_family(sock))
        self.serve(sock, header, address, self.listeners.pop(sock, None) if listener is None else listener)


class _ProxyWorker:
    """What both WSGI workers add to gunicorn's: the settings, the reception, the header in the environ."""

    cfg: Any
    wsgi: Any
    sockets: list[Any]
    alive: bool
    _proxy: _Reception

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        checked = getattr(super(), "check_config", None)
        if checked is not None:
            checked(cfg, log)
        _startup_check(cfg)

    def _proxy_start(self, serve: Serve) -> _Reception:
        """In the worker, before its loop: the settings (``--env`` applied), gunicorn's parser off, the line."""
        settings = settings_from_gunicorn(self.cfg)
        self.cfg.set("proxy_protocol", "off")  # this worker's copy: the header is never read twice
        _log_policy(settings, bool(self.cfg.is_ssl))
        self.wsgi = _with_header(self.wsgi)
        self._proxy = _Reception(settings, list(self.sockets), serve)
        return self._proxy


class Sync(_ProxyWorker, _sync.SyncWorker):  # type: ignore[misc]
    """``gunicorn -k proxyproto.gunicorn.Sync``: gunicorn's sync worker, the header read first.

    gunicorn's loop waits on its listeners and, here, the descriptor of the
    connections still waiting for their header, so a silent client never
    holds the worker: it serves whoever's header is complete, one
    connection at a time as gunicorn's sync worker does.  TLS
    (``--certfile``) and gunicorn's HTTP parser start after the header.
    """

    wait_fds: list[Any]

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """As every worker here; and ``--threads`` above 1 is refused, naming :class:`GThread`.

        gunicorn itself turns a worker class whose name ends in ``SyncWorker``
        into its own gthread worker when ``--threads`` is above 1 (which is
        why this class is not called ``SyncWorker``: that would silently
        drop the header reading); this one stays what it says.
        """
        if cfg.threads > 1:
            raise RuntimeError(
                f"proxyproto.gunicorn: -k {__name__}.Sync serves one connection at a time and does not use "
                f"--threads {cfg.threads}: use -k {__name__}.GThread"
            )
        super().check_config(cfg, log)

    def run(self) -> None:
        reception = self._proxy_start(self._proxy_serve)
        self.wait_fds = [*self.wait_fds, reception.descriptor]
        try:
            super().run()
        finally:
            reception.shut()

    def wait(self, timeout: float) -> Any:
        """gunicorn's wait, no longer than the next header deadline; then the deadlines are enforced."""
        reception = self._proxy
        ready = super().wait(reception.timeout(timeout))
        reception.expire()
        return ready

    def accept(self, listener: Any) -> None:
        reception = self._proxy
        if reception.waiting:
            reception.poll()
        if listener == reception.descriptor:  # gunicorn's multi-listener loop hands over what select returned
            return
        client, addr = listener.accept()
        _util.close_on_exec(client)
        reception.arrive(client, addr, listener)

    def _proxy_serve(self, sock: socket.socket, header: ProxyHeader | None, address: Any, listener: Any) -> None:
        sock.setblocking(True)
        _serving.header = header
        try:
            self.handle(listener, sock, address)
        finally:
            _serving.header = None


class GThread(_ProxyWorker, _gthread.ThreadWorker):  # type: ignore[misc]
    """``gunicorn -k proxyproto.gunicorn.GThread``: gunicorn's gthread worker, the header read first.

    A connection whose header is not in yet waits in gthread's own poller
    (through the reception's descriptor), never in a pool thread; once it
    is in, the connection becomes gunicorn's ``TConn`` (served with the
    header's address) and goes to the pool: TLS (``--certfile``),
    gunicorn's parser, keep-alive as gunicorn does them, the header read
    once per connection.  A stopping worker closes the connections still
    waiting for their header at once.
    """

    def run(self) -> None:
        reception = self._proxy_start(self._proxy_serve)
        self.poller.register(reception.descriptor, selectors.EVENT_READ, lambda _: reception.poll())
        try:
            super().run()
        finally:
            reception.shut()

    def accept(self, listener: Any) -> None:
        try:
            client, addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self._proxy.arrive(client, addr, listener)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        reception = self._proxy
        if not self.alive:
            reception.close()  # stopping: nothing was served on them, and the grace period is for those that were
        super().wait_for_and_dispatch_events(reception.timeout(timeout))
        reception.expire()

    def _proxy_serve(self, sock: socket.socket, header: ProxyHeader | None, address: Any, listener: Any) -> None:
        self.nr_conns += 1
        sock.setblocking(True)
        conn = _gthread.TConn(self.cfg, sock, address, listener.getsockname())
        conn.proxy_header = header
        self.enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        _serving.header = getattr(conn, "proxy_header", None)
        try:
            return super().handle(conn)
        finally:
            _serving.header = None
