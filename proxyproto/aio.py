"""asyncio: read the PROXY header from a ``StreamReader``, and servers that do it for you.

:func:`read_header` drives the same sans-I/O core as the blocking
:func:`proxyproto.read_header`, with the same outcomes and exceptions (the
policy table of :mod:`proxyproto.policy`).  It looks at the bytes already in
the ``StreamReader``'s buffer without consuming them, and consumes exactly
the header once it is complete; everything after the header (or, under the
opt-in policies, a stream that is no header at all) stays in the reader for
the application.  Peeking needs three private attributes of
``asyncio.StreamReader`` (``_buffer``, ``_eof``, ``_wait_for_data``), unchanged
from Python 3.4 to 3.13; a test pins them.

:func:`start_server` and :func:`start_unix_server` wrap ``asyncio.start_server``
and ``asyncio.start_unix_server``: each connection reads its header in its own
task (a slow or silent client never delays another), refusals are closed and
logged as the socketserver mixin logs them, and the callback receives
``(reader, writer)`` where ``writer`` is a :class:`ProxyStreamWriter`:

* ``writer.get_extra_info("peername")``: the real client (the header's
  source, in the socket module's shape) when the policy uses the header's
  addresses; otherwise the socket's own peer, as without a proxy;
* ``writer.get_extra_info("proxy_header")``: the parsed header, or None;
* ``writer.get_extra_info("proxy_peername")``: the socket's own peer (the proxy).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from typing import Any, Callable, Union

from . import reader as core
from .errors import (
    InvalidHeader,
    NoProxyHeader,
    ProxyProtocolError,
)
from .header import ProxyHeader
from .policy import (
    Outcome,
    Policy,
    TrustedNetworks,
    client_address_of,
    decide,
    describe,
    peer_text,
    refusal,
    uses_addresses,
)

__all__ = ["ProxyStreamWriter", "read_header", "start_server", "start_unix_server"]

logger = logging.getLogger("proxyproto")

ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]
#: ``policy_for(peer, local) -> Policy``: the mixin's ``proxy_policy_for`` hook, as a function.
PolicyHook = Callable[[Any, Any], Union[Policy, str]]


class _Attempt:
    """One stream's header: peek at the reader's buffer, decide, consume exactly."""

    __slots__ = ("allow_v4_in_tcp6", "error", "header", "max_size", "outcome", "policy", "reader", "seen", "verify")

    def __init__(
        self,
        reader: asyncio.StreamReader,
        policy: Policy,
        *,
        max_size: int | None = None,
        verify_checksum: bool = True,
        allow_v4_in_tcp6: bool = False,
    ) -> None:
        self.reader = reader
        self.policy = policy
        self.max_size = core.MAX_V2_LENGTH if max_size is None else max_size
        self.verify = verify_checksum
        self.allow_v4_in_tcp6 = allow_v4_in_tcp6
        self.seen = 0
        self.outcome: Outcome | None = None
        self.header: ProxyHeader | None = None
        self.error: ProxyProtocolError | None = None

    def _fail(self, outcome: Outcome, error: ProxyProtocolError) -> None:
        self.outcome = outcome
        self.error = error

    async def run(self) -> None:
        """Wait until the outcome is known; ``OSError`` from the transport propagates."""
        reader = self.reader
        cap = max(self.max_size, core.MAX_V1_LENGTH)
        while True:
            failure = reader.exception()
            if failure is not None:
                raise failure
            data = bytes(reader._buffer[:cap])  # type: ignore[attr-defined]
            if len(data) > self.seen:
                try:
                    size = core.measure(data, self.max_size)
                except NoProxyHeader as exc:
                    return self._fail(Outcome.NO_HEADER, exc)
                except InvalidHeader as exc:
                    return self._fail(Outcome.INVALID, exc)
                if size > 0:
                    try:
                        self.header = core.decode(data, size, self.verify, self.allow_v4_in_tcp6)
                    except ProxyProtocolError as exc:
                        return self._fail(Outcome.INVALID, exc)
                    await reader.readexactly(size)  # already buffered: returns at once
                    self.outcome = Outcome.HEADER
                    return None
                self.seen = len(data)
            if reader._eof:  # type: ignore[attr-defined]
                if self.seen:
                    return self._fail(
                        Outcome.INVALID,
                        InvalidHeader(f"header truncated by EOF after {self.seen} byte(s)", offset=self.seen),
                    )
                self.outcome = Outcome.EOF
                return None
            await reader._wait_for_data("read_header")  # type: ignore[attr-defined]

    def timed_out(self) -> None:
        self.outcome = Outcome.PARTIAL if self.seen else Outcome.SILENT

    def describe(self, timeout: float) -> str:
        """One line saying what happened (the mixin's wording)."""
        assert self.outcome is not None
        return describe(self.policy, self.outcome, self.error, self.seen, timeout)

    def exception(self, timeout: float) -> ProxyProtocolError:
        assert self.outcome is not None
        return refusal(self.policy, self.outcome, self.error, self.seen, timeout)


async def _attempt(
    reader: asyncio.StreamReader, policy: Policy, timeout: float, parse_options: dict[str, Any]
) -> _Attempt:
    attempt = _Attempt(reader, policy, **parse_options)
    try:
        await asyncio.wait_for(attempt.run(), timeout)
    except asyncio.TimeoutError:
        attempt.timed_out()
    return attempt


async def read_header(
    reader: asyncio.StreamReader,
    *,
    timeout: float = 10.0,
    policy: Policy | str = Policy.REQUIRE,
    **parse_options: Any,
) -> ProxyHeader | None:
    """Read the PROXY header at the start of ``reader``, waiting at most ``timeout`` seconds in all.

    Consumes exactly the header; the bytes after it (and, where the policy
    serves a stream without a header, every byte) stay in ``reader``.
    Returns the header, or None where the policy serves a stream without one
    (SKIP never looks).  Raises, where the policy closes: :class:`NoProxyHeader`,
    :class:`InvalidHeader`, :class:`ChecksumError`, :class:`HeaderRejected`,
    :class:`HeaderTimeout`, exactly as :func:`proxyproto.read_header` does.
    ``OSError`` from the transport passes through.  ``parse_options`` are
    those of :func:`proxyproto.parse`.
    """
    policy = Policy(policy)
    if policy is Policy.SKIP:
        return None
    attempt = await _attempt(reader, policy, timeout, parse_options)
    assert attempt.outcome is not None
    if not decide(policy, attempt.outcome).serve:
        raise attempt.exception(timeout)
    return attempt.header


class ProxyStreamWriter(asyncio.StreamWriter):
    """A ``StreamWriter`` whose ``get_extra_info`` knows what the PROXY header said.

    ``"peername"``: the real client when the header's addresses are used,
    else the socket's peer; ``"proxy_header"``: the header or None;
    ``"proxy_peername"``: the socket's own peer (the proxy).  Every other key
    is the transport's.
    """

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        reader: asyncio.StreamReader,
        header: ProxyHeader | None,
        peername: Any,
    ) -> None:
        # The transport and protocol of the stream asyncio made: writes, drain,
        # close and start_tls behave exactly as on the original writer.
        super().__init__(writer.transport, writer._protocol, reader, asyncio.get_running_loop())  # type: ignore[attr-defined]
        self._proxy_extra = {
            "peername": peername,
            "proxy_header": header,
            "proxy_peername": writer.get_extra_info("peername"),
        }

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._proxy_extra:
            return self._proxy_extra[name]
        return super().get_extra_info(name, default)


