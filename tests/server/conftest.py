"""Fixtures for the server-layer tests: TLS material and log capture.

The server and client helpers themselves live in ``server_kit.py`` beside this file so test
modules can import them by name.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
from support import self_signed_files


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate and key for localhost/127.0.0.1, made with the openssl CLI
    (the ssl module cannot make one); an EC key keeps generation instant."""
    return self_signed_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server_tls_context(tls_files: tuple[str, str]) -> ssl.SSLContext:
    """A server-side context holding the test certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*tls_files)
    return ctx


@pytest.fixture
def client_tls_context(tls_files: tuple[str, str]) -> ssl.SSLContext:
    """A client context that trusts exactly the test certificate (real verification, no shortcut)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(tls_files[0])
    return ctx


@pytest.fixture
def proxy_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog set to DEBUG for logger ``proxyproto``.  Records from the serving thread reach it
    (logging handlers are process-wide); records from forked children do not, so logging is
    tested with the sync and threading classes only."""
    caplog.set_level(logging.DEBUG, logger="proxyproto")
    yield caplog


@pytest.fixture
def default_timeout() -> Iterator[Any]:
    """Lets a test call socket.setdefaulttimeout and always restores the previous value."""
    before = socket.getdefaulttimeout()
    try:
        yield socket.setdefaulttimeout
    finally:
        socket.setdefaulttimeout(before)
