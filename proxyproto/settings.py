"""The knobs of a listener as one frozen, checked value: :class:`Settings`, where trust is decided.

Every adapter holds a :class:`Settings`.  It is built, and every knob is
checked, in one place whatever the source:

* keyword arguments (``start_server(..., trusted="10.0.0.0/8")``,
  :func:`settings_for`), errors naming the knob (``trusted: ...``);
* the ``proxy_*`` class attributes of the socketserver mixins
  (:class:`proxyproto.attributes.LiveSettings`, re-read per connection as
  DESIGN.md decides: a change made while serving takes effect from the next
  connection), errors naming the attribute (``proxy_trusted: ...``);
* the environment (:func:`settings_from_environment`, what
  ``proxyproto.uvicorn`` reads), errors naming the variable.

:meth:`Settings.trust` is the library's only trust decision: a user's
``policy_for`` hook when there is one, else ``policy`` for the peers in
``trusted`` and ``untrusted_policy`` for the others.
"""

from __future__ import annotations

import difflib
import logging
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any, Callable, Union

from .peers import unix_access
from .policy import UNIX_ANY, UNIX_RESTRICTED, Address, Policy, Trust, TrustedNetworks
from .reader import HeaderScanner
from .refusal_log import DEFAULT_LOG_RATE

__all__ = ["settings_from_environment"]  # Settings is public as proxyproto.Settings (docs/api.rst)

logger = logging.getLogger("proxyproto")

#: ``policy_for(peer, local) -> Policy``: a decision per connection in place of the three trust knobs.
PolicyHook = Callable[[Address, Address], Union[Policy, str]]

#: ``trusted``'s default in every adapter: the loopback addresses, and the peers of a UNIX socket
#: whose file is not world-writable (gunicorn's ``proxy_allow_ips`` and uvicorn's
#: ``forwarded_allow_ips`` convention).  Nothing trusts the whole Internet unless told ``"*"``.
DEFAULT_TRUSTED = "127.0.0.1,::1"

#: Bounds of ``header_timeout``, in seconds: below a millisecond no proxy's header can arrive;
#: above an hour a waiting connection would hold its ``max_pending`` slot for what is surely a
#: misconfiguration, and the loops' timers overflow far beyond it (``inf`` never expires).
MIN_HEADER_TIMEOUT = 0.001
MAX_HEADER_TIMEOUT = 3600.0
#: Bounds of ``max_header_size``: a v2 header's fixed part, and the protocol's maximum (16 + 0xFFFF).
MIN_HEADER_SIZE = 16
MAX_HEADER_SIZE = 16 + 0xFFFF

#: The knobs, in the order of docs/configuration.rst's table.
KNOBS = (
    "policy",
    "trusted",
    "untrusted_policy",
    "policy_for",
    "header_timeout",
    "max_header_size",
    "verify_checksum",
    "allow_v4_in_tcp6",
    "max_pending",
    "log_rate",
)


class SettingError(ValueError):
    """A knob's value refused: ``knob`` (its bare name) and ``reason``; :func:`_respelled` renames the knob."""

    def __init__(self, knob: str, reason: str, separator: str = ": ") -> None:
        super().__init__(f"{knob}{separator}{reason}")
        self.knob, self.reason, self.separator = knob, reason, separator


# -- the checks, one per knob: the value as Settings keeps it, or SettingError ----------------------


def _policy(knob: str, value: Any) -> Policy:
    if type(value) is Policy:
        return value
    try:
        return Policy(value)
    except ValueError:
        choices = ", ".join(policy.name for policy in Policy)
        raise SettingError(knob, f"{value!r} is not a policy (one of {choices})") from None


def _untrusted_policy(knob: str, value: Any) -> Policy:
    policy = _policy(knob, value)
    if policy is Policy.USE or policy is Policy.REQUIRE:
        raise SettingError(
            knob, "USE and REQUIRE would let untrusted peers set their address; use SKIP, IGNORE or REJECT"
        )
    return policy


