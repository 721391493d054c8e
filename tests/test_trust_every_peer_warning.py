"""Trusting every peer (``trusted="*"``) starts every adapter with one WARNING naming the knob as spelled.

``"*"`` lets anyone who can connect choose the client address (and send TLVs the
application reads as the proxy's): legitimate behind a load balancer nothing else
reaches, dangerous anywhere else.  The engine decides and words it
(``advice.warn_if_every_peer_trusted``, reached from the start-up line and from
every adapter's start), once per process for the same settings however many
factories a server makes; the start line no longer says "SKIP for other peers"
when there are none.  Real servers on loopback, each started and stopped here.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_kit import ADAPTERS, Records
from support import free_port, require_module, run_on

from proxyproto import advice
from proxyproto.settings import Settings, settings_from_environment

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WARNING_TEXT = "is * (every peer): any peer that can connect to this listener may set its client address"
#: How each adapter spells the trust list (the others: ``trusted``).
TRUSTED_NAME = {"socketserver-mixin": "proxy_trusted", "udp-datagram-server": "proxy_trusted"}


@pytest.fixture(autouse=True)
def fresh_process_memory() -> Iterator[None]:
    """Each test starts as a fresh process would: no trust list warned about yet."""
    advice._WARNED.clear()
    yield
    advice._WARNED.clear()


def warnings_of(records: Records) -> list[str]:
    said = [record for record in records.snapshot() if record.levelno == logging.WARNING]
    return [record.getMessage() for record in said if WARNING_TEXT in record.getMessage()]


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_every_adapter_trusting_every_peer_starts_with_one_warning_naming_the_knob(
    adapter: str, records: Records
) -> None:
    serving, loop, _ = ADAPTERS[adapter]

    async def scenario() -> None:
        async with serving(trusted="*"):
            await asyncio.sleep(0.05)

    run_on(loop, scenario)
    warned = warnings_of(records)
    assert len(warned) == 1, [r.getMessage() for r in records.snapshot()]
    assert warned[0].startswith(f"{TRUSTED_NAME.get(adapter, 'trusted')} is * (every peer)"), warned[0]


@pytest.mark.parametrize("adapter", ["socketserver-mixin", "aio-start_server", "wrap_protocol_factory", "waitress"])
def test_the_default_trust_list_starts_without_that_warning(adapter: str, records: Records) -> None:
    serving, loop, _ = ADAPTERS[adapter]

    async def scenario() -> None:
        async with serving():
            await asyncio.sleep(0.05)

    run_on(loop, scenario)
    assert not [r for r in records.snapshot() if r.levelno >= logging.WARNING], records.snapshot()


@pytest.mark.parametrize("adapter", ["hypercorn", "waitress"])
def test_hypercorn_and_waitress_say_which_policy_applies_to_which_peers_at_start(
    adapter: str, records: Records
) -> None:
    serving, loop, _ = ADAPTERS[adapter]

    async def scenario() -> None:
        async with serving(trusted="10.0.0.0/8"):
            await asyncio.sleep(0.05)

    run_on(loop, scenario)
    lines = [r.getMessage() for r in records.snapshot() if r.levelno == logging.INFO]
    assert "PROXY header policy REQUIRE for 10.0.0.0/8, SKIP for other peers" in lines, lines


def test_the_start_line_names_no_other_peers_when_every_peer_is_trusted() -> None:
    assert advice.policy_line(Settings(trusted="*"), False) == "PROXY header policy REQUIRE for every peer"
    assert advice.policy_line(Settings(trusted="10.0.0.0/8"), True) == (
        "PROXY header policy REQUIRE for 10.0.0.0/8, SKIP for other peers; TLS is negotiated after the header"
    )


def test_the_warning_is_written_once_per_process_for_the_same_settings(records: Records) -> None:
    for _ in range(3):
        advice.policy_line(Settings(trusted="*"), False)
        advice.warn_if_every_peer_trusted(Settings(trusted="*"))
    environment = settings_from_environment({"PROXYPROTO_ALLOW_IPS": "0.0.0.0/0"})
    advice.warn_if_every_peer_trusted(environment)
    assert [line.partition(":")[0] for line in warnings_of(records)] == ["trusted is * (every peer)"]
    warned = [r.getMessage() for r in records.snapshot() if r.levelno == logging.WARNING]
    assert warned[-1].startswith("PROXYPROTO_ALLOW_IPS is 0.0.0.0/0: any peer that can connect"), warned


@pytest.mark.parametrize(
    "settings",
    [
        Settings(),
        Settings(trusted="10.0.0.0/8,unix"),
        Settings(trusted="*", policy="SKIP"),  # trusted peers' headers are never read
        Settings(trusted="*", policy_for=lambda peer, local: "REQUIRE"),  # the hook decides, per connection
    ],
    ids=["default", "networks", "skip", "hook"],
)
def test_settings_that_do_not_let_every_peer_set_its_address_get_no_warning(settings: Settings) -> None:
    assert not advice.every_peer_trusted(settings)


def start_lines(command: list[str], until: str) -> list[str]:
    """The output of the real server ``command`` (``PROXYPROTO_ALLOW_IPS=*``) up to a line holding ``until``."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{HERE / 'web'}:{HERE}", "PROXYPROTO_ALLOW_IPS": "*"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stall = threading.Timer(30, proc.kill)  # a stall shows as a failure, never a hang
    stall.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if until in line:
                break
    finally:
        stall.cancel()
        proc.terminate()
        proc.wait(15)
        if proc.stdout is not None:
            proc.stdout.close()
    return lines


