"""The ``Examples:`` of the public docstrings run, and say what they show."""

from __future__ import annotations

import doctest
import importlib
import pathlib
import subprocess
import sys

import pytest

MODULES = [
    "jattn.api",
    "jattn.plan",
    "jattn.kernels",
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


ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_says_make_plan_returns_the_plan_and_the_arrays():
    import jax.numpy as jnp

    from jattn.plan import Plan, make_plan

    assert "plan, q, k, v = jattn.plan.make_plan(" in README
    kernels_md = (ROOT / "docs" / "kernels.md").read_text(encoding="utf-8")
    assert "make_plan(...)  -> (plan, q, k, v)" in kernels_md
    q = jnp.ones((1, 4, 2, 8))
    result = make_plan(q, q, q, is_causal=True)
    assert len(result) == 4 and isinstance(result[0], Plan)
    assert all(a.shape == q.shape for a in result[1:])


def test_readme_tells_how_to_keep_the_bench_extra_cpu_only():
    cpu_build = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert cpu_build in README
    # before the extra, in the same block, so that the extra finds torch installed
    block = README[README.index(cpu_build) :]
    assert block.index('pip install -e ".[bench]"') < block.index("```")
    # the two set-up commands themselves are unchanged
    assert 'pip install -e ".[bench]" && python -m bench\n' in README
    assert 'pip install -e ".[dev]" && python -m pytest -n auto -q\n' in README


def test_readme_and_docs_pass_the_development_format_check():
    """`ruff format --check .` (the README's command) formats Markdown code blocks too."""
    pytest.importorskip("ruff")
    files = ["README.md", *(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
