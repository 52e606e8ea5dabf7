"""Shared test setup: hypothesis profiles.

``ci`` (the default) keeps the whole suite fast and reproducible; ``dev`` searches harder;
``device`` is ``ci`` without shrinking, for a short lease on a GPU machine, where a failing
kernel would otherwise spend the lease recompiling shrunk examples. Pick one with
``HYPOTHESIS_PROFILE=dev pytest``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)

settings.register_profile("ci", max_examples=20, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=200, **_COMMON)
settings.register_profile("device", max_examples=10, derandomize=True,
                          phases=[Phase.explicit, Phase.generate], **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
