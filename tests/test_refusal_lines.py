"""Refusal lines in every adapter: budgeted per kind, every line and summary naming its kind,
and the summary written without further traffic.

Each adapter serves on loopback with ``policy=REJECT`` for the test's (trusted) peer and the
default ``log_rate`` (20 lines per second and kind).  A burst of 300 malformed headers spends
the "malformed header" budget; 3 valid headers sent right after, in the same second, are
refused by REJECT and must still be written; the summary of the suppressed lines must come
within 2 s of the burst's end with no further traffic, naming the kind and accounting for
every malformed header.  asyncio-based adapters run in the test's own loop (asyncio or
uvloop), the others in a thread; the clients run in a worker thread over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import pytest
from serving_kit import ADAPTERS, Address, Records
from support import run_on

import proxyproto
from proxyproto import refusal_log

REAL_V4 = ("192.0.2.10", 51234)  # data inside headers, never dialled
DEST_V4 = ("198.51.100.20", 443)
MALFORMED = b"PROXY TCP9 nonsense\r\n"
VALID = proxyproto.encode_v2(REAL_V4, DEST_V4)
VALID_DGRAM = proxyproto.encode_v2(REAL_V4, DEST_V4, protocol=proxyproto.Protocol.DGRAM)
FLOOD = 300
SPOOFS = 3
#: The summary must come this long after the burst at the latest.
SUMMARY_WITHIN = 2.0

MALFORMED_KIND = refusal_log.kind_of(proxyproto.policy.Outcome.INVALID)
REJECT_KIND = refusal_log.kind_of(proxyproto.policy.Outcome.HEADER)



# -- the clients ------------------------------------------------------------------------------


def send_and_wait_for_close(address: Address, data: bytes) -> None:
    """One connection: ``data``, then read until the server closes it (it has decided)."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(4096):
                pass


def tcp_burst(address: Address) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: send_and_wait_for_close(address, MALFORMED), range(FLOOD)))
    for _ in range(SPOOFS):
        send_and_wait_for_close(address, VALID)


