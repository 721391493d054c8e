"""Every adapter honours DESIGN.md's policy table, cell for cell, and "What a handler sees".

One table of cases (``contract_kit``) runs against every adapter: trusted and untrusted peers,
every policy, every kind of start of stream, delivered at once, in two writes or byte by byte;
silent and slow clients; ``max_pending``; TLS after the header.  The expected outcome of every
cell comes from one function (``contract_kit.expect``) reading the table, never from the adapter.
Where an adapter disagrees today, the cell is an ``xfail(strict=True)`` naming the disagreement
(``DISAGREEMENTS`` below), so fixing the adapter turns it into a failure that asks for its removal.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from contract_kit import (
    ADAPTERS,
    BY_NAME,
    COLUMNS,
    DATAGRAM_KINDS,
    DEST_V4,
    REAL_V4,
    STREAM_KINDS,
    Adapter,
    Cell,
    Certificate,
    Client,
    Kind,
    Observation,
    Servers,
    Settings,
    cells_for,
    check,
    chunks_of,
    datagram_exchange,
    payload_for,
    run_timed,
    self_signed,
    timed_cells,
    timed_stream,
    v1,
    v2,
)
from support import require_module

#: Cells where an adapter disagrees with DESIGN.md today: (adapter, test, case id regex) -> reason.
DISAGREEMENTS: dict[tuple[str, str, str], str] = {}


def _marks(adapter: Adapter, test: str, case_id: str) -> list[Any]:
    for (name, which, pattern), reason in DISAGREEMENTS.items():
        if name == adapter.name and which == test and re.fullmatch(pattern, case_id):
            return [pytest.mark.xfail(strict=True, reason=reason)]
    return []


def _cases(test: str) -> list[tuple[Adapter, Any, str]]:
    """(adapter, case, id) for ``test``, adapter by adapter."""
    cases: list[tuple[Adapter, Any, str]] = []
    for adapter in ADAPTERS:
        if test == "test_policy_table_cell_is_honoured":
            cases += [(adapter, cell, cell.id) for cell in cells_for(adapter)]
        elif test == "test_silent_and_slow_clients_get_their_cell_of_the_table":
            cases += [(adapter, cell, cell.id) for cell in timed_cells(adapter)]
        elif test in HEADER_TESTS:
            peer, policies = HEADER_TESTS[test]
            kinds = DATAGRAM_KINDS[:3] if adapter.datagram else [k for k in STREAM_KINDS if k.name in HEADER_KINDS]
            cases += [(adapter, Cell(peer, p, k), f"{p}-{k.name}") for p in policies for k in kinds]
        elif test == "test_tls_after_the_header" and adapter.tls:
            cases += [(adapter, case, case) for case in TLS_CASES]
        elif test == "test_past_max_pending_the_oldest_waiting_connection_is_closed" and not adapter.datagram:
            cases.append((adapter, None, "max_pending=2"))
    return cases


HEADER_KINDS = ("v1", "v2", "v2-inet6", "v2-local", "v1-unknown")
HEADER_TESTS = {
    "test_trusted_peers_header_reaches_the_app": ("trusted", ("REQUIRE", "USE", "IGNORE")),
    "test_untrusted_peers_header_never_reaches_the_app": ("untrusted", ("SKIP", "IGNORE", "REJECT")),
}
TLS_CASES = ("trusted-v2-then-tls", "trusted-v1-then-tls", "untrusted-tls-without-header", "trusted-tls-without-header")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "servers" not in metafunc.fixturenames:
        return
    name = metafunc.function.__name__
    params = [
        pytest.param(adapter.name, case, id=f"{adapter.name}-{case_id}", marks=_marks(adapter, name, case_id))
        for adapter, case, case_id in _cases(name)
    ]
    metafunc.parametrize(["servers", "case"], params, indirect=["servers"], scope="module")


@pytest.fixture(scope="session")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Certificate | None:
    return self_signed(Path(tmp_path_factory.mktemp("contract-tls")))


@pytest.fixture(scope="module")
def servers(request: pytest.FixtureRequest, cert: Certificate | None) -> Iterator[Servers]:
    """The servers of one adapter (started on first use per settings); its timed probes start at once."""
    import concurrent.futures

    adapter = BY_NAME[request.param]
    for module in adapter.requires:
        require_module(module)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    timed = "test_silent_and_slow_clients_get_their_cell_of_the_table"
    wanted = any(
        getattr(item, "originalname", "") == timed and item.callspec.params.get("servers") == adapter.name
        for item in request.session.items
    )
    with Servers.serving(adapter, cert) as running:
        # Silent and slow clients wait past their deadline: in the background, while the other cells run.
        running.timed = pool.submit(run_timed, adapter, running) if wanted else None
        try:
            yield running
        finally:
            if running.timed is not None:
                concurrent.futures.wait([running.timed], timeout=30)
            pool.shutdown(wait=False)


def _run_cell(servers: Servers, cell: Cell) -> tuple[Observation, Any, bytes]:
    """Serve ``cell`` on its server: (what the client saw, the client's own address, the bytes sent)."""
    adapter = servers.adapter
    running = servers.get(cell.settings(adapter))
    chunks = chunks_of(cell.kind, payload_for(adapter), cell.delivery)
    if adapter.datagram:
        seen, own = datagram_exchange(running, cell.peer, cell.policy, b"".join(chunks))
        return seen, own, b"".join(chunks)
    client = Client(adapter, running, cell.peer)
    client.send(chunks)
    return client.observe(), client.own_address, b"".join(chunks)


def test_policy_table_cell_is_honoured(servers: Servers, case: Cell) -> None:
    """Served with which address and payload, or closed: as DESIGN.md's table says for this cell."""
    seen, own, stream = _run_cell(servers, case)
    check(servers.adapter, case.expected(servers.adapter, stream), seen, own)


def test_silent_and_slow_clients_get_their_cell_of_the_table(servers: Servers, case: Cell) -> None:
    """Nothing, or half a header, until past header_timeout: closed, or served without a header, as the table says."""
    seen, own = servers.timed.result(timeout=60)[case.id]
    check(servers.adapter, case.expected(servers.adapter, timed_stream(case, servers.adapter)), seen, own)


def test_trusted_peers_header_reaches_the_app(servers: Servers, case: Cell) -> None:
    """Under REQUIRE, USE and IGNORE a trusted peer's header (LOCAL and UNKNOWN too) is the app's to read."""
    seen, own, stream = _run_cell(servers, case)
    expected = case.expected(servers.adapter, stream)
    check(servers.adapter, expected, seen, own)
    assert seen.report is not None and seen.report["header"] == expected.header


def test_untrusted_peers_header_never_reaches_the_app(servers: Servers, case: Cell) -> None:
    """An untrusted peer's header is never the app's, under any policy: served without it, or closed."""
    seen, own, stream = _run_cell(servers, case)
    check(servers.adapter, case.expected(servers.adapter, stream), seen, own)
    assert seen.report is None or seen.report["header"] is None


def test_tls_after_the_header(servers: Servers, case: str, cert: Certificate | None) -> None:
    """``ssl=``: the header arrives in clear, the handshake follows it; an untrusted peer (SKIP) handshakes at once."""
    if cert is None:
        pytest.skip("the openssl command is not installed (it makes the test certificate)")
    adapter = servers.adapter
    peer, _, rest = case.partition("-")
    settings = Settings("REQUIRE", "SKIP", adapter.trusted_setting(peer), tls=True)
    client = Client(adapter, servers.get(settings), peer)
    header = {"v2": v2(REAL_V4, DEST_V4), "v1": v1(REAL_V4, DEST_V4)}.get(rest.split("-")[0], b"")
    client.send([header])
    try:
        client.start_tls(cert)
    except (ssl.SSLError, OSError):
        assert case == "trusted-tls-without-header", "the handshake after the header failed"
        return
    payload = payload_for(adapter, tls=True)
    client.send([payload])
    seen = client.observe(tls=True)
    cell = Cell(peer, "REQUIRE" if peer == "trusted" else "SKIP", Kind("tls", "header" if header else "no header",
                                                                      header, REAL_V4, "PROXY"))
    check(adapter, cell.expected(adapter, header + payload), seen, client.own_address)


def test_past_max_pending_the_oldest_waiting_connection_is_closed(servers: Servers, case: None) -> None:
    """Three connections waiting for their header with max_pending=2: the first is closed at once, the others served.

    The header timeout is far longer than the wait for the close, so only the eviction can close it.
    """
    adapter = servers.adapter
    trusted = adapter.trusted_setting("trusted")
    running = servers.get(Settings("REQUIRE", "SKIP", trusted, header_timeout=3600.0, max_pending=2))
    header, payload = v2(REAL_V4, DEST_V4), payload_for(adapter)
    oldest, second, third = (Client(adapter, running, "trusted") for _ in range(3))
    for client in (oldest, second, third):
        client.send([header[:7]])
    assert oldest.closed_by_server(within=10.0), "the oldest waiting connection was not closed"
    for client in (second, third):
        client.send([header[7:] + payload])
        seen = client.observe()
        assert seen.report is not None, f"a connection within max_pending was not served: {seen}"
        assert seen.report["client"] == list(REAL_V4)


def test_every_adapter_runs_the_whole_table() -> None:
    """Each adapter gets the full table for its transport (a new adapter cannot join with fewer cases)."""
    columns = len(COLUMNS)
    for adapter in ADAPTERS:
        cells = cells_for(adapter)
        if adapter.datagram:
            assert len(cells) == columns * len(DATAGRAM_KINDS)
        else:
            assert {cell.kind.name for cell in cells} >= {k.name for k in STREAM_KINDS if not k.raw_only}
            assert len(cells) >= columns * len(STREAM_KINDS)
