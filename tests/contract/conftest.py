"""Run the contract adapter by adapter, so each adapter's servers live once (its module-scoped fixture).

pytest's own grouping by a module-scoped parameter does not hold here, where the adapter and the
case are parametrised together; this sorts the contract's items by adapter (the order of
``contract_kit.ADAPTERS``), keeping the test functions' order within one, the timed probes last
(they run in the background from the adapter's start, so by then their wait is over).
"""

from __future__ import annotations

import pytest
from contract_kit import ADAPTERS

_ADAPTER_ORDER = {adapter.name: i for i, adapter in enumerate(ADAPTERS)}
_LAST = "test_silent_and_slow_clients_get_their_cell_of_the_table"


def _key(item: pytest.Item) -> tuple[int, int]:
    callspec = getattr(item, "callspec", None)
    adapter = callspec.params.get("servers") if callspec is not None else None
    return (_ADAPTER_ORDER.get(adapter, -1), 1 if getattr(item, "originalname", "") == _LAST else 0)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mine = [i for i, item in enumerate(items) if item.path.parent.name == "contract"]
    if mine:
        ordered = sorted((items[i] for i in mine), key=_key)  # stable: test order kept within an adapter
        for slot, item in zip(mine, ordered):
            items[slot] = item
