"""Shared by the example tests."""

from __future__ import annotations

from typing import Any

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def quick_compiles() -> Any:
    """Tiny models run in milliseconds; what costs here is XLA optimising each new program
    (train step, evaluation, decoding), which it does several times faster at this setting."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)
