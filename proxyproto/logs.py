"""Where the ``proxyproto`` logger's lines go when the host server set up logging for itself only.

uvicorn (and gunicorn) configure their own loggers and leave the root
logger without a handler, so a library's lines reach only Python's "last
resort" handler: WARNING and above, without a level or a name, and no INFO
line at all.  :func:`show_through` hands proxyproto's lines to the host's
logger in that case only, prefixed with ``proxyproto:`` once, at the host's
level; whoever configured logging themselves (a handler on the root logger
or on ``proxyproto``) keeps full control and gets nothing added.
"""

from __future__ import annotations

import logging

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

NAME = "proxyproto"


class _ThroughHost(logging.Handler):
    """Passes each record on to the host's logger, its message prefixed with the logger's name."""

    def __init__(self, host: logging.Logger) -> None:
        super().__init__()
        self.host = host

    def emit(self, record: logging.LogRecord) -> None:
        try:
            passed = logging.makeLogRecord(record.__dict__)
            passed.msg = f"{record.name}: {record.getMessage()}"
            passed.args = None
            passed.name = self.host.name
            self.host.handle(passed)
        except Exception:  # a handler never raises into the serving code
            self.handleError(record)


def show_through(host_name: str) -> bool:
    """Show the ``proxyproto`` logger's lines through the logger ``host_name``'s handlers; True when it does.

    Only when nothing else would show them (neither ``proxyproto`` nor any
    of its ancestors has a handler) and the host's logger has one; then
    ``proxyproto``'s level becomes the host's unless it was set.  Calling it
    again changes nothing.
    """
    ours = logging.getLogger(NAME)
    if any(isinstance(handler, _ThroughHost) for handler in ours.handlers):
        return True
    host = logging.getLogger(host_name)
    if ours.hasHandlers() or not host.hasHandlers():
        return False
    ours.addHandler(_ThroughHost(host))
    if ours.level == logging.NOTSET:
        ours.setLevel(host.getEffectiveLevel())
    return True