def udp_burst(address: Address) -> None:
    """The datagrams in batches, each batch followed by a headerless one whose reply shows the
    server has read the batch (REJECT serves those): none is lost to a full receive buffer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(10)
        batches = [[MALFORMED] * 50 for _ in range(FLOOD // 50)] + [[VALID_DGRAM] * SPOOFS]
        for batch in batches:
            for datagram in batch:
                sock.sendto(datagram, address)
            sock.sendto(b"no header", address)
            assert sock.recvfrom(100)[0] == b"ok"


# -- the test ---------------------------------------------------------------------------------


def accounted(records: list[logging.LogRecord]) -> int:
    """Malformed headers written or counted in a summary so far."""
    written = sum(1 for r in records if getattr(r, "refusal_kind", None) == MALFORMED_KIND)
    counted = sum(getattr(r, "refusal_suppressed", {}).get(MALFORMED_KIND, 0) for r in records)
    return written + counted


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_a_flood_of_malformed_headers_hides_no_reject_line_and_its_summary_comes_unprompted(
    adapter: str, records: Records
) -> None:
    serving, loop, transport = ADAPTERS[adapter]

    async def scenario() -> None:
        async with serving(policy="REJECT") as address:
            burst = udp_burst if transport == "udp" else tcp_burst
            await asyncio.to_thread(burst, address)
            ended = time.monotonic()
            while accounted(records.snapshot()) < FLOOD and time.monotonic() < ended + SUMMARY_WITHIN:
                await asyncio.sleep(0.02)
            waited = time.monotonic() - ended
            seen = records.snapshot()
        assert accounted(seen) == FLOOD, (waited, [r.getMessage() for r in seen[-5:]])
        assert waited < SUMMARY_WITHIN

        rejected = [i for i, r in enumerate(seen) if getattr(r, "refusal_kind", None) == REJECT_KIND]
        assert len(rejected) == SPOOFS, [r.getMessage() for r in seen]
        assert all("REJECT" in seen[i].getMessage() and seen[i].levelno == logging.WARNING for i in rejected)
        summaries = [i for i, r in enumerate(seen) if hasattr(r, "refusal_suppressed")]
        assert summaries
        # The last summary (written by the idle flush, after the REJECT lines) counts malformed
        # headers: they were suppressed in the very window in which the REJECT lines were written.
        last = seen[summaries[-1]]
        assert summaries[-1] > rejected[-1] and last.refusal_suppressed.get(MALFORMED_KIND)  # type: ignore[attr-defined]
        for i in summaries:
            text = seen[i].getMessage()
            assert f"x {MALFORMED_KIND}" in text and "%s" not in text, text
        # Every refusal line names a kind from the fixed set; nothing else was refused.
        kinds = {getattr(r, "refusal_kind", None) for r in seen if not hasattr(r, "refusal_suppressed")}
        assert kinds <= {MALFORMED_KIND, REJECT_KIND, None}
        assert all(
            ": closed: " not in r.getMessage() and "dropped" not in r.getMessage()
            for r in seen
            if not hasattr(r, "refusal_kind") and not hasattr(r, "refusal_suppressed")
        )

    run_on(loop, scenario)


# -- the timer behind the unprompted summary --------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def timed_log(monkeypatch: pytest.MonkeyPatch) -> tuple[refusal_log.RefusalLog, Clock, list[tuple[float, Any]]]:
    """A RefusalLog (rate 1) on a fake clock whose ``later`` only records what it was asked."""
    clock = Clock()
    monkeypatch.setattr(refusal_log.time, "monotonic", clock)
    asked: list[tuple[float, Any]] = []

    def later(delay: float, callback: Callable[[], None]) -> bool:
        asked.append((delay, callback))
        return True

    return refusal_log.RefusalLog(logging.getLogger("proxyproto"), 1, later=later), clock, asked


def test_a_suppressed_line_arms_one_timer_for_just_after_its_window(
    monkeypatch: pytest.MonkeyPatch, records: Records
) -> None:
    log, clock, asked = timed_log(monkeypatch)
    for _ in range(5):
        log.log(logging.WARNING, "%s", "bad", kind="malformed header")
        clock.now += 0.1
    assert len(asked) == 1 and 1.0 <= 0.1 + asked[0][0] <= 1.1  # armed at the 2nd line, 0.1 s in
    clock.now = 101.0 + asked[0][0] - 0.1
    asked[0][1]()
    summaries = [r for r in records.snapshot() if hasattr(r, "refusal_suppressed")]
    assert [s.refusal_suppressed for s in summaries] == [{"malformed header": 4}]  # type: ignore[attr-defined]


def test_a_timer_firing_before_its_window_ends_is_armed_again(
    monkeypatch: pytest.MonkeyPatch, records: Records
) -> None:
    log, clock, asked = timed_log(monkeypatch)
    log.log(logging.WARNING, "line", kind="malformed header")
    log.log(logging.WARNING, "line", kind="malformed header")
    clock.now += 0.9  # a loop's timer may fire a clock tick early
    asked[0][1]()
    assert not [r for r in records.snapshot() if hasattr(r, "refusal_suppressed")]
    assert len(asked) == 2 and asked[1][0] > 0.1
    clock.now += asked[1][0]
    asked[1][1]()
    assert [r for r in records.snapshot() if hasattr(r, "refusal_suppressed")]


def test_a_timer_lost_with_its_loop_is_replaced_a_window_later(monkeypatch: pytest.MonkeyPatch) -> None:
    log, clock, asked = timed_log(monkeypatch)
    log.log(logging.WARNING, "line", kind="malformed header")
    log.log(logging.WARNING, "line", kind="malformed header")  # armed; that timer never fires
    clock.now += 0.5
    log.log(logging.WARNING, "line", kind="malformed header")
    assert len(asked) == 1  # one timer per window, not one per line
    clock.now += 3.0
    log.log(logging.WARNING, "line", kind="malformed header")  # a new window: counted afresh
    log.log(logging.WARNING, "line", kind="malformed header")
    assert len(asked) == 2


def test_a_line_whose_listener_can_no_longer_be_asked_is_written_without_it(caplog: pytest.LogCaptureFixture) -> None:
    """The listener is asked only when a line is written; one closed by then costs the clause, never the line."""
    from proxyproto.refusal_log import RefusalLog

    closed = socket.socket()
    closed.close()
    log = RefusalLog(logging.getLogger("proxyproto"), rate=None)
    with caplog.at_level(logging.INFO, logger="proxyproto"):
        log.read_failed(("192.0.2.1", 4000), "reset", listener=closed.getsockname)
    assert [r.getMessage() for r in caplog.records] == ["192.0.2.1:4000: closed: reset while reading the PROXY header"]
