"""The one eviction rule of the asyncio adapters (:class:`proxyproto.parking.Parking`), by itself.

The soft ``RLIMIT_NOFILE`` is replaced by a number for these tests (the
process's own limit is never changed); the descriptors are the numbers a
loop would have given the connections.  What the real servers do with it
is in tests/web/test_out_of_descriptors.py.
"""

from __future__ import annotations

import logging

import pytest

from proxyproto import parking
from proxyproto.parking import Parking, descriptor_reserve
from proxyproto.refusal_log import RefusalLog

LIMIT = 64


@pytest.fixture
def closed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(parking, "_soft_limit", lambda: LIMIT)
    return []


def make(closed: list[str]) -> Parking[str]:
    return Parking(RefusalLog(logging.getLogger("proxyproto"), None), closed.append)


@pytest.mark.parametrize(("limit", "reserve"), [(64, 8), (256, 32), (1024, 32), (1_048_576, 32), (8, 1), (7, 0)])
def test_descriptor_reserve_is_an_eighth_of_the_limit_and_at_most_32(limit: int, reserve: int) -> None:
    assert descriptor_reserve(limit) == reserve


def test_below_the_reserve_only_max_pending_evicts_the_oldest(
    closed: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proxyproto")
    waiting = make(closed)
    for n in range(5):
        waiting.add(f"c{n}", ("127.0.0.1", 1000 + n), 10 + n, max_pending=3)
    assert closed == ["c0", "c1"] and list(waiting.waiting) == ["c2", "c3", "c4"]
    assert [r.getMessage() for r in caplog.records] == [
        "127.0.0.1:1000: closed: 3 connections already wait for their header (max_pending)",
        "127.0.0.1:1001: closed: 3 connections already wait for their header (max_pending)",
    ]


def test_a_connection_within_the_reserve_cuts_the_waiting_ones_down_to_the_reserve(
    closed: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proxyproto")
    waiting = make(closed)
    for fd in range(10, 56):  # 46 connections below the reserve's first descriptor (64 - 8)
        waiting.add(f"c{fd}", ("127.0.0.1", fd), fd, max_pending=256)
    assert closed == []
    waiting.add("c56", ("127.0.0.1", 56), 56, max_pending=256)
    assert len(waiting) == 8 and closed == [f"c{fd}" for fd in range(10, 49)]
    assert list(waiting.waiting)[-1] == "c56"
    expected = "closed: 8 connections already wait for their header (the process is near its RLIMIT_NOFILE of 64)"
    assert caplog.records[0].getMessage() == f"127.0.0.1:10: {expected}"

    # The cap holds for the connections that take the descriptors given back (low numbers) ...
    waiting.add("c10-again", ("127.0.0.1", 2), 10, max_pending=256)
    assert len(waiting) == 8 and closed[-1] == "c49"
    # ... until no connection waits: then only max_pending applies again.
    for key in list(waiting.waiting):
        assert waiting.discard(key)
    assert not waiting.discard("c56")  # not parked any more
    for fd in range(10, 30):
        waiting.add(f"d{fd}", ("127.0.0.1", fd), fd, max_pending=256)
    assert len(waiting) == 20


def test_without_a_known_descriptor_only_max_pending_applies(closed: list[str]) -> None:
    waiting = make(closed)
    for n in range(100):
        waiting.add(f"c{n}", ("127.0.0.1", n), None, max_pending=256)
    assert closed == [] and len(waiting) == 100


def test_adding_a_connection_twice_changes_nothing(closed: list[str]) -> None:
    waiting = make(closed)
    waiting.add("a", None, 10, max_pending=1)
    waiting.add("a", None, 10, max_pending=1)
    assert closed == [] and list(waiting.waiting) == ["a"]


def test_the_knob_is_named_as_the_adapter_spells_it(closed: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="proxyproto")
    spelled = lambda knob: f"proxy_{knob}"  # noqa: E731  (a Settings.name_of, as the mixins spell knobs)
    waiting: Parking[str] = Parking(RefusalLog(logging.getLogger("proxyproto"), None, name_of=spelled), closed.append)
    for n in range(3):
        waiting.add(f"c{n}", ("127.0.0.1", 1000 + n), None, max_pending=2)
    assert closed == ["c0"]
    assert caplog.records[-1].getMessage() == (
        "127.0.0.1:1000: closed: 2 connections already wait for their header (proxy_max_pending)"
    )


def test_evict_oldest_closes_the_oldest_with_the_same_sentence(
    closed: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proxyproto")
    waiting = make(closed)
    for n in range(3):
        waiting.add(f"c{n}", ("127.0.0.1", 1000 + n), None, max_pending=256)
    waiting.evict_oldest(len(waiting), "the process is out of file descriptors")
    assert closed == ["c0"] and list(waiting.waiting) == ["c1", "c2"]
    assert caplog.records[-1].getMessage() == (
        "127.0.0.1:1000: closed: 3 connections already wait for their header (the process is out of file descriptors)"
    )
    assert caplog.records[-1].refusal_kind == parking.EVICTED
