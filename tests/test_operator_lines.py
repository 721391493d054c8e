"""The lines an operator reads when the deployment is slightly wrong say what is wrong and what to change.

Through every adapter, on real loopback sockets:

* a trusted peer (the default trust list: loopback) whose stream starts with an HTTP request
  (the proxy does not send the header) is closed with a line naming the trust setting as the
  adapter spells it, its default, and the proxy's option (``send-proxy``, ``proxy_protocol on``);
* one whose stream starts with a TLS ClientHello gets a line saying TLS goes after the header;
* an untrusted peer (``127.0.0.2`` with ``trusted="127.0.0.1"``) that sends a v1 or a v2 header
  gets one WARNING naming it and the setting to change, whether SKIP serves its bytes as they
  are or IGNORE removes the header, and REJECT's line says the peer was untrusted;
* under a flood of such connections those WARNINGs stay within the per-kind budget;
* every such line ends by naming the listener it is about;
* TLS given to ``create_server`` under the wrapper (every handshake fails on the header before
  the wrapper sees the connection) is said once, at ERROR.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serving_kit import ADAPTERS, Address, Records
from support import run_on, self_signed_files

import proxyproto
from proxyproto import aio, refusal_log
from proxyproto.aio_protocol import wrap_protocol_factory
from proxyproto.settings import settings_from_environment

REAL_V4 = ("192.0.2.10", 51234)
DEST_V4 = ("198.51.100.20", 443)
V1 = proxyproto.encode_v1(REAL_V4, DEST_V4)
V2 = proxyproto.encode_v2(REAL_V4, DEST_V4)
V2_DGRAM = proxyproto.encode_v2(REAL_V4, DEST_V4, protocol=proxyproto.Protocol.DGRAM)
#: ``Connection: close``: an HTTP server (waitress) closes once it has answered, so the client's read
#: ends there instead of at its 2 s bound.
HTTP = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
#: The start of a real TLS 1.2/1.3 ClientHello record.
CLIENT_HELLO = bytes.fromhex("160301020001") + b"\x00" * 40
UNTRUSTED_SOURCE = "127.0.0.2"

#: How each adapter spells the trust list in its lines.
TRUSTED_NAME = {"socketserver-mixin": "proxy_trusted", "udp-datagram-server": "proxy_trusted"}
#: The adapters driven here (the web servers' own lines are the protocol wrapper's, tested once).
STREAM_ADAPTERS = ["socketserver-mixin", "aio-start_server", "wrap_protocol_factory", "waitress"]
ALL_ADAPTERS = [*STREAM_ADAPTERS, "udp-datagram-server"]

UNTRUSTED_KIND = refusal_log.KIND_UNTRUSTED_HEADER


def exchange(address: Address, data: bytes, source: str = "127.0.0.1") -> None:
    """One connection from ``source``: ``data``, then read until the server closes (or 2 s pass)."""
    with socket.create_connection(address, timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(data)
        sock.settimeout(2)
        with contextlib.suppress(ConnectionResetError, socket.timeout):
            while sock.recv(4096):
                pass


def datagram(address: Address, data: bytes, source: str = "127.0.0.1") -> None:
    """One datagram from ``source``, then one without a header whose reply shows the first was read."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.sendto(data, address)
        sock.sendto(b"no header", address)
        with contextlib.suppress(socket.timeout):
            sock.recvfrom(100)


def lines_of(records: Records, wait_for: str, within: float = 5.0) -> list[str]:
    """The messages logged so far, once one contains ``wait_for`` (or ``within`` seconds passed)."""
    deadline = time.monotonic() + within
    while True:
        messages = [r.getMessage() for r in records.snapshot()]
        if any(wait_for in m for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.02)


def run(adapter: str, knobs: dict[str, object], client: object) -> str:
    """Serve ``adapter`` with ``knobs`` and run ``client(address)`` in a worker thread; the listener's text."""
    serving, loop, _ = ADAPTERS[adapter]
    listening: list[Address] = []

    async def scenario() -> None:
        async with serving(**knobs) as address:
            listening.append(address)
            await asyncio.to_thread(client, address)  # type: ignore[arg-type]
            await asyncio.sleep(0.05)  # a line written by the loop after the client saw the close

    run_on(loop, scenario)
    host, port = listening[0][:2]
    return f"(listener {host}:{port})"


