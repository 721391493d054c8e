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
import select
import selectors
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any, Callable, ClassVar

from gunicorn.workers import gthread as _gthread  # type: ignore[import-untyped,import-not-found,unused-ignore]
from gunicorn.workers import sync as _sync  # type: ignore[import-untyped,import-not-found,unused-ignore]

from .advice import handed_on, policy_line, untrusted_look
from .header import ProxyHeader
from .logs import show_through
from .parking import ACCEPT_BACKOFF, ACCEPT_RESOURCE_ERRORS, OUT_OF_DESCRIPTORS
from .peers import socket_family
from .policy import SERVES_A_HEADER, Policy, TrustedNetworks, pins_the_client, served_address
from .refusal_log import RefusalLog, listener_text
from .settings import VARIABLES, Settings, settings_from_environment
from .sock import look_at_first_read, preload, read_complete_header, take_complete_header, unload
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
    sources = f" (policy: {settings.source('policy')}, trusted peers: {settings.source('trusted')}; "
    logger.info("%s", policy_line(settings, tls, sources + "gunicorn's own PROXY parsing is off)"))


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


#: ``serve(sock, header, address, listener, pinned)``: a connection whose header is decided and that is
#: served; ``pinned``: the PROXY protocol pins its client (:func:`~proxyproto.policy.pins_the_client`).
#: With the reception's first read, a sixth argument when the served stream's first bytes were read
#: out of ``sock`` with the header: those.
Serve = Callable[..., None]

_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
#: How much the sync worker's first read of a connection asks for: what gunicorn's parser reads at once
#: (``SocketUnreader``'s chunk), so the request that came with the header is there for it in one piece.
FIRST_READ = 8192


#: gunicorn's own defaults for ``--forwarded-allow-ips`` (``FORWARDED_ALLOW_IPS`` unset; older versions).
_GUNICORN_FORWARDED_DEFAULTS = (frozenset(("127.0.0.1", "::1")), frozenset(("127.0.0.1",)))


class _ServedConfig:
    """gunicorn's ``cfg`` as a worker's connections are served with: every setting's value read once, some replaced.

    gunicorn's ``Config`` answers a setting through ``__getattr__`` (on
    CPython 3.11, after a failed lookup whose ``AttributeError`` message is
    formatted), about twenty times per request; here each setting is a
    plain attribute, read from ``cfg`` when the worker starts its loop
    (a worker's settings do not change while it runs: gunicorn reloads by
    starting new workers).  ``replaced`` gives the values that differ from
    ``cfg``'s; anything else (``Config``'s methods and other properties) is
    ``cfg``'s own.
    """

    def __init__(self, cfg: Any, **replaced: Any) -> None:
        values = self.__dict__
        if isinstance(cfg, _ServedConfig):  # another's values, some replaced again; the same Config behind
            values.update(cfg.__dict__)
        else:
            self._cfg = cfg
            owner = type(cfg)
            for name, setting in cfg.settings.items():
                if not hasattr(owner, name):  # (a property with a setting's name, sendfile say, stays Config's)
                    values[name] = setting.get()
            values["is_ssl"] = cfg.is_ssl
        values.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cfg, name)


def _no_networks() -> list[Any]:
    return []


def _without_forwarded_headers(cfg: Any) -> _ServedConfig:
    """gunicorn's ``cfg`` as the connections of peers trusted to send the PROXY header see it.

    Every setting is the worker's but those through which a request's header
    lines set the scheme (``secure_scheme_headers``: ``X-Forwarded-Proto``...)
    or the forwarder headers (``forwarder_headers``: ``SCRIPT_NAME``...):
    none, and no peer is in ``forwarded_allow_ips``.  A trusted proxy relays
    its client's header lines untouched (haproxy in ``mode tcp``), so on its
    connections those lines are the client's, never the proxy's.
    """
    return _ServedConfig(
        cfg,
        secure_scheme_headers={},
        forwarder_headers=[],
        forwarded_allow_ips=[],
        forwarded_allow_networks=_no_networks,
    )


