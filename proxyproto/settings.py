"""The ``proxy_*`` settings of the server mixins: checked where they are set, noticed when they change.

A server's configuration is a set of class attributes, overridable per
subclass or instance, as ``socketserver`` does it, and DESIGN.md promises
that a change made at any time (while ``serve_forever`` runs in another
thread included) takes effect from the next connection.  Trust is where a
silently ignored change hurts: a ``proxy_trusted`` narrowed while serving
must never leave an untrusted peer able to set its address.  So:

* :func:`check_setting` refuses an invalid value where it is set (the mixins
  call it from ``__setattr__`` and when the listener is activated);
* :class:`TrustSettings` holds what is derived from the three trust
  settings (the parsed networks) and rebuilds it whenever one of them is no
  longer the object, or no longer equal to the copy, it was built from: a
  list changed in place is noticed too.  A value that became invalid behind
  its back (set on the class, which ``__setattr__`` cannot see) leaves it in
  an error state that the mixin logs once and answers by closing every new
  connection until the value is fixed.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import math
import numbers
import operator
from typing import Any

from .policy import Policy, Trust, TrustedNetworks, check_untrusted_policy, policy_named, trust_for

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

logger = logging.getLogger("proxyproto")


#: ``proxy_trusted``'s default (``trusted=`` outside socketserver) in every adapter: the loopback
#: addresses, and the peers of a UNIX socket whose file is not world-writable (gunicorn's
#: ``proxy_allow_ips`` and uvicorn's ``forwarded_allow_ips`` convention).  Nothing trusts the
#: whole Internet unless told ``"*"``.
DEFAULT_TRUSTED = "127.0.0.1,::1"

#: Bounds of ``proxy_header_timeout``, in seconds.  Below a millisecond no proxy's header can
#: arrive; above an hour a parked connection would hold its ``max_pending`` slot for what is
#: certainly a misconfiguration (a proxy sends its header at once), and the loops' timers
#: overflow on values far beyond it (``inf`` never expires at all).
MIN_HEADER_TIMEOUT = 0.001
MAX_HEADER_TIMEOUT = 3600.0
#: Bounds of ``proxy_max_header_size``: a v2 header's fixed part, and the protocol's maximum
#: (16 + a 16-bit length).
MIN_HEADER_SIZE = 16
MAX_HEADER_SIZE = 16 + 0xFFFF


def _real(value: Any) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _check_header_timeout(name: str, value: Any) -> None:
    seconds = _real(value)
    # Written so that nan fails every comparison into the refusal.
    if seconds is None or not MIN_HEADER_TIMEOUT <= seconds <= MAX_HEADER_TIMEOUT:
        raise ValueError(
            f"{name}: must be a number of seconds from {MIN_HEADER_TIMEOUT:g} to {MAX_HEADER_TIMEOUT:g}, got {value!r}"
        )


def _int_in(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"of at least {low}" if high is None else f"from {low} to {high}"
        raise ValueError(f"{name}: must be an integer {bounds}, got {value!r}")


def check_trusted_given(name: str, value: Any) -> None:
    """Refuse ``None`` for the trust setting ``name`` (``proxy_trusted``, ``trusted``), with both its meanings.

    None used to trust every peer, and was the default; the default is now
    loopback only (:data:`DEFAULT_TRUSTED`).  A configuration written for the
    old meaning must not silently change to the new one, nor the reverse, so
    None is refused and the ``ValueError`` says what to write instead.
    """
    if value is None:
        raise ValueError(
            f"{name}=None used to mean every peer; give '*' for every peer or the networks to trust "
            f"(the default, {DEFAULT_TRUSTED!r}, trusts loopback only)"
        )


def check_setting(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming the setting when ``value`` is not valid for ``name``.

    ``proxy_header_timeout``: a number of seconds in
    ``MIN_HEADER_TIMEOUT..MAX_HEADER_TIMEOUT`` (0.001..3600; not nan, not
    inf); ``proxy_max_header_size``: an integer in 16..65551;
    ``proxy_max_pending``: an integer of at least 1; ``proxy_log_rate``:
    None or a finite number >= 0; ``proxy_trusted``: a trust list
    (:class:`~proxyproto.policy.TrustedNetworks`), never None
    (:func:`check_trusted_given`).

    Names this module does not know (every attribute that is not a
    ``proxy_*`` setting) pass unchecked.
    """
    if name == "proxy_policy":
        policy_named(name, value)
    elif name == "proxy_untrusted_policy":
        check_untrusted_policy(value)
    elif name == "proxy_trusted":
        check_trusted_given(name, value)
        if not isinstance(value, _TRUSTED_FORMS):
            # Read again at every change check: an iterator would be used up by this very
            # check, and a view or a custom iterable cannot be copied to notice changes.
            raise ValueError(
                f"proxy_trusted: give a string, an ipaddress object, or a list, tuple or set of them, "
                f"not {type(value).__name__}"
            )
        TrustedNetworks(value)
    elif name == "proxy_header_timeout":
        _check_header_timeout(name, value)
    elif name == "proxy_max_header_size":
        _int_in(name, value, MIN_HEADER_SIZE, MAX_HEADER_SIZE)
    elif name == "proxy_max_pending":
        _int_in(name, value, 1)
    elif name == "proxy_log_rate":
        rate = _real(value)
        if value is not None and (rate is None or not 0 <= rate < math.inf):  # nan fails both
            raise ValueError(f"proxy_log_rate: must be None or a finite number of lines per second >= 0, got {value!r}")


def check_settings(owner: object, names: tuple[str, ...]) -> None:
    """:func:`check_setting` for each of ``names`` as ``owner`` has it now."""
    for name in names:
        if hasattr(owner, name):
            check_setting(name, getattr(owner, name))


