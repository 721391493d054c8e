"""Every new adapter's default settings compared with proxyproto.Settings() (DESIGN.md's table).

Usage: env -u PROXYPROTO_ALLOW_IPS python repro/check_defaults.py
"""

from __future__ import annotations

import os

from gunicorn.config import Config
from tornado.web import Application
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory

import proxyproto
from proxyproto.gunicorn import settings_from_gunicorn
from proxyproto.tornado import ProxyHTTPServer
from proxyproto.twisted import ProxyProtocolFactory

assert not any(k.startswith("PROXYPROTO_") for k in os.environ), "run without PROXYPROTO_* variables"
reference = proxyproto.Settings()
found = {
    "tornado ProxyHTTPServer(app)": ProxyHTTPServer(Application()).proxy_settings,
    "twisted ProxyProtocolFactory(f)": ProxyProtocolFactory(Factory()).settings,
    "twisted 'proxyproto:tcp:0'": serverFromString(reactor, "proxyproto:tcp:0").settings,
    "gunicorn default cfg": settings_from_gunicorn(Config(), {}),
}
for name, settings in found.items():
    print(
        f"{name}: {'same as Settings()' if settings == reference else 'DIFFERENT: ' + repr(settings)}",
        "| trusted:",
        settings.trusted.describe(),
        "| untrusted_policy:",
        settings.untrusted_policy.name,
    )
