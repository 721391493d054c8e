"""Shared pytest configuration.

Hypothesis runs 10,000 examples per property under CI (``CI=true``) and a
quicker 300 locally; both profiles are deterministic enough never to flake on time.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from serving_kit import Records

settings.register_profile(
    "ci", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")

# A suite started as a background job of a shell without job control (``bash .ci/run &``) inherits
# SIGINT ignored, and so would every server a test starts: one stopped with SIGINT would wait out its
# kill fallback instead of stopping.  Python's own handler, as in a foreground run (children then
# start with the default disposition).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def records() -> Iterator[Records]:
    """The ``proxyproto`` logger's records during the test, at INFO and above."""
    from serving_kit import Records

    logger = logging.getLogger("proxyproto")
    handler = Records()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