class _HandshakeWithDeadline(ssl.SSLSocket):
    """The TLS sockets of a worker with ``--certfile``: the handshake ends within ``header_timeout`` or fails.

    gunicorn's handshake blocks (the sync worker, or a gthread pool thread)
    for as long as the client likes; here :meth:`do_handshake` waits for
    the peer's bytes at most :attr:`handshake_timeout` seconds in all, then
    writes one refusal line and raises ``SSLEOFError``, which gunicorn's
    workers take as a closed TLS connection (no traceback).  The subclass of
    each worker, with its timeout and refusal log, is made by
    :func:`_handshake_class`; gunicorn's SSL context returns it
    (``SSLContext.sslsocket_class``, set by :func:`_tls_with_deadline`).
    """

    handshake_timeout: ClassVar[float]
    refusals: ClassVar[RefusalLog]

    def do_handshake(self, block: bool = False) -> None:
        saved = self.gettimeout()
        if saved == 0.0:  # a non-blocking caller waits in its own loop
            super().do_handshake(block)
            return
        deadline = time.monotonic() + self.handshake_timeout
        self.settimeout(0.0)
        try:
            while True:
                try:
                    super().do_handshake()
                    return
                except ssl.SSLWantReadError:
                    events = select.POLLIN
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
                left = deadline - time.monotonic()
                poll = select.poll()
                poll.register(self.fileno(), events)
                if left <= 0 or not poll.poll(left * 1000.0):
                    self._timed_out()
        finally:
            self.settimeout(saved)

    def _timed_out(self) -> None:
        try:
            peer = self.getpeername()
        except OSError:
            peer = None
        self.refusals.handshake_expired(peer, self.handshake_timeout)
        raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF, f"TLS handshake not done within {self.handshake_timeout:g} s")


def _handshake_class(timeout: float, refusals: RefusalLog) -> type[_HandshakeWithDeadline]:
    """A worker's :class:`_HandshakeWithDeadline`: its ``header_timeout`` and refusal log."""
    attributes = {"handshake_timeout": timeout, "refusals": refusals, "__module__": __name__}
    return type("HandshakeWithDeadline", (_HandshakeWithDeadline,), attributes)


