"""Shared pytest configuration.

Hypothesis runs 10,000 examples per property under CI (``CI=true``) and a
quicker 300 locally; both profiles are deterministic enough never to flake on time.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")
