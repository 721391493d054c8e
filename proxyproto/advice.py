"""What a refusal line tells the operator to change, in the words of their own configuration.

The common mistakes behind a PROXY deployment are few, and each has a
signature in what arrives:

* the proxy does not send the header (haproxy without ``send-proxy``, nginx
  without ``proxy_protocol on``): a *trusted* peer's stream starts with
  something else (``GET /``, a TLS ClientHello), or with nothing at all;
* the proxy's address is missing from the trust list (an NLB in a VPC,
  haproxy on another host): an *untrusted* peer's stream starts with a
  PROXY signature;
* TLS negotiated before the header (``ssl=`` given to ``create_server``
  instead of to proxyproto): the header reaches the TLS layer, or a TLS
  record reaches the header reader.

The functions here turn those into a clause for the adapter's line, naming
the knob as the user spelled it (:meth:`proxyproto.settings.Settings.name_of`:
``trusted``, ``proxy_trusted``, ``PROXYPROTO_ALLOW_IPS``).  They read bytes
the adapter already holds or peeked; nothing here does I/O or acts on them.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, Callable

from .header import ProxyHeader
from .policy import UNIX_NONE, Policy, describe, peer_text
from .reader import HeaderScanner, Outcome
from .refusal_log import KIND_UNTRUSTED_HEADER, RefusalLog
from .settings import Settings
from .v2 import SIGNATURE as V2_SIGNATURE

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

logger = logging.getLogger("proxyproto")

#: How many first bytes :func:`starts_with_header` needs to tell (a v2 signature's length).
SIGNATURE_PEEK = len(V2_SIGNATURE)


def starts_with_header(data: bytes) -> bool:
    """Whether ``data`` (the first bytes of a stream or datagram) starts with a PROXY v1 or v2 signature."""
    return data.startswith(b"PROXY ") or data.startswith(V2_SIGNATURE)


def starts_with_tls(data: bytes) -> bool:
    """Whether ``data`` starts like a TLS handshake record (content type 22, version 3.x)."""
    return len(data) >= 2 and data[0] == 0x16 and data[1] == 0x03


def missing_header(settings: Settings, outcome: Outcome, start: bytes) -> str:
    """For a trusted peer closed under REQUIRE without a header: what to check (a clause starting "; "), or ""."""
    if settings.policy is not Policy.REQUIRE or outcome not in (Outcome.NO_HEADER, Outcome.SILENT):
        return ""
    if starts_with_tls(start):
        return (
            f"; the peer is trusted ({settings.describe_trusted()}) and sent a TLS handshake first: proxyproto "
            "negotiates TLS after the header, so the proxy must send its header before TLS (haproxy: send-proxy "
            "or send-proxy-v2 in front of TLS passthrough), and the certificate goes to proxyproto (ssl=, the "
            "server's TLS settings through its adapter, proxyproto:ssl:), never to a TLS layer that handshakes "
            "before it (create_server's ssl=, a Twisted ssl: endpoint)"
        )
    return (
        f"; the peer is trusted ({settings.describe_trusted()}), so its stream must start with a PROXY header: "
        "turn on the proxy's PROXY protocol (haproxy: send-proxy or send-proxy-v2; nginx: proxy_protocol on), "
        f"or take this peer out of {settings.name_of('trusted')}"
    )


def rejected(settings: Settings, trusted: bool, peer: Any = None) -> str:
    """For a header refused by REJECT: whether the peer was trusted, and what to change if it is a proxy.

    ``peer``, when given, words that for its kind (:func:`unix_advice` for a UNIX-socket peer).
    """
    if trusted:
        return f" ({settings.name_of('policy')} is REJECT)"
    advice = _to_trust(settings, peer, "it")
    return (
        f" (the peer is untrusted: {settings.describe_trusted()}, and {settings.name_of('untrusted_policy')} is "
        f"REJECT); {advice}"
    )


def is_unix_peer(peer: Any) -> bool:
    """Whether ``peer`` names a UNIX-socket peer: a path (asyncio's ``""`` for an unnamed one), or waitress's
    ``("localhost", None)``; None (an IP peer the loop could not tell) is none."""
    return isinstance(peer, (str, bytes)) or (type(peer) is tuple and len(peer) == 2 and peer[1] is None)


def unix_advice(settings: Settings) -> str:
    """What to change for an untrusted UNIX-socket peer that is your proxy: it has no address to add.

    With ``trusted`` empty no UNIX peer is trusted; otherwise (no ``unix``
    token) only the peers of a socket file that is not world-writable are,
    so this one's file is world-writable (or the socket is abstract or
    unnamed): anyone on the host could connect.
    """
    name = settings.name_of("trusted")
    if settings.trusted.unix == UNIX_NONE:
        return f"a UNIX-socket peer has no address: to trust the peers of this socket, add unix to {name}"
    return (
        "a UNIX-socket peer has no address: it is untrusted because its socket file is world-writable (or the "
        "socket is abstract or unnamed), so anyone on the host could connect; make the file writable by its "
        "owner and group only (gunicorn: --umask 007; uvicorn's --uds always makes it 0o666), or, if nothing "
        f"but your proxy can reach it, add unix to {name}"
    )


def _to_trust(settings: Settings, peer: Any, subject: str) -> str:
    """What to change to trust ``peer`` if it is your proxy: its address, or for a UNIX peer :func:`unix_advice`."""
    if is_unix_peer(peer):
        return unix_advice(settings)
    return f"if {subject} is your proxy, add its address to {settings.name_of('trusted')}"


def untrusted_header(settings: Settings, policy: Policy, peer: Any) -> str:
    """The line for an untrusted peer that sent a PROXY header anyway (the header is not believed).

    What to change depends on ``peer``'s kind: an IP peer's address goes in
    the trust list; a UNIX-socket peer has none (:func:`unix_advice`).
    """
    what = "stays in the stream as payload" if policy is Policy.SKIP else "is removed and not believed"
    advice = _to_trust(settings, peer, "this peer")
    return f"sent a PROXY header but is not trusted ({settings.describe_trusted()}): the header {what}; {advice}"


def refusal_line(
    settings: Settings,
    policy: Policy,
    outcome: Outcome,
    scanner: HeaderScanner | None,
    trusted: bool,
    hooked: bool,
    peer: Any = None,
) -> str:
    """What follows ``<peer>: closed: `` for a connection refused with ``outcome`` under ``policy``.

    What happened (:func:`proxyproto.policy.describe`, from ``scanner``'s
    error and bytes when there was one), then, unless a ``policy_for`` hook
    made the trust decision (``hooked``: the lists were not asked), what to
    change: :func:`rejected` for a header refused by REJECT (worded for
    ``peer``'s kind when given), :func:`missing_header` for a trusted peer
    without one.
    """
    error, seen, start = (None, 0, b"") if scanner is None else (scanner.error, scanner.seen, scanner.start)
    text = describe(policy, outcome, error, seen, settings.header_timeout)
    if hooked:
        return text
    if outcome is Outcome.HEADER:
        return text + rejected(settings, trusted, peer)
    if trusted:
        return text + missing_header(settings, outcome, start)
    return text


def untrusted_look(log: RefusalLog, settings: Settings, peer: Any, listener: object = None) -> Callable[[bytes], None]:
    """For an untrusted peer served under SKIP: a look at its first bytes that says so if they are a header.

    ``listener``: as for :meth:`~proxyproto.refusal_log.RefusalLog.log` (a function is called only then).
    """

    def look(start: bytes) -> None:
        if starts_with_header(start):
            note_untrusted_header(log, settings, peer, Policy.SKIP, listener)

    return look


def note_untrusted_header(
    log: RefusalLog, settings: Settings, peer: Any, policy: Policy, listener: object = None
) -> None:
    """The WARNING for an untrusted peer whose stream or datagram started with a PROXY header (rate-limited)."""
    line = untrusted_header(settings, policy, peer)
    log.log(logging.WARNING, "%s: %s", peer_text(peer), line, kind=KIND_UNTRUSTED_HEADER, listener=listener)


def handed_on(
    log: RefusalLog | None,
    settings: Settings,
    peer: Any,
    policy: Policy,
    header: ProxyHeader | None,
    trusted: bool,
    hooked: bool,
    listener: object = None,
) -> ProxyHeader | None:
    """The header a served connection hands to the application: a trusted peer's, never anyone else's.

    An untrusted peer's header (read and removed under IGNORE) is dropped,
    TLVs and all: its addresses and claims are anyone's.  Unless a
    ``policy_for`` hook chose the policy (the hook has spoken for that peer),
    the drop is noted with :func:`note_untrusted_header`'s WARNING, so an
    operator whose proxy is missing from the trust list learns why (``log``
    None: a server not activated yet, nothing to note with; ``listener``: as
    for :meth:`~proxyproto.refusal_log.RefusalLog.log`).  Every adapter
    calls this where it serves; none decides it on its own.
    """
    if trusted or header is None:
        return header
    if not hooked and log is not None:
        note_untrusted_header(log, settings, peer, policy, listener)
    return None


#: The trust lists warned about by :func:`warn_if_every_peer_trusted` in this process (by list, policy and
#: spelling): a server that makes several factories, or reads its settings again, warns once, as
#: Python's ``warnings`` module warns once per place.
_WARNED: set[tuple[object, ...]] = set()
_EVERY_IPV4 = ipaddress.ip_network("0.0.0.0/0")
_EVERY_IPV6 = ipaddress.ip_network("::/0")


def every_peer_trusted(settings: Settings) -> bool:
    """Whether every IP peer that can connect may set its client address (``trusted`` holds ``0.0.0.0/0`` or
    ``::/0``, as ``"*"`` does, under REQUIRE or USE, with no ``policy_for`` hook deciding instead)."""
    if settings.policy_for is not None or settings.policy not in (Policy.REQUIRE, Policy.USE):
        return False
    networks = settings.trusted.networks
    return _EVERY_IPV4 in networks or _EVERY_IPV6 in networks


def every_peer_warning(settings: Settings) -> str:
    """The WARNING for settings that trust every peer (see :func:`every_peer_trusted`), naming the knob as spelled."""
    described = settings.trusted.describe()
    value = "* (every peer)" if described == "every peer" else described
    return (
        f"{settings.name_of('trusted')} is {value}: any peer that can connect to this listener may set its "
        "client address (and send TLVs the application reads as the proxy's); use it only where nothing but "
        "your proxy can reach the listener, else give your proxy's addresses"
    )


def warn_if_every_peer_trusted(settings: Settings) -> None:
    """Write :func:`every_peer_warning` once per process for such settings; every adapter reaches it at start.

    :func:`policy_line` calls it, and so do the engine's start-up points
    (the asyncio factory and ``start_server``, the socketserver and UDP
    mixins, Tornado's and Twisted's factories), so each adapter warns
    without a line of its own, and once however many of them one server
    makes.
    """
    if not every_peer_trusted(settings):
        return
    key = (settings.name_of("trusted"), settings.trusted, settings.policy)
    if key in _WARNED:
        return
    _WARNED.add(key)
    logger.warning("%s", every_peer_warning(settings))


def policy_line(settings: Settings, tls: bool, detail: str = "") -> str:
    """The INFO line an adapter writes once at start: which policy applies to which peers, and TLS.

    ``detail``: what the adapter adds before the TLS clause (where a setting came from, say).
    Settings that trust every peer also get their WARNING (:func:`warn_if_every_peer_trusted`),
    written here, before the INFO line is returned.
    """
    warn_if_every_peer_trusted(settings)
    after = "; TLS is negotiated after the header" if tls else ""
    if settings.policy_for is not None:
        return f"PROXY header policy decided per connection by policy_for{detail}{after}"
    peers = settings.trusted.describe()
    others = "" if peers == "every peer" else f", {settings.untrusted_policy.name} for other peers"  # none left
    return f"PROXY header policy {settings.policy.name} for {peers}{others}{detail}{after}"


def log_policy(settings: Settings, tls: bool, detail: str = "") -> None:
    """Write :func:`policy_line` at INFO on the ``proxyproto`` logger (and its WARNING, if any): an adapter's start."""
    logger.info("%s", policy_line(settings, tls, detail))
