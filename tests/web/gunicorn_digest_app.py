"""A WSGI app for tests/web/test_gunicorn_first_read.py: what the request was, and its body's SHA-256.

Stdlib only: ``gunicorn ... gunicorn_digest_app:digest_app`` imports it with tests/web on PYTHONPATH.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """WSGI: the method, path, client and scheme, whether a header came, the body's length and SHA-256."""
    body = environ["wsgi.input"].read()
    port = environ.get("REMOTE_PORT")
    answer = json.dumps(
        {
            "method": environ["REQUEST_METHOD"],
            "path": environ["PATH_INFO"],
            "client": [environ["REMOTE_ADDR"], int(port) if port else None],
            "scheme": environ["wsgi.url_scheme"],
            "header": environ.get("proxyproto.header") is not None,
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))])
    return [answer]
