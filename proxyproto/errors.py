"""The exceptions proxyproto raises on bad input.

Every refusal of the parser is a :class:`ProxyProtocolError`, so a server can
catch one class and close the connection.  The subclasses say which cell of
the policy table applies: a stream that is no header at all
(:class:`NoProxyHeader`) is served under the opt-in policies, whereas a
malformed header (:class:`InvalidHeader`) is refused by every policy.

Errors carry *what* was wrong (``field``) and *where* (``offset`` into the
stream), in the manner of h11, so a log line can say exactly why a peer was
refused.
"""

from __future__ import annotations

__all__ = [
    "ChecksumError",
    "HeaderRejected",
    "HeaderTimeout",
    "InvalidHeader",
    "NoProxyHeader",
    "ProxyProtocolError",
]


class ProxyProtocolError(ValueError):
    """Base of everything the library raises on bad input.

    ``field`` names the part of the header at fault (``"source address"``,
    ``"TLV 0x03"``...) and ``offset`` the byte offset into the stream where the
    problem shows, when either is known.
    """

    def __init__(self, message: str, *, field: str | None = None, offset: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.offset = offset

    def __str__(self) -> str:
        if self.offset is None:
            return self.message
        return f"{self.message} (at byte {self.offset})"


class InvalidHeader(ProxyProtocolError):
    """Malformed, unsupported, over the size limit, or truncated by EOF."""


class NoProxyHeader(InvalidHeader):
    """The stream does not start with either signature (or ended before any byte)."""


class ChecksumError(InvalidHeader):
    """A CRC-32C TLV is present and does not match the header (rule CRC-R4)."""


class HeaderRejected(ProxyProtocolError):
    """A header arrived where the policy forbids one (``Policy.REJECT``)."""


class HeaderTimeout(ProxyProtocolError, TimeoutError):
    """The whole header did not arrive before the deadline (rule T1).

    It is also a :class:`TimeoutError`, so code that handles socket timeouts
    generically keeps working.
    """

    def __init__(self, message: str, *, field: str | None = None, offset: int | None = None) -> None:
        ProxyProtocolError.__init__(self, message, field=field, offset=offset)

    def __str__(self) -> str:
        return ProxyProtocolError.__str__(self)
