"""Refusal log lines, rate-limited per listener and per kind of refusal.

Every refused connection or datagram is worth one log line, until a peer
makes refusals cheap: 50,000 malformed datagrams, or a flood of half-open
connections, would otherwise write tens of thousands of WARNING lines and
turn the log into the attack's amplifier.  A :class:`RefusalLog` lets
``rate`` lines of each *kind* through per one-second window and counts the
rest.  Budgets are per kind (a malformed header, a header refused by REJECT,
a silent client, ...) so that a cheap flood of one kind cannot hide the one
line of another that matters (a spoof attempt caught by REJECT, say).

Every line names its kind, one of a small fixed set: :func:`kind_of` gives
it for a connection or datagram the policy table closes (it derives from the
:class:`~proxyproto.policy.Outcome` alone), and the ``KIND_*`` constants name
the others (an eviction, a failed ``policy_for`` hook, a read error, a TLS
handshake that did not complete).  A record carries its kind as the
``refusal_kind`` attribute, for filters and structured logging.

The summary of a window with suppressed lines says how many of each kind
were dropped, by kind, at the highest level among them; it is written by the
first line after the window, by :meth:`RefusalLog.flush` from the serving
loop's idle hook (the socketserver mixins, waitress), or by a timer the log
arms through its ``later`` function (the asyncio adapters), so it comes
within moments of the window's end even when no further traffic does.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .policy import Outcome, peer_text

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

#: Refusal lines per second, listener and kind that reach the log before suppression starts.
DEFAULT_LOG_RATE = 20.0

_WINDOW = 1.0
#: How long after its window's end a timed summary is written (past the end, never before it).
_MARGIN = 0.05

#: The oldest connection still waiting for its header, closed to make room (max_pending, EMFILE).
KIND_EVICTED = "evicted"
#: The user's ``policy_for`` (``proxy_policy_for``) hook raised.
KIND_POLICY_FOR = "policy_for failed"
#: The socket failed (a reset, say) while the header was being read.
KIND_READ_ERROR = "read error"
#: The TLS handshake after the header did not complete (failed, timed out, or the peer left).
KIND_TLS = "TLS handshake failed"
#: A peer outside the trust list sent a PROXY header (not believed: the proxy may be missing from the list).
KIND_UNTRUSTED_HEADER = "header from an untrusted peer"

_OUTCOME_KINDS = {
    # The only policy that closes a connection for sending a valid header is REJECT.
    Outcome.HEADER: "header refused by REJECT",
    Outcome.NO_HEADER: Outcome.NO_HEADER.value,
    Outcome.INVALID: Outcome.INVALID.value,
    Outcome.SILENT: Outcome.SILENT.value,
    Outcome.PARTIAL: Outcome.PARTIAL.value,
    Outcome.EOF: Outcome.EOF.value,
}


def listener_text(*addresses: object) -> str:
    """The listening address(es) for a line: ``127.0.0.1:8000``, ``[::]:8000``, ``unix:'/run/app.sock'``."""
    return ", ".join(peer_text(address) for address in addresses)


def kind_of(outcome: Outcome) -> str:
    """The kind of the refusal line for a connection or datagram closed because of ``outcome``."""
    return _OUTCOME_KINDS[outcome]


#: ``later(delay, callback)``: call ``callback()`` in the serving loop's thread ``delay`` seconds
#: from now; False when it cannot (no loop running), and the log tries again at its next line.
Later = Callable[[float, Callable[[], None]], bool]


def _as_is(knob: str) -> str:
    return knob


class RefusalLog:
    """At most ``rate`` lines per second and kind through ``logger``, then one summary line.

    ``rate`` None lets every line through; 0 keeps only the summaries.  It
    is an attribute read on every call, so a server can change it while
    serving.  ``kind`` names the refusal (:func:`kind_of` or a ``KIND_*``
    constant), so the number of kinds, and with it the lines per second,
    stays bounded.  ``later``, when given, arms a timer when a line is
    first suppressed, so the summary is written within ``_MARGIN`` of its
    window's end without waiting for another refusal; without it the owner
    calls :meth:`flush` from its idle hook.  Safe to share between threads
    (gunicorn's gthread pool writes lines beside its loop): the counting and
    the summary's swap hold a lock.
    """

    __slots__ = ("_lock", "due", "later", "listener", "logger", "name_of", "rate", "sent", "suppressed", "window_start")

    def __init__(
        self,
        logger: logging.Logger,
        rate: float | None = DEFAULT_LOG_RATE,
        *,
        later: Later | None = None,
        name_of: Callable[[str], str] | None = None,
    ) -> None:
        self.logger = logger
        self.rate = rate
        self.later = later
        self._lock = threading.RLock()
        #: A knob as the operator spells it (``Settings.name_of``): the lines name what to change.
        self.name_of: Callable[[str], str] = _as_is if name_of is None else name_of
        self.window_start = 0.0
        self.sent: dict[str, int] = {}
        #: kind -> [suppressed count, highest level among them]
        self.suppressed: dict[str, list[int]] = {}
        #: When the armed timer fires (monotonic time), 0.0 when none is armed.
        self.due = 0.0
        #: The listening address(es) the lines are about, named at the end of each line (None: not known).
        self.listener: str | None = None

    def log(self, level: int, message: str, *args: object, kind: str, listener: object = None) -> None:
        """Log one refusal line of ``kind``, unless this second's share for it is spent (then count it).

        The line ends with ``(listener <address>)``: ``listener``, the
        address of the connection's own listener (a ``getsockname()``, or a
        function giving it, called only when the line is written), when
        given; else :attr:`listener` when known.  A log shared by several
        listeners (an asyncio factory serving two) names each line's own.
        """
        if not self.logger.isEnabledFor(level):
            return  # a line nobody would see neither counts nor earns a summary
        rate = self.rate
        if rate is None:
            message, args = self._placed(message, args, listener)
            self.logger.log(level, message, *args, stacklevel=2, extra={"refusal_kind": kind})
            return
        now = time.monotonic()
        with self._lock:
            if now - self.window_start >= _WINDOW:
                self.flush(now)
                self.window_start = now
                self.sent.clear()
            sent = self.sent.get(kind, 0)
            if sent < rate:
                self.sent[kind] = sent + 1
                message, args = self._placed(message, args, listener)
                self.logger.log(level, message, *args, stacklevel=2, extra={"refusal_kind": kind})
                return
            entry = self.suppressed.get(kind)
            if entry is None:
                self.suppressed[kind] = [1, level]
            else:
                entry[0] += 1
                if level > entry[1]:
                    entry[1] = level
        # A timer already armed is trusted until a window past its time (its loop may have closed).
        if self.later is not None and (not self.due or now > self.due + _WINDOW):
            self.arm(now)

    def _placed(self, message: str, args: tuple[object, ...], listener: object) -> tuple[str, tuple[object, ...]]:
        """``message`` and ``args`` ending with the listener's clause (see :meth:`log`), when one is known."""
        if listener is not None:
            try:
                address = listener() if callable(listener) else listener
            except OSError:  # a getsockname() of a listener closed meanwhile: the line goes without it
                address = None
            where = None if address is None else listener_text(address)
        else:
            where = self.listener
        if where is None:
            return message, args
        return message + " (listener %s)", (*args, where)

    def wants(self, kind: str, level: int = logging.WARNING) -> bool:
        """Whether a line of ``kind`` at ``level`` would be written now (enabled, and this second's budget not spent).

        For a line whose making costs something (a system call to look at
        the bytes): under a flood, once the budget is spent, the look is
        skipped too, and those connections are neither looked at nor counted.
        """
        if not self.logger.isEnabledFor(level):
            return False
        rate = self.rate
        if rate is None or time.monotonic() - self.window_start >= _WINDOW:
            return True
        return self.sent.get(kind, 0) < rate

    def read_failed(self, peer: object, error: object, listener: object = None) -> None:
        """The INFO line for a connection closed because reading its header failed (``error``: why)."""
        message = "%s: closed: %s while reading the PROXY header"
        self.log(logging.INFO, message, peer_text(peer), error, kind=KIND_READ_ERROR, listener=listener)

    def handshake_expired(self, peer: object, timeout: float, listener: object = None) -> None:
        """The INFO line for a connection closed because its TLS handshake took over ``timeout`` seconds."""
        message = "%s: closed: TLS handshake not done within %g s"
        self.log(logging.INFO, message, peer_text(peer), timeout, kind=KIND_TLS, listener=listener)

    def hook_failed(
        self,
        peer: object,
        exc: Exception,
        hook: str = "policy_for",
        refused: str = "closed",
        listener: object = None,
    ) -> None:
        """The ERROR line for a user's trust hook that raised: ``<peer>: closed: <hook> failed: <type>: <exc>``.

        ``hook`` is the hook's name as the adapter spells it (the mixins'
        ``proxy_policy_for``), ``refused`` what happened to the connection
        ("closed", or "dropped datagram"); ``listener`` as for :meth:`log`.
        """
        self.log(
            logging.ERROR,
            "%s: %s: %s failed: %s: %s",
            peer_text(peer),
            refused,
            hook,
            type(exc).__name__,
            exc,
            kind=KIND_POLICY_FOR,
            listener=listener,
        )

    def arm(self, now: float) -> None:
        """Have ``later`` call :meth:`timed_flush` just after the current window ends."""
        assert self.later is not None
        delay = max(self.window_start + _WINDOW - now, 0.0) + _MARGIN
        self.due = now + delay if self.later(delay, self.timed_flush) else 0.0

    def timed_flush(self) -> None:
        """The timer's callback: the summary if its window is over, else the timer again."""
        self.due = 0.0
        self.flush()
        if self.suppressed and self.later is not None:
            self.arm(time.monotonic())

    def flush(self, now: float | None = None) -> None:
        """Write the summary of lines suppressed in a window that has ended (cheap when none were).

        The line names each kind with its count (``280 x malformed header``);
        its record's ``refusal_suppressed`` attribute is the same as a dict.
        """
        if not self.suppressed:
            return
        if now is None:
            now = time.monotonic()
        if now - self.window_start < _WINDOW:
            return
        with self._lock:
            suppressed, self.suppressed = self.suppressed, {}
        if not suppressed:  # another thread wrote the summary meanwhile
            return
        total = sum(count for count, _ in suppressed.values())
        level = max(max(level for _, level in suppressed.values()), logging.WARNING)
        details = ", ".join(f"{count} x {kind}" for kind, (count, _) in suppressed.items())
        listener = "" if self.listener is None else f" (listener {self.listener})"
        self.logger.log(
            level,
            "%d refusal line(s) suppressed in %.1f s (at most %g per second and kind: %s): %s%s",
            total,
            now - self.window_start,
            self.rate,
            self.name_of("log_rate"),
            details,
            listener,
            extra={"refusal_suppressed": {kind: count for kind, (count, _) in suppressed.items()}},
        )
