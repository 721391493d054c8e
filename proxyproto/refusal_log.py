"""Refusal log lines, rate-limited per listener.

Every refused connection or datagram is worth one log line, until a peer
makes refusals cheap: 50,000 malformed datagrams, or a flood of half-open
connections, would otherwise write tens of thousands of WARNING lines and
turn the log into the attack's amplifier.  A :class:`RefusalLog` lets
``rate`` lines through per one-second window and counts the rest; the first
line after a window with suppressed lines (or a call to :meth:`flush` from
the serving loop's idle hook) says how many were dropped, so the log stays
honest about what happened without growing with the flood.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["DEFAULT_LOG_RATE", "RefusalLog"]

#: Refusal lines per second and listener that reach the log before suppression starts.
DEFAULT_LOG_RATE = 20.0

_WINDOW = 1.0


class RefusalLog:
    """At most ``rate`` lines per second through ``logger``, then one summary line.

    ``rate`` None lets every line through; 0 keeps only the summaries.  It
    is an attribute read on every call, so a server can change it while
    serving.  Meant for one serving loop (one thread); a line lost to a race
    between two threads would cost a count, never an exception.
    """

    __slots__ = ("logger", "rate", "sent", "suppressed", "window_start")

    def __init__(self, logger: logging.Logger, rate: float | None = DEFAULT_LOG_RATE) -> None:
        self.logger = logger
        self.rate = rate
        self.window_start = 0.0
        self.sent = 0
        self.suppressed = 0

    def log(self, level: int, message: str, *args: Any) -> None:
        """Log one refusal line, unless this second's share is spent (then count it)."""
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
            self.sent = 0
        if self.sent < rate:
            self.sent += 1
            self.logger.log(level, message, *args, stacklevel=2)
        else:
            self.suppressed += 1

    def flush(self, now: float | None = None) -> None:
        """Write the summary of lines suppressed in a window that has ended (cheap when none were)."""
        if not self.suppressed:
            return
        if now is None:
            now = time.monotonic()
        if now - self.window_start < _WINDOW:
            return
        count, self.suppressed = self.suppressed, 0
        self.logger.warning(
            "%d refusal line(s) suppressed in %.1f s (at most %g per second: proxy_log_rate)",
            count,
            now - self.window_start,
            self.rate,
        )
