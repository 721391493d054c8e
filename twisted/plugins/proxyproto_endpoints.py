"""The ``proxyproto:`` endpoint for Twisted's ``serverFromString`` (``daphne -e proxyproto:tcp:8000``).

A Twisted plugin drop-in: Twisted finds it in every ``twisted/plugins``
directory on ``sys.path`` (``twisted.plugins.__path__``), which is why this
directory has no ``__init__.py``, nor has its parent: they must never
shadow the real ``twisted`` package.  The parser is
:class:`proxyproto.twisted.ProxyProtocolEndpointParser` (docs/twisted.rst).
"""

from proxyproto.twisted import ProxyProtocolEndpointParser

proxyprotoEndpointParser = ProxyProtocolEndpointParser()
