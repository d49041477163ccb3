"""The ``Examples:`` of the public docstrings run, and say what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "jattn.api",
    "jattn.plan",
    "jattn.masks",
    "jattn.optim",
    "jattn.nn.attention",
    "jattn.nn.blocks",
    "jattn.nn.models",
    "jattn.nn.positions",
    "jattn.nn.losses",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"
    assert result.attempted > 0, f"{name} has no runnable example"