def _tls_with_deadline(cfg: Any, socket_class: type[ssl.SSLSocket], handshake_on_connect: bool | None) -> _ServedConfig:
    """gunicorn's ``cfg`` for a worker with ``--certfile``: its SSL context makes :class:`_HandshakeWithDeadline`.

    ``handshake_on_connect`` (None: gunicorn's setting) makes the handshake
    happen at wrap time: the sync worker's gunicorn code otherwise leaves it
    to the first read, which no ``do_handshake`` bounds.
    """
    hook = cfg.ssl_context

    def ssl_context(conf: Any, default_ssl_context_factory: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        """gunicorn's hook (the operator's ``ssl_context``, if any), its context returning the bounded sockets."""
        context: ssl.SSLContext = hook(conf, default_ssl_context_factory)
        context.sslsocket_class = socket_class
        return context

    chosen = cfg.do_handshake_on_connect if handshake_on_connect is None else handshake_on_connect
    return _ServedConfig(cfg, ssl_context=ssl_context, do_handshake_on_connect=bool(chosen))


def _cfg_for_trusted_peers(cfg: Any) -> Any:
    """The ``cfg`` a pinned connection is served with (``pins_the_client``): without forwarded headers unless chosen.

    The served address of a connection from a peer trusted to send the
    header is the proxy's own when the header carries no client (PROXY
    UNKNOWN, a v2 LOCAL, IGNORE, USE without a header), and the proxy's
    address is in gunicorn's default ``--forwarded-allow-ips`` (loopback),
    so gunicorn would let the client's ``X-Forwarded-Proto`` set the scheme.
    Unless the operator chose the forwarded-header hosts
    (``FORWARDED_ALLOW_IPS``, or ``--forwarded-allow-ips`` other than
    gunicorn's default), those connections are served without the
    forwarded-header settings (the uvicorn workers' rule,
    :func:`proxyproto.uvicorn._without_forwarded_headers`); with one chosen,
    ``cfg`` itself.
    """
    chosen = frozenset(ip.strip() for ip in cfg.forwarded_allow_ips)
    if "FORWARDED_ALLOW_IPS" in os.environ or "FORWARDED_ALLOW_IPS" in cfg.env:
        return cfg
    if chosen not in _GUNICORN_FORWARDED_DEFAULTS:
        return cfg
    logger.info(
        "gunicorn's secure_scheme_headers and forwarder_headers are off for peers trusted to send the "
        "PROXY header (set FORWARDED_ALLOW_IPS or --forwarded-allow-ips to keep them)"
    )
    return _without_forwarded_headers(cfg)


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

    def __init__(
        self, settings: Settings, listeners: list[Any], serve: Serve, look: bool = True, first_read: bool = False
    ) -> None:
        self.settings = settings
        self.serve = serve
        #: Whether a connection's first bytes are read in one go (:meth:`arrive`), the bytes after the
        #: header handed to ``serve``; else the header is peeked and read exactly (TLS: the ClientHello
        #: stays in the socket).
        self.first_read = first_read and _DONTWAIT != 0
        #: Whether an untrusted peer's first bytes are looked at (not with TLS: gunicorn reads them decrypted).
        self.look = look and settings.policy_for is None
        self.log = RefusalLog(logger, settings.log_rate, name_of=settings.name_of)
        self.log.listener = listener_text(*(listener.getsockname() for listener in listeners))
        watcher = Watcher.open(listeners[0])
        if watcher is None:  # pragma: no cover - platforms whose selector has no descriptor
            raise RuntimeError("proxyproto.gunicorn needs a pollable selector (epoll, kqueue, devpoll)")
        watcher.listen(listeners[0], False)  # gunicorn's loop accepts; the watcher sees parked headers only
        self.watcher = watcher
        self.descriptor = watcher.descriptor
        # With the descriptor reserve: gthread's pool thread opens a selector for each served connection.
        self.parked = ParkedConnections(_Live(settings), watcher, self.log, self._handed_out, reserve=True)  # type: ignore[arg-type]
        self.waiting = self.parked.parking.waiting
        self.accept_failing = False  # accept() failed for lack of resources; logged once until it works again
        self.accept_resume_at = 0.0  # the listeners rest until then (0: they do not)
        #: The listener of each connection not served yet (gunicorn's workers pass it on).
        self.listeners: weakref.WeakKeyDictionary[socket.socket, Any] = weakref.WeakKeyDictionary()
        #: Each listener's family, asked of the kernel once: its connections' (no system call per connection).
        self.families = {id(listener): socket_family(listener) for listener in listeners}

    def accept(self, listener: Any, evicted: bool = False) -> None:
        """Accept one connection from ``listener`` and :meth:`arrive` it; never raises for a full table.

        Nothing to accept raises as ``listener.accept()`` does
        (``BlockingIOError``): gunicorn's sync loop accepts until then.  Out
        of descriptors with connections parked, the oldest parked one gives
        its place (the eviction line) and the accept is retried once; out of
        descriptors or memory otherwise, the listeners rest for
        :data:`ACCEPT_BACKOFF` seconds (:meth:`resting`).  Either is logged
        once, until ``accept()`` works again (the socketserver mixin's rule).
        """
        try:
            client, addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            raise
        except OSError as exc:
            if exc.errno not in ACCEPT_RESOURCE_ERRORS:
                raise
            if exc.errno in OUT_OF_DESCRIPTORS and self.waiting and not evicted:
                if not self.accept_failing:
                    logger.error("accept() failed: %s; closing connections still waiting for their header", exc)
                    self.accept_failing = True
                self.parked.evict_oldest()
                self.accept(listener, evicted=True)
                return
            if not self.accept_failing:
                logger.error("accept() failed: %s; pausing the listener until it works again", exc)
                self.accept_failing = True
            self.accept_resume_at = time.monotonic() + ACCEPT_BACKOFF
            return
        if self.accept_failing and not evicted:
            logger.warning("accept() works again")
            self.accept_failing = False
        # (no close_on_exec as gunicorn's accept does: Python's descriptors are non-inheritable already, PEP 446)
        self.arrive(client, addr, listener)

    def resting(self) -> bool:
        """Whether the listeners rest after ``accept()`` ran out of resources (ends the rest when due)."""
        if self.accept_resume_at and time.monotonic() >= self.accept_resume_at:
            self.accept_resume_at = 0.0
        return bool(self.accept_resume_at)

    def arrive(self, sock: socket.socket, peer: Any, listener: Any) -> None:
        """A connection just accepted: serve it now (header in, or SKIP), park it, or close it (logged)."""
        settings = self.settings
        try:
            policy, trusted = settings.trust(peer, sock)
        except Exception as exc:  # a user's hook: its failure closes this connection, nothing else
            self.log.hook_failed(peer, exc, listener=listener.getsockname)
            sock.close()
            return
        if policy is Policy.SKIP:
            if not trusted and self.look and type(sock) is socket.socket:
                look_at_first_read(sock, untrusted_look(self.log, settings, peer, listener.getsockname))
            self.serve(sock, None, peer, listener, False)  # SKIP reads no header: nothing pins the client
            return
        saved = sock.gettimeout()
        first = b""
        if saved:
            sock.settimeout(0.0)  # a timeout would make CPython wait before recv, whatever the flags
        elif policy in SERVES_A_HEADER and self.first_read and type(sock) is socket.socket:
            # the common case: header and request at once
            try:
                header, data = read_complete_header(
                    sock, FIRST_READ, settings.max_header_size, settings.verify_checksum, settings.allow_v4_in_tcp6
                )
            except OSError as exc:
                self.parked.read_failed(sock, peer, exc)
                return
            if header is not None:
                self._served(sock, header, policy, peer, trusted, listener, data or b"")
                return
            first = data or b""  # read already: the parked scanner holds it (at EOF, b"": the peek sees the end)
        elif policy in SERVES_A_HEADER:  # the header came with the connection; the rest stays in the socket
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
        self.parked.park(sock, peer, policy, trusted, saved, time.monotonic(), first)  # type: ignore[arg-type]

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
        """How long the worker's loop may wait, at most ``longest``: until the next deadline, retry or rest's end."""
        if not self.waiting and not self.accept_resume_at:
            return longest
        now = time.monotonic()
        soonest = self.accept_resume_at or now + longest
        if self.waiting:
            soonest = min(soonest, next(iter(self.waiting)).deadline)  # oldest first, and every one waits as long
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
        self,
        sock: Any,
        header: ProxyHeader | None,
        policy: Policy,
        peer: Any,
        trusted: bool,
        listener: Any = None,
        rest: bytes = b"",
    ) -> None:
        """The fast path's hand-out: the address to serve with, the header if trusted; ``rest`` read already."""
        if listener is None:
            listener = self.listeners.pop(sock, None)
        named = None if listener is None else listener.getsockname  # asked only if a line is written
        header = handed_on(self.log, self.settings, peer, policy, header, trusted, self.parked.live.hooked, named)
        family = self.families.get(id(listener))
        address = served_address(policy, header, peer, socket_family(sock) if family is None else family)
        pinned = pins_the_client(policy, trusted)
        if rest:
            self.serve(sock, header, address, listener, pinned, rest)
        else:
            self.serve(sock, header, address, listener, pinned)

    def _handed_out(
        self, sock: Any, header: ProxyHeader | None, policy: Policy, peer: Any, trusted: bool, rest: bytes = b""
    ) -> None:
        """ParkedConnections' hand-out: :meth:`_served` with the listener kept at :meth:`arrive`."""
        self._served(sock, header, policy, peer, trusted, None, rest)