@pytest.mark.parametrize("adapter", STREAM_ADAPTERS)
def test_trusted_peer_without_a_header_is_told_to_turn_on_send_proxy_naming_the_trust_setting(
    adapter: str, records: Records
) -> None:
    listener = run(adapter, {}, lambda address: exchange(address, HTTP))
    lines = lines_of(records, "send-proxy")
    refusal = [m for m in lines if "send-proxy" in m]
    assert len(refusal) == 1, lines
    assert refusal[0].endswith(listener), refusal[0]
    name = TRUSTED_NAME.get(adapter, "trusted")
    assert f"trusted ({name} is 127.0.0.1/32, ::1/128 (the default))" in refusal[0]
    assert "not a PROXY protocol signature" in refusal[0] and "proxy_protocol on" in refusal[0]


@pytest.mark.parametrize("adapter", STREAM_ADAPTERS)
def test_tls_handshake_where_the_header_belongs_says_tls_goes_after_the_header(
    adapter: str, records: Records
) -> None:
    run(adapter, {}, lambda address: exchange(address, CLIENT_HELLO))
    lines = lines_of(records, "TLS handshake")
    refusal = [m for m in lines if "sent a TLS handshake first" in m]
    assert len(refusal) == 1, lines
    assert "the certificate goes to proxyproto" in refusal[0] and "send-proxy" in refusal[0]


@pytest.mark.parametrize("policy", ["SKIP", "IGNORE"])
@pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
@pytest.mark.parametrize("adapter", ALL_ADAPTERS)
def test_untrusted_peer_sending_a_header_gets_one_warning_naming_it_and_the_setting(
    adapter: str, header: bytes, policy: str, records: Records
) -> None:
    knobs = {"trusted": "127.0.0.1", "untrusted_policy": policy}
    if adapter == "udp-datagram-server":
        if header is V1:
            pytest.skip("v1 has no datagram form")

        def client(address: Address) -> None:
            datagram(address, V2_DGRAM + b"payload", UNTRUSTED_SOURCE)

    else:

        def client(address: Address) -> None:
            exchange(address, header + HTTP, UNTRUSTED_SOURCE)

    listener = run(adapter, knobs, client)
    warnings = [r for r in records.snapshot() if getattr(r, "refusal_kind", None) == UNTRUSTED_KIND]
    assert all(r.levelno == logging.WARNING for r in warnings)
    assert len(warnings) == 1, [r.getMessage() for r in records.snapshot()]
    message = warnings[0].getMessage()
    name = TRUSTED_NAME.get(adapter, "trusted")
    assert message.startswith(f"{UNTRUSTED_SOURCE}:"), message
    assert f"is not trusted ({name} is 127.0.0.1/32)" in message and f"add its address to {name}" in message
    assert ("stays in the stream as payload" if policy == "SKIP" else "is removed and not believed") in message
    assert message.endswith(listener), message


@pytest.mark.parametrize("adapter", ["socketserver-mixin", "aio-start_server", "wrap_protocol_factory"])
def test_a_trusted_peer_sending_a_header_gets_no_warning(adapter: str, records: Records) -> None:
    run(adapter, {"trusted": "127.0.0.1"}, lambda address: exchange(address, V2 + HTTP))
    assert not [r for r in records.snapshot() if getattr(r, "refusal_kind", None) == UNTRUSTED_KIND]


@pytest.mark.parametrize("adapter", STREAM_ADAPTERS)
def test_reject_says_the_peer_was_untrusted_and_what_to_change(adapter: str, records: Records) -> None:
    knobs = {"trusted": "127.0.0.1", "untrusted_policy": "REJECT"}
    run(adapter, knobs, lambda address: exchange(address, V1 + HTTP, UNTRUSTED_SOURCE))
    lines = lines_of(records, "REJECT")
    refusal = [m for m in lines if "which policy REJECT refuses" in m]
    assert len(refusal) == 1, lines
    name = TRUSTED_NAME.get(adapter, "trusted")
    assert "(the peer is untrusted" in refusal[0] and f"add its address to {name}" in refusal[0]