def test_uvicorn_command_trusting_every_peer_warns_naming_the_variable() -> None:
    require_module("uvicorn")
    command = [sys.executable, "-m", "uvicorn", "web_kit:app", "--http", "proxyproto.uvicorn:H11", "--lifespan", "off"]
    lines = start_lines([*command, "--host", "127.0.0.1", "--port", str(free_port())], "Uvicorn running")
    warned = [line for line in lines if "WARNING" in line and WARNING_TEXT in line]
    assert len(warned) == 1 and "PROXYPROTO_ALLOW_IPS is * (every peer)" in warned[0], lines
    assert any(line.rstrip().endswith("PROXY header policy REQUIRE for every peer") for line in lines), lines


@pytest.mark.parametrize(("worker", "app"), [("Sync", "wsgi_app"), ("UvicornH11Worker", "asgi_app")])
def test_gunicorn_worker_trusting_every_peer_warns_once_at_its_start(worker: str, app: str) -> None:
    require_module("gunicorn")
    if worker.startswith("Uvicorn"):
        require_module("uvicorn")
    command = [sys.executable, "-m", "gunicorn", "--no-control-socket", "-k", f"proxyproto.gunicorn.{worker}"]
    lines = start_lines(
        [*command, "-w", "1", "-b", f"127.0.0.1:{free_port()}", f"gunicorn_kit:{app}"], "PROXY header policy"
    )
    warned = [line for line in lines if "[WARNING] proxyproto: " in line and WARNING_TEXT in line]
    assert len(warned) == 1 and "PROXYPROTO_ALLOW_IPS is * (every peer)" in warned[0], lines


def test_tornado_and_twisted_servers_trusting_every_peer_warn_when_made(records: Records) -> None:
    """Tornado's ProxyHTTPServer and Twisted's factory are made before they listen: they warn then."""
    require_module("tornado")
    require_module("twisted")
    from tornado.web import Application
    from twisted.internet import protocol

    from proxyproto.tornado import ProxyHTTPServer
    from proxyproto.twisted_endpoint import ProxyProtocolFactory

    ProxyHTTPServer(Application(), trusted="*")
    assert len(warnings_of(records)) == 1
    advice._WARNED.clear()
    ProxyProtocolFactory(protocol.Factory.forProtocol(protocol.Protocol), trusted="*")
    assert len(warnings_of(records)) == 2
