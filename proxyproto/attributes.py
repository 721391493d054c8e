"""The ``proxy_*`` class attributes of the socketserver mixins: checked where set, read as one :class:`Settings`.

A socketserver server is configured by class attributes, overridable per
subclass or instance, and DESIGN.md promises that a change made at any time
(while ``serve_forever`` runs in another thread included) takes effect from
the next connection.  Trust is where a silently ignored change hurts: a
``proxy_trusted`` narrowed while serving must never leave an untrusted peer
able to set its address.  So:

* :func:`check_setting` refuses an invalid value where it is set (the mixins
  call it from ``__setattr__``), :func:`check_attributes` when the listener
  is activated and when serving starts;
* :class:`LiveSettings` turns the attributes into a
  :class:`~proxyproto.settings.Settings`, rebuilt whenever one of them is no
  longer equal to the value it was built from (a list changed in place
  included); a value that became invalid behind ``__setattr__``'s back (set
  on the class) leaves it in an error state that the mixin logs once and
  answers by refusing every new connection until the value is fixed;
* :class:`SettingsAttributes` is what :class:`~proxyproto.ProxyProtocolMixin`
  and :class:`~proxyproto.udp.ProxyDatagramMixin` share: the checks, the
  default ``proxy_policy_for`` and the start of ``serve_forever``.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import operator
from typing import Any, Callable, ClassVar

from .policy import Address, Policy
from .settings import _CHECKS, _DEFAULTS, PolicyHook, SettingError, Settings, _respelled

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

logger = logging.getLogger("proxyproto")

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
_IMMUTABLE = (str, bytes, tuple, frozenset, type(None))


def check_setting(name: str, value: Any) -> None:
    """``ValueError`` naming the attribute when ``value`` is no valid ``name`` (a ``proxy_*`` attribute).

    The mixins call it where an attribute is set.  Names that are no knob
    (every other attribute, and ``proxy_policy_for``, a method) pass.
    ``proxy_trusted`` must be a string, an ``ipaddress`` object or a list,
    tuple or set of them: it is read again at every change check, which an
    iterator would not survive.
    """
    knob = name[6:] if name.startswith("proxy_") else ""
    if knob not in _CHECKS or knob == "policy_for":
        return
    if knob == "trusted" and value is not None and not isinstance(value, _TRUSTED_FORMS):
        raise ValueError(
            f"{name}: give a string, an ipaddress object, or a list, tuple or set of them, not {type(value).__name__}"
        )
    try:
        _CHECKS[knob](knob, value)
    except SettingError as exc:
        raise _respelled(exc, name) from None


class LiveSettings:
    """A mixin's ``proxy_*`` attributes as a :class:`Settings`, rebuilt whenever one changes.

    :meth:`refresh` runs once per connection (or datagram): when nothing
    changed, one read of the attributes and one comparison (plus a copy's
    comparison for a ``proxy_trusted`` list that may change in place).
    ``names`` are the knobs the owner has as attributes; the others keep
    their defaults.  A value that became invalid (set on the class, which
    the mixin's ``__setattr__`` cannot see) puts it in the error state:
    :attr:`error` is the ``ValueError`` naming the attribute, :attr:`current`
    keeps the last valid settings for what already waits, and the owner
    closes every new connection until it is fixed (:meth:`usable`).
    """

    __slots__ = ("current", "error", "hooked", "names", "read", "reported", "sources", "trusted_copy")

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.read = operator.attrgetter(*(f"proxy_{knob}" for knob in names))
        self.current = _DEFAULTS
        self.error: ValueError | None = None
        self.sources: Any = None
        self.trusted_copy: Any = None
        #: The current error has been logged (and its end will be).
        self.reported = False
        #: A ``proxy_policy_for`` override decided the last connection's trust (set by the owner).
        self.hooked = False

    def refresh(self, owner: Any) -> bool:
        """Re-read ``owner``'s attributes; True when they changed (and :attr:`current` or :attr:`error` with them)."""
        sources = self.read(owner)
        if sources == self.sources:
            trusted = owner.proxy_trusted
            if isinstance(trusted, _IMMUTABLE) or trusted == self.trusted_copy:
                return False
        values = dict(zip(self.names, sources))
        try:
            for knob, value in values.items():
                check_setting(f"proxy_{knob}", value)
            settings = Settings(**values)._spelled("attribute")
        except (ValueError, TypeError) as exc:
            self.error = exc if isinstance(exc, ValueError) else ValueError(f"invalid proxy_* setting: {exc}")
        else:
            self.current, self.error = settings, None
        trusted = values.get("trusted")
        self.trusted_copy = trusted if isinstance(trusted, _IMMUTABLE) else copy.copy(trusted)
        self.sources = sources
        return True

    def usable(self, refusing: str, resuming: str) -> bool:
        """After :meth:`refresh`: False while the settings are invalid, each change of state logged once.

        ``refusing`` and ``resuming`` say what the server does meanwhile and
        afterwards ("closing every new connection", "serving connections").
        """
        if self.error is None:
            if self.reported:
                logger.warning("the proxy_* settings are valid again; %s", resuming)
                self.reported = False
            return True
        if not self.reported:
            logger.error("invalid setting: %s; %s until it is fixed", self.error, refusing)
            self.reported = True
        return False


def check_attributes(owner: object, names: tuple[str, ...]) -> Settings:
    """The :class:`Settings` of ``owner``'s ``proxy_*`` attributes now; ``ValueError`` naming the first invalid one."""
    live = LiveSettings(names)
    live.refresh(owner)
    if live.error is not None:
        raise live.error
    return live.current


class SettingsAttributes:
    """The part of a socketserver mixin that is its ``proxy_*`` attributes (put the mixin first among the bases).

    A subclass names the knobs it has as attributes in ``_proxy_knobs``;
    while serving, :attr:`_proxy_live` holds them as a
    :class:`~proxyproto.settings.Settings`.
    """

    #: The knobs this class has as ``proxy_*`` attributes.
    _proxy_knobs: ClassVar[tuple[str, ...]] = ()
    #: While serving: the attributes as a Settings, re-read per connection (or datagram).
    _proxy_live: LiveSettings | None = None

    socket: Any

    def proxy_policy_for(self, peer: Address, local: Address | None) -> Policy:
        """The policy for a connection (or datagram) from ``peer`` received on ``local``.

        The default applies ``proxy_trusted``: trusted peers (loopback,
        unless it says otherwise) get ``proxy_policy``, the others
        ``proxy_untrusted_policy``; a UNIX-socket peer is trusted when the
        socket's file is not world-writable, or when ``proxy_trusted`` says
        ``unix`` or ``"*"`` (:meth:`proxyproto.Settings.trust`).  Override it
        for anything else; ``local`` is the socket's ``getsockname()``,
        passed only when the method is overridden.  An override's peer
        counts as trusted (its header reaches the handler) when it answers
        REQUIRE or USE.
        """
        live = self._proxy_live or LiveSettings(self._proxy_knobs)
        live.refresh(self)
        if live.error is not None:
            raise live.error
        return live.current.trust(peer, self.socket).policy

    def _proxy_hook(self) -> PolicyHook | None:
        """``proxy_policy_for`` when overridden (on the class or the instance), else None.

        Asked per connection: a hook assigned while serving takes effect,
        like every other setting.
        """
        if type(self).proxy_policy_for is not _DEFAULT_POLICY_FOR or "proxy_policy_for" in self.__dict__:
            return self.proxy_policy_for
        return None

    def __setattr__(self, name: str, value: Any) -> None:
        """Refuse an invalid ``proxy_*`` value where it is set (ValueError naming the attribute)."""
        if name.startswith("proxy_"):
            check_setting(name, value)
        super().__setattr__(name, value)

    def server_activate(self) -> None:
        """Check the ``proxy_*`` attributes before listening, so a mistake surfaces in the constructor."""
        check_attributes(self, self._proxy_knobs)
        super().server_activate()  # type: ignore[misc]

    def _proxy_serve_forever(self, start: Callable[[], object], poll_interval: float) -> None:
        """``serve_forever`` after ``start()`` (which checks the configuration, so a refusal keeps its message).

        When ``start`` fails, ``shutdown()`` must still return: socketserver's
        waits for an event that only a loop which ran sets, so it is set here.
        """
        try:
            start()
        except BaseException:
            shut_down = getattr(self, "_BaseServer__is_shut_down", None)
            if shut_down is not None:
                shut_down.set()
            raise
        super().serve_forever(poll_interval)  # type: ignore[misc]


_DEFAULT_POLICY_FOR = SettingsAttributes.proxy_policy_for
