"""How the ``proxyproto`` command line fails: :class:`Failure`, :class:`UsageError`, and the name it writes on stderr.

Every command raises :class:`Failure` for bad input or a network failure,
and :class:`UsageError` for a command line that cannot work as written;
``main`` in :mod:`proxyproto.cli` prints either as one line,
``proxyproto COMMAND: error: MESSAGE``, and exits with its :attr:`~Failure.status`
(1 or 2).  :data:`PROG` begins that line, every other line the commands write
on stderr, and the usage messages.

:func:`address_failure` sorts the errors of resolving and binding an address
the user typed between the two: a name that does not exist, an address this
host does not have or a family it does not support is a usage error (the
same command fails the same way every time); a busy port, a refused
permission or a temporary failure of the resolver is a failure of the moment.
"""

from __future__ import annotations

import errno
import socket

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

PROG = "proxyproto"

#: getaddrinfo() errors that say the name or the service itself is wrong.
_BAD_NAME = frozenset(
    getattr(socket, name)
    for name in ("EAI_NONAME", "EAI_NODATA", "EAI_SERVICE", "EAI_FAMILY", "EAI_ADDRFAMILY")
    if hasattr(socket, name)
)


class Failure(Exception):
    """A clear, one-line error for stderr; exit status 1 (bad input, or a network failure)."""

    status = 1


class UsageError(Failure):
    """A command line that cannot work as written (a bad or conflicting option); exit status 2.

    The message names the option at fault.
    """

    status = 2


def address_failure(exc: OSError, *, binding: bool = False) -> type[Failure]:
    """The error to raise for ``exc``, met resolving, connecting to or (``binding``) binding an address the user typed.

    :class:`UsageError` when the address is wrong whatever else runs on the
    host (a name that does not exist, a family the host does not support,
    for ``binding`` an address the host does not have), else :class:`Failure`
    (connecting, EADDRNOTAVAIL means no local port was free).
    """
    if isinstance(exc, socket.gaierror):
        return UsageError if exc.errno in _BAD_NAME else Failure
    if exc.errno == errno.EAFNOSUPPORT or (binding and exc.errno == errno.EADDRNOTAVAIL):
        return UsageError
    return Failure
