"""Shared pytest configuration.

Hypothesis runs 10,000 examples per property under CI (``CI=true``) and a
quicker 300 locally; both profiles are deterministic enough never to flake on time.
"""

from __future__ import annotations

import logging
import os
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