class _ProxyWorker:
    """What both WSGI workers add to gunicorn's: the settings, the reception, the header in the environ."""

    cfg: Any
    wsgi: Any
    sockets: list[Any]
    alive: bool
    _proxy: _Reception
    _proxy_cfgs: tuple[Any, Any]  # the cfg connections are served with: (the others, those the header pins)
    #: For the sync worker's gunicorn code, which leaves the handshake to the first read otherwise.
    _proxy_handshake_on_connect: bool | None = None

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        checked = getattr(super(), "check_config", None)
        if checked is not None:
            checked(cfg, log)
        if str(getattr(cfg, "http2_cleartext", "off") or "off").lower() != "off":
            # gunicorn upgrades h2c with the worker's own config, not the connection's: a trusted proxy's
            # relayed X-Forwarded-* lines would set the scheme there (the rule every other request keeps).
            raise RuntimeError(
                f"proxyproto.gunicorn: --http2-cleartext {cfg.http2_cleartext} is not supported by the WSGI "
                "workers (HTTP/2 cleartext would believe the client's X-Forwarded-* lines); leave it off"
            )
        _startup_check(cfg)

    def _proxy_start(self, serve: Serve, first_read: bool = False) -> _Reception:
        """In the worker, before its loop: the settings (``--env`` applied), gunicorn's parser off, the line.

        ``first_read``: the reception reads a connection's first bytes in one go (:meth:`_Reception.arrive`),
        never with TLS (the ClientHello must stay in the socket for the TLS layer).
        """
        settings = settings_from_gunicorn(self.cfg)
        self.cfg.set("proxy_protocol", "off")  # this worker's copy: the header is never read twice
        _log_policy(settings, bool(self.cfg.is_ssl))
        self.wsgi = _with_header(self.wsgi)
        tls = bool(self.cfg.is_ssl)
        self._proxy = _Reception(settings, list(self.sockets), serve, look=not tls, first_read=first_read and not tls)
        cfg = self.cfg
        if cfg.is_ssl:
            socket_class = _handshake_class(settings.header_timeout, self._proxy.log)
            served = _tls_with_deadline(cfg, socket_class, self._proxy_handshake_on_connect)
        else:
            served = _ServedConfig(cfg)
        self._proxy_cfgs = (served, _cfg_for_trusted_peers(served))
        return self._proxy