class _Acceptor:
    """The callback ``asyncio.start_server`` runs per connection: header first, then the user's."""

    def __init__(
        self,
        client_connected_cb: ClientConnected,
        *,
        policy: Policy | str,
        trusted: Any | None,
        untrusted_policy: Policy | str,
        header_timeout: float,
        max_header_size: int,
        verify_checksum: bool,
        allow_v4_in_tcp6: bool,
        policy_for: PolicyHook | None,
    ) -> None:
        self.callback = client_connected_cb
        self.hook = policy_for
        self.policy = Policy(policy)
        self.untrusted_policy = Policy(untrusted_policy)
        if self.untrusted_policy in (Policy.USE, Policy.REQUIRE):
            raise ValueError(
                "untrusted_policy: USE and REQUIRE would let untrusted peers set their address; "
                "use SKIP, IGNORE or REJECT"
            )
        self.trusted = None if trusted is None else TrustedNetworks(trusted)
        self.timeout = header_timeout
        self.options = {
            "max_size": max_header_size,
            "verify_checksum": verify_checksum,
            "allow_v4_in_tcp6": allow_v4_in_tcp6,
        }

    def policy_for(self, peer: Any, writer: asyncio.StreamWriter) -> Policy:
        if self.hook is not None:
            return Policy(self.hook(peer, writer.get_extra_info("sockname")))
        if self.trusted is None or not isinstance(peer, tuple) or peer[0] in self.trusted:
            return self.policy
        return self.untrusted_policy

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        policy = self.policy_for(peer, writer)
        header: ProxyHeader | None = None
        if policy is not Policy.SKIP:
            try:
                attempt = await _attempt(reader, policy, self.timeout, self.options)
            except OSError as exc:
                logger.info("%s: closed: %s while reading the PROXY header", peer_text(peer), exc)
                writer.close()
                return
            assert attempt.outcome is not None
            verdict = decide(policy, attempt.outcome)
            if not verdict.serve:
                logger.log(verdict.level, "%s: closed: %s", peer_text(peer), attempt.describe(self.timeout))
                writer.close()
                return
            header = attempt.header
        address = client_address_of(header) if header is not None and uses_addresses(policy, header) else peer
        result = self.callback(reader, ProxyStreamWriter(writer, reader, header, address))
        if inspect.isawaitable(result):
            await result


