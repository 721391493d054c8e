"""How ``proxyproto:`` endpoint strings spelled oddly are read: the trust list each one ends with, or its error.

Usage: env -u PROXYPROTO_ALLOW_IPS PYTHONPATH=. python repro/check_endpoint_strings.py
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString

for description in [
    "proxyproto:tcp:18000",
    "proxyproto:tcp:18000:trusted=*",
    "proxyproto:tcp:18000:trusted=",
    "proxyproto:tcp:18000:trusted='*'",
    "proxyproto:tcp:18000:Trusted=10.0.0.0/8",
    "proxyproto:tcp:18000:TRUSTED=*",
    "proxyproto:tcp:18000:trusted=10.0.0.0/8:trusted=*",  # repeated: the last one wins, silently
    "proxyproto:tcp:18000:untrusted_policy=use",
    "proxyproto:tcp:18000:trusted=*,10.0.0.0/8",
]:
    try:
        endpoint = serverFromString(reactor, description)
        print(f"{description:55} -> trusted: {endpoint.settings.trusted.describe()}")
    except Exception as exc:  # the point is to show each refusal
        print(f"{description:55} -> {type(exc).__name__}: {str(exc)[:110]}")
