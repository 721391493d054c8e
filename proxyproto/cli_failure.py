"""How the ``proxyproto`` command line fails: :class:`Failure`, and the name it writes on stderr.

Every command raises :class:`Failure` for bad input or a network failure;
``main`` in :mod:`proxyproto.cli` prints it as one line,
``proxyproto COMMAND: error: MESSAGE``, and exits with status 1.  :data:`PROG`
begins that line, every other line the commands write on stderr, and the usage
messages.
"""

from __future__ import annotations

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

PROG = "proxyproto"


class Failure(Exception):
    """A clear, one-line error for stderr and exit status 1."""