def adapter_settings(
    *,
    policy: Policy | str,
    trusted: Any,
    untrusted_policy: Policy | str,
    header_timeout: float,
    max_header_size: int,
    max_pending: int,
    log_rate: float | None,
) -> tuple[Policy, Policy, TrustedNetworks]:
    """Check the knobs every adapter takes (the mixin's settings without ``proxy_``).

    The asyncio, uvicorn, aiohttp, hypercorn and waitress adapters take
    their settings once, when they are built: this is the one place that
    checks them, with the mixin's rules, and the ``ValueError`` names the
    knob as the adapter spells it.  Returns the policy for trusted peers,
    the policy for the others, and the trusted networks.  ``trusted=None``
    is refused (:func:`check_trusted_given`): it used to mean every peer.
    """
    try:
        check_trusted_given("proxy_trusted", trusted)
        for name, value in (
            ("proxy_header_timeout", header_timeout),
            ("proxy_max_header_size", max_header_size),
            ("proxy_max_pending", max_pending),
            ("proxy_log_rate", log_rate),
        ):
            check_setting(name, value)
        return (
            policy_named("proxy_policy", policy),
            check_untrusted_policy(untrusted_policy),
            TrustedNetworks(trusted),
        )
    except ValueError as exc:
        raise ValueError(str(exc).replace("proxy_", "", 1)) from None


_IMMUTABLE = (str, bytes, tuple, frozenset, type(None))
_TRUSTED_FORMS = (
    str,
    bytes,
    list,
    tuple,
    set,
    frozenset,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
)


class TrustSettings:
    """``proxy_policy``, ``proxy_trusted`` and ``proxy_untrusted_policy``, parsed, and kept current.

    :meth:`refresh` is called once per connection (or datagram); when
    nothing changed it costs three attribute reads and three identity
    checks (plus an equality check for a mutable ``proxy_trusted``).
    ``checked`` names further settings that the owner reads live where it
    uses them (``proxy_max_pending``, say): they are compared as a tuple,
    and a value that became invalid (set on the class, behind
    ``__setattr__``'s back) puts the settings in the error state too.
    """

    __slots__ = ("checked", "checked_values", "parsed", "read_checked", "reported", "sources", "trusted_copy")

    def __init__(self, checked: tuple[str, ...] = ()) -> None:
        self.checked = checked
        self.checked_values: Any = None
        # One C call reads them all (a per-connection cost: ~0.1 us instead of ~0.4 us).
        self.read_checked = operator.attrgetter(*checked) if checked else None
        #: (policy, untrusted policy, trusted networks or None, the ValueError of an invalid
        #: configuration or None): one tuple, replaced whole, so that a thread calling
        #: ``proxy_policy_for`` while the loop refreshes never sees half of a change.
        self.parsed: tuple[Policy, Policy, TrustedNetworks | None, ValueError | None] = (
            Policy.REQUIRE,
            Policy.SKIP,
            None,
            None,
        )
        self.sources: tuple[Any, Any, Any] = (object(), object(), object())
        self.trusted_copy: Any = None
        #: The current error has been logged (and its end will be).
        self.reported = False

    @property
    def error(self) -> ValueError | None:
        """The ValueError of the current, invalid configuration; None when valid."""
        return self.parsed[3]

    def refresh(self, owner: Any) -> bool:
        """Re-read ``owner``'s three settings if any changed; True when they changed."""
        policy, trusted, untrusted = owner.proxy_policy, owner.proxy_trusted, owner.proxy_untrusted_policy
        sources = self.sources
        read_checked = self.read_checked
        checked = None if read_checked is None else read_checked(owner)
        if (
            policy is sources[0]
            and trusted is sources[1]
            and untrusted is sources[2]
            and checked == self.checked_values
            and (isinstance(trusted, _IMMUTABLE) or trusted == self.trusted_copy)
        ):
            return False
        parsed: tuple[Policy, Policy, TrustedNetworks | None, ValueError | None]
        try:
            check_setting("proxy_trusted", trusted)
            parsed = (
                policy_named("proxy_policy", policy),
                check_untrusted_policy(untrusted),
                None if trusted is None else TrustedNetworks(trusted),
                None,
            )
            check_settings(owner, self.checked)
        except (ValueError, TypeError) as exc:
            error = exc if isinstance(exc, ValueError) else ValueError(f"invalid proxy_* setting: {exc}")
            parsed = (Policy.REQUIRE, Policy.SKIP, None, error)
        # The parsed state first, the sources it came from last: a concurrent refresh that
        # sees the new sources also sees their parsed state.
        self.parsed = parsed
        self.checked_values = checked
        self.trusted_copy = trusted if isinstance(trusted, _IMMUTABLE) else copy.copy(trusted)
        self.sources = (policy, trusted, untrusted)
        return True

    def usable(self, refusing: str, resuming: str) -> bool:
        """After :meth:`refresh`: False while the settings are invalid, each change of state logged once.

        ``refusing`` and ``resuming`` say what the server does meanwhile and
        afterwards ("closing every new connection", "serving connections").
        """
        error = self.error
        if error is None:
            if self.reported:
                logger.warning("the proxy_* settings are valid again; %s", resuming)
                self.reported = False
            return True
        if not self.reported:
            logger.error("invalid setting: %s; %s until it is fixed", error, refusing)
            self.reported = True
        return False

    def trust(self, peer: Any, unix: str | None) -> Trust:
        """The default ``proxy_policy_for``'s decision for ``peer`` (:func:`~proxyproto.policy.trust_for`).

        ``unix``: None on an IP socket, else what the UNIX socket's
        permissions say (:func:`proxyproto.peers.unix_access`).
        """
        policy, untrusted, trusted, _ = self.parsed
        return trust_for(policy, untrusted, trusted, peer, unix)