def test_a_flood_of_untrusted_headers_stays_within_the_budget_of_its_kind(records: Records) -> None:
    """10,000 untrusted connections, each with a header: at most ``log_rate`` WARNINGs per second."""
    rate = 20
    count = 10_000

    async def scenario() -> None:
        async def served(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                await asyncio.wait_for(reader.read(4096), 5)
            writer.close()

        server = await aio.start_server(served, "127.0.0.1", 0, trusted="127.0.0.1", log_rate=rate)
        address = server.sockets[0].getsockname()[:2]

        def flood() -> None:
            def one(_: int) -> None:
                with socket.create_connection(address, timeout=10, source_address=(UNTRUSTED_SOURCE, 0)) as sock:
                    sock.sendall(V1)
                    with contextlib.suppress(OSError):
                        sock.recv(1)

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(one, range(count)))

        started = time.monotonic()
        try:
            await asyncio.to_thread(flood)
        finally:
            server.close()
            await server.wait_closed()
        elapsed = time.monotonic() - started
        warnings = [r for r in records.snapshot() if getattr(r, "refusal_kind", None) == UNTRUSTED_KIND]
        windows = int(elapsed) + 2  # the budget is per one-second window
        assert 1 <= len(warnings) <= rate * windows, (len(warnings), elapsed)
        assert len(warnings) < count // 10

    run_on("asyncio", scenario, ceiling=120)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_tls_given_to_create_server_instead_of_the_wrapper_is_said_once(
    loop: str, records: Records, tmp_path: Path
) -> None:
    """asyncio's own TLS under the wrapper fails on every header, before the wrapper sees a byte: one ERROR."""
    cert, key = self_signed_files(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def scenario() -> None:
        factory = wrap_protocol_factory(asyncio.Protocol)
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0, ssl=context)
        address = server.sockets[0].getsockname()[:2]
        for _ in range(3):
            await asyncio.to_thread(exchange, address, V1 + HTTP)
        server.close()
        await server.wait_closed()
        gc.collect()

    run_on(loop, scenario)
    errors = [r.getMessage() for r in records.snapshot() if "TLS is negotiated after the header" in r.getMessage()]
    assert len(errors) == 1 and "wrap_protocol_factory(ssl=...)" in errors[0], errors


#: How each adapter spells ``max_pending`` in its lines (the keyword adapters: as the keyword).
MAX_PENDING_NAME = {"socketserver-mixin": "proxy_max_pending"}


@pytest.mark.parametrize("adapter", STREAM_ADAPTERS)
def test_eviction_line_names_max_pending_as_the_adapter_spells_it(adapter: str, records: Records) -> None:
    def three_silent_clients(address: Address) -> None:
        clients = [socket.create_connection(address, timeout=10) for _ in range(3)]
        try:
            lines_of(records, "already wait for their header")
        finally:
            for client in clients:
                client.close()

    run(adapter, {"max_pending": 1}, three_silent_clients)
    evictions = [m for m in lines_of(records, "already wait") if "already wait for their header" in m]
    name = MAX_PENDING_NAME.get(adapter, "max_pending")
    assert evictions and all(f"already wait for their header ({name})" in m for m in evictions), evictions


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        (proxyproto.Settings(), "log_rate"),
        (settings_from_environment({}), "PROXYPROTO_LOG_RATE"),
        (settings_from_environment({"PROXYPROTO_LOG_RATE": "1"}), "PROXYPROTO_LOG_RATE"),
    ],
    ids=["keyword", "environment default", "environment set"],
)
def test_rate_limit_summary_names_log_rate_as_the_settings_spell_it(
    settings: proxyproto.Settings, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    log = refusal_log.RefusalLog(logging.getLogger("proxyproto"), 1, name_of=settings.name_of)
    with caplog.at_level(logging.INFO, logger="proxyproto"):
        log.log(logging.WARNING, "first", kind="malformed header")
        log.log(logging.WARNING, "second, suppressed", kind="malformed header")
        log.flush(now=time.monotonic() + 2)
    summary = [r.getMessage() for r in caplog.records if "suppressed" in r.getMessage()]
    assert len(summary) == 1 and f"per second and kind: {name})" in summary[0], summary