class Sync(_ProxyWorker, _sync.SyncWorker):  # type: ignore[misc]
    """``gunicorn -k proxyproto.gunicorn.Sync``: gunicorn's sync worker, the header read first.

    gunicorn's loop waits on its listeners and, here, the descriptor of the
    connections still waiting for their header, so a client silent before
    its header never holds the worker: it serves whoever's header is
    complete, one connection at a time as gunicorn's sync worker does.
    Without TLS a connection's first bytes are read in one go, as
    gunicorn's parser would read them: the header is taken from them and
    the bytes after it (the request that came in the header's segment) go
    to gunicorn's parser first, so a request costs the worker the same
    reads as without a header.  TLS (``--certfile``) and gunicorn's HTTP
    parser start after the header (with TLS the header is read exactly,
    the ClientHello left in the socket); a client silent after it holds
    the worker in gunicorn's own parser, as it would without this library
    (the reason gunicorn's docs put the sync worker behind a buffering
    proxy).
    """

    wait_fds: list[Any]
    _proxy_handshake_on_connect = True

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
        reception = self._proxy_start(self._proxy_serve, first_read=True)
        self.wait_fds = [*self.wait_fds, reception.descriptor]
        try:
            super().run()
        finally:
            reception.shut()

    def wait(self, timeout: float) -> Any:
        """gunicorn's wait, no longer than the next header deadline; then the deadlines are enforced."""
        reception = self._proxy
        fds = self.wait_fds
        if reception.resting():  # the listeners are not waited on while they rest
            self.wait_fds = [fd for fd in fds if all(fd is not listener for listener in self.sockets)]
        try:
            ready = super().wait(reception.timeout(timeout))
        finally:
            self.wait_fds = fds
        reception.expire()
        return ready

    def accept(self, listener: Any) -> None:
        reception = self._proxy
        if reception.waiting:
            reception.poll()
        if listener == reception.descriptor:  # gunicorn's multi-listener loop hands over what select returned
            return
        if reception.resting():  # out of descriptors a moment ago: gunicorn's loop waits (Sync.wait)
            raise BlockingIOError(errno.EAGAIN, "proxyproto: the listener rests")
        reception.accept(listener)

    def _proxy_serve(
        self,
        sock: socket.socket,
        header: ProxyHeader | None,
        address: Any,
        listener: Any,
        pinned: bool,
        rest: bytes = b"",
    ) -> None:
        if sock.gettimeout() is not None:  # (blocking already, as accept() makes it, is left as it is: no system call)
            sock.setblocking(True)
        if rest:
            preload(sock, rest)  # the request's bytes that came with the header: gunicorn's parser reads them first
        _serving.header = header
        cfg = self.cfg
        self.cfg = self._proxy_cfgs[pinned]  # (one connection at a time: gunicorn's handle reads self.cfg)
        try:
            self.handle(listener, sock, address)
        finally:
            _serving.header = None
            self.cfg = cfg
            if rest:
                unload(sock)  # (the connection ended before gunicorn read them all)


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
        reception = self._proxy
        try:
            reception.accept(listener)
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another thread's poller, or the client left: gthread's loop waits again
        if reception.accept_resume_at:
            self.set_accept_enabled(False)  # until the rest ends (set_accept_enabled)

    def set_accept_enabled(self, enabled: bool) -> None:
        """gunicorn's, but the listeners stay out of the poller while they rest (out of descriptors)."""
        super().set_accept_enabled(enabled and not self._proxy.resting())

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        reception = self._proxy
        if not self.alive:
            reception.close()  # stopping: nothing was served on them, and the grace period is for those that were
        super().wait_for_and_dispatch_events(reception.timeout(timeout))
        reception.expire()

    def _proxy_serve(
        self,
        sock: socket.socket,
        header: ProxyHeader | None,
        address: Any,
        listener: Any,
        pinned: bool,
        rest: bytes = b"",
    ) -> None:
        assert not rest, "gthread's reception reads exactly the header"  # (no first read: _proxy_start)
        self.nr_conns += 1
        sock.setblocking(True)
        conn = _gthread.TConn(self._proxy_cfgs[pinned], sock, address, listener.getsockname())
        conn.proxy_header = header
        self.enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        _serving.header = getattr(conn, "proxy_header", None)
        try:
            return super().handle(conn)
        finally:
            _serving.header = None
