"""What the real socket under a connection is: its family, and who may connect to a UNIX one.

The settings decide trust (:meth:`proxyproto.settings.Settings.trust`) from
facts about the socket that only I/O can tell; this module tells them, the
same way for every adapter:

* :func:`socket_family`: the family of the socket itself, whatever label a
  server put on the socket object (``uvicorn --fd`` wraps a TCP listener with
  ``socket.fromfd(fd, AF_UNIX, ...)``, and asyncio's accepted sockets inherit
  the label);
* :func:`unix_access`: for a UNIX socket, whether its permissions restrict who
  can connect: only a socket file that is not world-writable does.  The mode
  is read when asked (once per connection), never cached, because servers
  chmod after bind (uvicorn makes its ``--uds`` socket 0o666).
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Any

from .policy import UNIX_OPEN, UNIX_RESTRICTED

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

_AF_UNIX = getattr(socket, "AF_UNIX", None)
_SO_DOMAIN = getattr(socket, "SO_DOMAIN", None)


def socket_family(sock: Any) -> int:
    """The address family of the socket ``sock`` wraps (a socket, asyncio's TransportSocket, uvloop's).

    Asked of the kernel (``SO_DOMAIN``, Linux) where it can be; elsewhere
    from the shape of ``getsockname()`` (a tuple for IP families), never
    from ``sock.family``, which is only the label the socket object was made
    with.  -1 when neither answers (a closed socket).
    """
    if _SO_DOMAIN is not None:
        try:
            return int(sock.getsockopt(socket.SOL_SOCKET, _SO_DOMAIN))
        except (OSError, AttributeError, TypeError, ValueError):
            pass
    try:
        name = sock.getsockname()
    except (OSError, AttributeError):
        return -1
    if isinstance(name, tuple):
        return socket.AF_INET6 if len(name) == 4 else socket.AF_INET
    return _AF_UNIX if _AF_UNIX is not None else -1


def unix_access(sock: Any, family: int | None = None) -> str | None:
    """None when ``sock`` is no UNIX socket; else whether its permissions restrict who can connect.

    :data:`~proxyproto.policy.UNIX_RESTRICTED` when its name is a path to a
    socket file that is not world-writable (connecting needs write
    permission on it, so only its owner and group can); otherwise
    :data:`~proxyproto.policy.UNIX_OPEN`: a world-writable file (as
    ``uvicorn --uds`` makes), an abstract name (no file, no permissions), an
    unnamed socket, a path that is gone or is no socket.  Only the file's
    own mode counts, not its directory's.  For an accepted connection,
    ``getsockname()`` is the listener's path.  ``family``: the socket's
    :func:`socket_family`, when the caller has it already.
    """
    if _AF_UNIX is None or (socket_family(sock) if family is None else family) != _AF_UNIX:
        return None
    try:
        name = sock.getsockname()
        if not isinstance(name, str) or not name:
            return UNIX_OPEN  # abstract (bytes starting with NUL) or unnamed
        mode = os.stat(name).st_mode
    except (OSError, AttributeError, ValueError):
        return UNIX_OPEN
    if not stat.S_ISSOCK(mode) or mode & stat.S_IWOTH:
        return UNIX_OPEN
    return UNIX_RESTRICTED
