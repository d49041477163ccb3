"""Test-wide settings: float64 for the oracle, strict hypothesis profile in CI."""

import os

import jax
from hypothesis import HealthCheck, settings

# The reference kernel is the oracle in float64.
jax.config.update("jax_enable_x64", True)

settings.register_profile(
    "ci",
    derandomize=True,  # a fixed seed: CI never flakes on a newly drawn example
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