async def start_server(
    client_connected_cb: ClientConnected,
    host: Any = None,
    port: int | None = None,
    *,
    policy: Policy | str = Policy.REQUIRE,
    trusted: Any | None = None,
    untrusted_policy: Policy | str = Policy.SKIP,
    header_timeout: float = 10.0,
    max_header_size: int = 4096,
    verify_checksum: bool = True,
    allow_v4_in_tcp6: bool = False,
    policy_for: PolicyHook | None = None,
    **kwargs: Any,
) -> asyncio.Server:
    """``asyncio.start_server`` whose connections start with a PROXY header.

    The knobs are the mixin's, without the ``proxy_`` prefix; ``kwargs`` go to
    ``asyncio.start_server`` (``ssl=`` included: TLS is negotiated before the
    header is read, which suits a TLS-terminating proxy in front, not
    ``send-proxy`` in front of TLS passthrough).  ``client_connected_cb`` gets
    ``(reader, writer)`` with ``writer`` a :class:`ProxyStreamWriter`.
    ``policy_for(peer, local)``, when given, replaces ``policy``, ``trusted``
    and ``untrusted_policy`` with a decision per connection (the mixin's
    ``proxy_policy_for`` hook).  Raises ``ValueError`` for an
    ``untrusted_policy`` of USE or REQUIRE.
    """
    acceptor = _Acceptor(
        client_connected_cb,
        policy=policy,
        trusted=trusted,
        untrusted_policy=untrusted_policy,
        header_timeout=header_timeout,
        max_header_size=max_header_size,
        verify_checksum=verify_checksum,
        allow_v4_in_tcp6=allow_v4_in_tcp6,
        policy_for=policy_for,
    )
    return await asyncio.start_server(acceptor, host, port, **kwargs)


async def start_unix_server(
    client_connected_cb: ClientConnected,
    path: str | os.PathLike[str] | None = None,
    *,
    policy: Policy | str = Policy.REQUIRE,
    trusted: Any | None = None,
    untrusted_policy: Policy | str = Policy.SKIP,
    header_timeout: float = 10.0,
    max_header_size: int = 4096,
    verify_checksum: bool = True,
    allow_v4_in_tcp6: bool = False,
    policy_for: PolicyHook | None = None,
    **kwargs: Any,
) -> asyncio.Server:
    """``asyncio.start_unix_server`` whose connections start with a PROXY header.

    As :func:`start_server`; UNIX-socket peers are always trusted (file
    permissions are their access control), so ``trusted`` changes nothing here.
    """
    acceptor = _Acceptor(
        client_connected_cb,
        policy=policy,
        trusted=trusted,
        untrusted_policy=untrusted_policy,
        header_timeout=header_timeout,
        max_header_size=max_header_size,
        verify_checksum=verify_checksum,
        allow_v4_in_tcp6=allow_v4_in_tcp6,
        policy_for=policy_for,
    )
    return await asyncio.start_unix_server(acceptor, path, **kwargs)
