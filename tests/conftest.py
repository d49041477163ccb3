"""Test-wide settings: float64 for the oracle, strict hypothesis profile in CI, and the
device check's options (``--impls``, read by tests/kernels/test_suite.py)."""

import os

import jax
import pytest
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
# The device check (python -m bench device): fewer random cases, each a compile on the device.
settings.register_profile(
    "device",
    derandomize=True,
    max_examples=10,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser):
    parser.addoption(
        "--impls",
        default=None,
        metavar="NAMES",
        help="the device check: run the shared kernel suite (tests/kernels/test_suite.py) on "
        "these comma-separated implementations only, each at its default config, on JAX's "
        "default backend, float32 products at full precision, sequences up to 4k; the float64 "
        "reference stays on the host CPU (python -m bench device runs it)",
    )


def pytest_configure(config):
    text = config.getoption("--impls")
    if text is not None:
        from tests import helpers

        try:
            helpers.configure_device_run(text)
        except ValueError as e:
            raise pytest.UsageError(str(e)) from None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A call that a partial implementation (tests.helpers.Variant.partial: cuDNN) refuses,
    naming itself, is skipped with its reason: whether it serves a call is its own judgement."""
    try:
        return (yield)
    except NotImplementedError as e:
        impl = getattr(item, "funcargs", {}).get("impl")
        name = getattr(impl, "name", None)
        if getattr(impl, "partial", False) and (
            str(e).startswith(f"{name} does not support") or f"'{name}' does not support" in str(e)
        ):
            pytest.skip(f"{name} refuses this call: {e}")
        raise