def _trusted(knob: str, value: Any) -> TrustedNetworks:
    if value is None:  # the old default's meaning must not change silently in either direction
        raise SettingError(
            knob,
            "None used to mean every peer; give '*' for every peer or the networks to trust "
            f"(the default, {DEFAULT_TRUSTED!r}, trusts loopback only)",
            separator="=",
        )
    if isinstance(value, TrustedNetworks):
        return value
    try:
        return TrustedNetworks(value)
    except (ValueError, TypeError) as exc:
        raise SettingError(knob, str(exc)) from None


def _real(value: Any) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _header_timeout(knob: str, value: Any) -> float:
    seconds = _real(value)
    if seconds is None or not MIN_HEADER_TIMEOUT <= seconds <= MAX_HEADER_TIMEOUT:  # nan fails both
        raise SettingError(
            knob, f"must be a number of seconds from {MIN_HEADER_TIMEOUT:g} to {MAX_HEADER_TIMEOUT:g}, got {value!r}"
        )
    return seconds


def _integer(low: int, high: int | None) -> Callable[[str, Any], int]:
    def check(knob: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            bounds = f"of at least {low}" if high is None else f"from {low} to {high}"
            raise SettingError(knob, f"must be an integer {bounds}, got {value!r}")
        return int(value)

    return check


def _flag(knob: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SettingError(knob, f"must be True or False, got {value!r}")
    return value


def _hook(knob: str, value: Any) -> PolicyHook | None:
    if value is not None and not callable(value):
        raise SettingError(knob, f"must be None or a function (peer, local) -> Policy, got {value!r}")
    return value  # type: ignore[no-any-return]


def _log_rate(knob: str, value: Any) -> float | None:
    if value is None:
        return None
    rate = _real(value)
    if rate is None or not 0 <= rate < math.inf:  # nan fails both
        raise SettingError(knob, f"must be None or a finite number of lines per second >= 0, got {value!r}")
    return rate


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "policy": _policy,
    "trusted": _trusted,
    "untrusted_policy": _untrusted_policy,
    "policy_for": _hook,
    "header_timeout": _header_timeout,
    "max_header_size": _integer(MIN_HEADER_SIZE, MAX_HEADER_SIZE),
    "verify_checksum": _flag,
    "allow_v4_in_tcp6": _flag,
    "max_pending": _integer(1, None),
    "log_rate": _log_rate,
}


class Settings:
    """The knobs of one listener (or of several sharing them), checked, immutable.

    The meanings and defaults are docs/configuration.rst's table:
    ``policy`` (for trusted peers), ``trusted`` (loopback by default;
    networks, ``"*"``, ``""``; None refused), ``untrusted_policy`` (SKIP,
    IGNORE or REJECT), ``policy_for`` (a hook replacing those three),
    ``header_timeout``, ``max_header_size``, ``verify_checksum``,
    ``allow_v4_in_tcp6``, ``max_pending``, ``log_rate``.  Values are kept
    normalised (a :class:`~proxyproto.policy.Policy`, a
    :class:`~proxyproto.policy.TrustedNetworks`, a float); an invalid one
    raises ``ValueError`` naming the knob.  :meth:`replace` makes a changed copy.
    """

    __slots__ = (*KNOBS, "_spelling", "_trusted_verdict", "_untrusted_verdict", "_ip_verdicts")

    policy: Policy
    trusted: TrustedNetworks
    untrusted_policy: Policy
    policy_for: PolicyHook | None
    header_timeout: float
    max_header_size: int
    verify_checksum: bool
    allow_v4_in_tcp6: bool
    max_pending: int
    log_rate: float | None
    _spelling: str
    _trusted_verdict: Trust
    _untrusted_verdict: Trust
    _ip_verdicts: dict[str, bool] | None

    def __init__(
        self,
        *,
        policy: Policy | str = Policy.REQUIRE,
        trusted: Any = DEFAULT_TRUSTED,
        untrusted_policy: Policy | str = Policy.SKIP,
        policy_for: PolicyHook | None = None,
        header_timeout: float = 10.0,
        max_header_size: int = 4096,
        verify_checksum: bool = True,
        allow_v4_in_tcp6: bool = False,
        max_pending: int = 256,
        log_rate: float | None = DEFAULT_LOG_RATE,
    ) -> None:
        given = locals()
        for knob in KNOBS:
            object.__setattr__(self, knob, _CHECKS[knob](knob, given[knob]))
        # The two answers of the default rule, made once (a Trust per connection costs a call).
        object.__setattr__(self, "_trusted_verdict", Trust(self.policy, True))
        object.__setattr__(self, "_untrusted_verdict", Trust(self.untrusted_policy, False))
        # The trust list's memory of IP peers it has judged, when no hook answers instead.
        object.__setattr__(self, "_ip_verdicts", self.trusted.verdicts if self.policy_for is None else None)
        object.__setattr__(self, "_spelling", "keyword")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Settings are immutable: use settings.replace({name}=...)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Settings are immutable")

    def values(self) -> dict[str, Any]:
        """Every knob and its value, in :data:`KNOBS` order."""
        return {knob: getattr(self, knob) for knob in KNOBS}

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (checked as the constructor checks them)."""
        return Settings(**{**self.values(), **changes})._spelled(self._spelling)

    def _spelled(self, spelling: str) -> Settings:
        """These settings, their knobs named in log lines as ``spelling`` says (see :meth:`name_of`); made here."""
        object.__setattr__(self, "_spelling", spelling)
        return self

    def name_of(self, knob: str) -> str:
        """``knob`` as the user spelled it where these settings came from, for a log line that says what to change.

        ``trusted`` for keywords, ``proxy_trusted`` for a mixin's attributes,
        ``PROXYPROTO_ALLOW_IPS`` for the environment.
        """
        if self._spelling == "attribute":
            return f"proxy_{knob}"
        if self._spelling == "environment":
            return VARIABLES.get(knob, knob)
        return knob

    def describe_trusted(self) -> str:
        """``trusted`` for a log line: its name as spelled, its value, and whether that is the default."""
        default = " (the default)" if self.trusted == _DEFAULTS.trusted else ""
        return f"{self.name_of('trusted')} is {self.trusted.describe()}{default}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Settings):
            return NotImplemented
        return all(getattr(self, knob) == getattr(other, knob) for knob in KNOBS)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, knob) for knob in KNOBS))

    def __repr__(self) -> str:
        changed = [f"{knob}={value!r}" for knob, value in self.values().items() if value != getattr(_DEFAULTS, knob)]
        return f"Settings({', '.join(changed)})"

    def trust(self, peer: Address, sock: Any, hook: PolicyHook | None = None, family: int | None = None) -> Trust:
        """The decision for a connection (or datagram) from ``peer`` on ``sock``: its policy, and whether it is trusted.

        This is the library's only trust decision.  ``trusted`` says whether
        a header the connection sends may reach the application: a header
        from an untrusted peer never does, under any policy.

        With a hook (``hook``, an adapter's own such as a mixin's overridden
        ``proxy_policy_for``; else the ``policy_for`` knob): its answer for
        ``(peer, sock.getsockname())``, the peer trusted when that is REQUIRE
        or USE (the policies that take a header's addresses); whatever the
        hook raises propagates (the adapter closes that connection), and an
        answer that is no policy raises ``ValueError``.

        Without one: ``policy`` for a trusted peer, ``untrusted_policy`` for
        the others.  An IP peer is trusted when its address is in
        ``trusted`` (one whose address the loop could not tell never is).  A
        UNIX-socket peer is trusted when ``trusted`` holds the ``unix`` token
        or ``"*"``, or when ``trusted`` is any other non-empty list and the
        socket file is not world-writable (:func:`~proxyproto.peers.unix_access`:
        an abstract or unnamed socket is anyone's); ``""`` trusts no one.
        Which kind the peer is: ``family``, the socket's real family, when
        the adapter knows it (waitress names UNIX peers with a tuple);
        otherwise an IP tuple is an IP peer and anything else asks ``sock``.
        """
        if hook is None:
            verdicts = self._ip_verdicts
            if verdicts is not None and family is None and type(peer) is tuple:
                verdict = verdicts.get(peer[0])  # an IP peer judged before: the same answer, at once
                if verdict is not None:
                    return self._trusted_verdict if verdict else self._untrusted_verdict
            hook = self.policy_for
        if hook is not None:
            answer = hook(peer, None if sock is None else sock.getsockname())
            policy = answer if type(answer) is Policy else Policy(answer)
            return Trust(policy, policy is Policy.REQUIRE or policy is Policy.USE)
        if family is None and type(peer) is tuple:
            unix = None
        else:
            unix = unix_access(sock, family) if sock is not None else None
        trusted = self.trusted
        if unix is None:
            if type(peer) is not tuple:
                return self._untrusted_verdict  # an IP peer the loop could not tell
            host = peer[0]
            verdict = trusted.verdicts.get(host)  # the list's memory of this peer, without a call
            ok = (host in trusted) if verdict is None else verdict
        else:
            ok = trusted.unix == UNIX_ANY or (trusted.unix == UNIX_RESTRICTED and unix == UNIX_RESTRICTED)
        return self._trusted_verdict if ok else self._untrusted_verdict

    def scanner(self, *, required: bool = False) -> HeaderScanner:
        """A :class:`~proxyproto.reader.HeaderScanner` for one header, with these settings' options."""
        return HeaderScanner(
            max_size=self.max_header_size,
            verify_checksum=self.verify_checksum,
            allow_v4_in_tcp6=self.allow_v4_in_tcp6,
            required=required,
        )


_DEFAULTS = Settings()


def _respelled(error: SettingError, name: str) -> ValueError:
    """``error`` with its knob spelled ``name`` (an attribute, a variable and its text)."""
    return ValueError(f"{name}{error.separator}{error.reason}")


def split_knobs(keywords: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``keywords`` split in two: the knobs (and ``settings``), and everything else (the host's own)."""
    knobs: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for name, value in keywords.items():
        (knobs if name in _CHECKS or name == "settings" else rest)[name] = value
    return knobs, rest


def settings_for(settings: Settings | None = None, knobs: Mapping[str, Any] | None = None) -> Settings:
    """An adapter's settings: ``settings`` (default: :class:`Settings`'s defaults) with ``knobs`` replacing values.

    ``knobs`` are the adapter's keyword arguments; a name that is no knob
    raises ``TypeError`` as an unknown keyword does, an invalid value
    ``ValueError`` naming the knob.
    """
    base = _DEFAULTS if settings is None else settings
    if not isinstance(base, Settings):
        raise TypeError(f"settings= must be a proxyproto.Settings, not {type(base).__name__}")
    if not knobs:
        return base
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r} (the knobs are: {', '.join(KNOBS)})")
    return base.replace(**knobs)


# -- the environment ------------------------------------------------------------------------------

#: The environment variables :func:`settings_from_environment` reads, and their defaults.
ENVIRONMENT: dict[str, str] = {
    "PROXYPROTO_POLICY": "REQUIRE",
    "PROXYPROTO_ALLOW_IPS": DEFAULT_TRUSTED,
    "PROXYPROTO_UNTRUSTED_POLICY": "SKIP",
    "PROXYPROTO_HEADER_TIMEOUT": "10",
    "PROXYPROTO_MAX_HEADER_SIZE": "4096",
    "PROXYPROTO_VERIFY_CHECKSUM": "true",
    "PROXYPROTO_ALLOW_V4_IN_TCP6": "false",
    "PROXYPROTO_MAX_PENDING": "256",
    "PROXYPROTO_LOG_RATE": str(DEFAULT_LOG_RATE),
}
#: Each knob's variable (``trusted`` is ``PROXYPROTO_ALLOW_IPS``, after gunicorn's ``proxy_allow_ips``).
VARIABLES = {
    "policy": "PROXYPROTO_POLICY",
    "trusted": "PROXYPROTO_ALLOW_IPS",
    "untrusted_policy": "PROXYPROTO_UNTRUSTED_POLICY",
    "header_timeout": "PROXYPROTO_HEADER_TIMEOUT",
    "max_header_size": "PROXYPROTO_MAX_HEADER_SIZE",
    "verify_checksum": "PROXYPROTO_VERIFY_CHECKSUM",
    "allow_v4_in_tcp6": "PROXYPROTO_ALLOW_V4_IN_TCP6",
    "max_pending": "PROXYPROTO_MAX_PENDING",
    "log_rate": "PROXYPROTO_LOG_RATE",
}
#: The prefix of the variables; any other variable with it is refused (:func:`unknown_variables`),
#: so a misspelled one (``PROXYPROTO_TRUSTED``) stops the server instead of being ignored.
PREFIX = "PROXYPROTO_"
#: Variables with the prefix that are not knobs and are never refused: the project's own
#: (``PROXYPROTO_MINIMAL_INSTALL=1``: its CI runs the tests without the optional packages).
#: docs/configuration.rst lists them; a new one is added here and there.
NOT_KNOBS = frozenset({"PROXYPROTO_MINIMAL_INSTALL"})
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _from_text(knob: str, text: str) -> Any:
    """A variable's text as the knob's value (SettingError when it is none)."""
    if knob in ("policy", "untrusted_policy"):
        return text.upper()
    if knob == "trusted":
        return text
    if knob in ("verify_checksum", "allow_v4_in_tcp6"):
        if text.lower() in _TRUE or text.lower() in _FALSE:
            return text.lower() in _TRUE
        raise SettingError(knob, "not a boolean (true or false, 1 or 0, yes or no, on or off)")
    if knob == "log_rate" and text.lower() == "none":
        return None
    kind = int if knob in ("max_header_size", "max_pending") else float
    try:
        return kind(text)
    except ValueError:
        raise SettingError(knob, "not an integer" if kind is int else "not a number") from None


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The names in ``environ`` that start with :data:`PREFIX` but are no knob's variable nor in :data:`NOT_KNOBS`."""
    known = set(VARIABLES.values()) | NOT_KNOBS
    return sorted(name for name in environ if name.startswith(PREFIX) and name not in known)


def _unknown_variable(name: str) -> str:
    """``name``, a variable with the prefix that is no knob's, and the closest one if any is close."""
    # Compared without the prefix, with each knob's own name as a spelling of its variable too:
    # PROXYPROTO_TRUSTED is trusted's variable, PROXYPROTO_ALLOW_IPS.
    spellings = {variable[len(PREFIX) :]: variable for variable in VARIABLES.values()}
    spellings.update((knob.upper(), variable) for knob, variable in VARIABLES.items())
    typed = name[len(PREFIX) :]
    close = [spelling for spelling in spellings if spelling.startswith(typed)]  # cut short: UNTRUSTED
    if len(close) != 1:
        close = difflib.get_close_matches(typed, list(spellings), n=1, cutoff=0.5)
    hint = f" (did you mean {spellings[close[0]]}?)" if close else ""
    return f"{name} is not a proxyproto variable{hint}"


def settings_from_environment(environ: Mapping[str, str] | None = None) -> Settings:
    """The :class:`Settings` the ``PROXYPROTO_*`` variables ask for (:data:`ENVIRONMENT`; default ``os.environ``).

    Values are read in any case and stripped.  ``ValueError`` names the
    variable and its text (``PROXYPROTO_MAX_PENDING='0': must be ...``), or
    a variable with the ``PROXYPROTO_`` prefix that is none of
    :data:`VARIABLES` (nor of :data:`NOT_KNOBS`), with the closest one
    (``PROXYPROTO_TRUSTED is not a proxyproto variable (did you mean
    PROXYPROTO_ALLOW_IPS?)``): a misspelled variable would otherwise leave
    its knob at the default without a word.
    """
    env = os.environ if environ is None else environ
    unknown = unknown_variables(env)
    if unknown:
        said = "; ".join(_unknown_variable(name) for name in unknown)
        raise ValueError(f"{said}; the variables are: {', '.join(VARIABLES.values())}")
    values: dict[str, Any] = {}
    for knob, variable in VARIABLES.items():
        text = env.get(variable, ENVIRONMENT[variable]).strip()
        try:
            values[knob] = _CHECKS[knob](knob, _from_text(knob, text))
        except SettingError as exc:
            raise ValueError(f"{variable}={text!r}: {exc.reason}") from None
    return Settings(**values)._spelled("environment")
