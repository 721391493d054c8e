"""Refusal log lines, rate-limited per listener and per kind of refusal.

Every refused connection or datagram is worth one log line, until a peer
makes refusals cheap: 50,000 malformed datagrams, or a flood of half-open
connections, would otherwise write tens of thousands of WARNING lines and
turn the log into the attack's amplifier.  A :class:`RefusalLog` lets
``rate`` lines of each *kind* through per one-second window and counts the
rest.  Budgets are per kind (a malformed header, a header refused by REJECT,
a silent client, ...) so that a cheap flood of one kind cannot hide the one
line of another that matters (a spoof attempt caught by REJECT, say).  The
first line after a window with suppressed lines (or a call to :meth:`flush`
from the serving loop's idle hook) says how many of each kind were dropped,
at the highest level among them, so the log stays honest about what
happened without growing with the flood.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["DEFAULT_LOG_RATE", "RefusalLog"]

#: Refusal lines per second, listener and kind that reach the log before suppression starts.
DEFAULT_LOG_RATE = 20.0

_WINDOW = 1.0


class RefusalLog:
    """At most ``rate`` lines per second and kind through ``logger``, then one summary line.

    ``rate`` None lets every line through; 0 keeps only the summaries.  It
    is an attribute read on every call, so a server can change it while
    serving.  ``kind`` names the refusal (callers pass a small fixed set of
    names; by default the message format is the kind), so the number of
    kinds, and with it the lines per second, stays bounded.  Meant for one
    serving loop (one thread); a race between two threads could cost a
    count, never an exception.
    """

    __slots__ = ("logger", "rate", "sent", "suppressed", "window_start")

    def __init__(self, logger: logging.Logger, rate: float | None = DEFAULT_LOG_RATE) -> None:
        self.logger = logger
        self.rate = rate
        self.window_start = 0.0
        self.sent: dict[str, int] = {}
        #: kind -> [suppressed count, highest level among them]
        self.suppressed: dict[str, list[int]] = {}

    def log(self, level: int, message: str, *args: Any, kind: str | None = None) -> None:
        """Log one refusal line, unless this second's share for its kind is spent (then count it)."""
        if not self.logger.isEnabledFor(level):
            return  # a line nobody would see neither counts nor earns a summary
        rate = self.rate
        if rate is None:
            self.logger.log(level, message, *args, stacklevel=2)
            return
        now = time.monotonic()
        if now - self.window_start >= _WINDOW:
            self.flush(now)
            self.window_start = now
            self.sent.clear()
        key = message if kind is None else kind
        sent = self.sent.get(key, 0)
        if sent < rate:
            self.sent[key] = sent + 1
            self.logger.log(level, message, *args, stacklevel=2)
            return
        entry = self.suppressed.get(key)
        if entry is None:
            self.suppressed[key] = [1, level]
        else:
            entry[0] += 1
            if level > entry[1]:
                entry[1] = level

    def flush(self, now: float | None = None) -> None:
        """Write the summary of lines suppressed in a window that has ended (cheap when none were)."""
        if not self.suppressed:
            return
        if now is None:
            now = time.monotonic()
        if now - self.window_start < _WINDOW:
            return
        suppressed, self.suppressed = self.suppressed, {}
        total = sum(count for count, _ in suppressed.values())
        level = max(max(level for _, level in suppressed.values()), logging.WARNING)
        details = ", ".join(f"{count} x {kind}" for kind, (count, _) in suppressed.items())
        self.logger.log(
            level,
            "%d refusal line(s) suppressed in %.1f s (at most %g per second and kind: proxy_log_rate): %s",
            total,
            now - self.window_start,
            self.rate,
            details,
        )
