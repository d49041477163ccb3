"""The seams between the rooms: who may use what, and what the README promises."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import jattn
from jattn import masks

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    p
    for folder in ("jattn", "bench", "examples", "tests")
    for p in (ROOT / folder).rglob("*.py")
    if p != ROOT / "jattn" / "masks.py"
)


def _private_uses_of_masks(tree: ast.AST) -> list[str]:
    """Private names of jattn.masks that a module imports or reads as attributes."""
    aliases = set()  # local names bound to the jattn.masks module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "jattn":
            aliases |= {a.asname or a.name for a in node.names if a.name == "masks"}
        elif isinstance(node, ast.ImportFrom) and node.module == "jattn.masks":
            found += [a.name for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "jattn.masks" and a.asname}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            base = node.value
            if isinstance(base, ast.Name) and base.id in aliases:
                found.append(node.attr)
            # jattn.masks._x
            if (
                isinstance(base, ast.Attribute)
                and base.attr == "masks"
                and isinstance(base.value, ast.Name)
                and base.value.id == "jattn"
            ):
                found.append(node.attr)
    # Methods private to the mask classes, called on mask objects anywhere.
    mask_private = {
        n
        for cls in vars(masks).values()
        if isinstance(cls, type) and issubclass(cls, masks.Mask)
        for n in vars(cls)
        if n.startswith("_") and not n.startswith("__")
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in mask_private:
            found.append(node.attr)
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_uses_private_names_of_masks(path):
    uses = _private_uses_of_masks(ast.parse(path.read_text(), str(path)))
    assert not uses, f"{path.relative_to(ROOT)} uses private names of jattn.masks: {uses}"


def test_the_private_name_check_can_fail():
    bad = "from jattn import masks as m\nm._PlanParts\nx.mask._lower(p)\n"
    assert _private_uses_of_masks(ast.parse(bad)) == ["_PlanParts", "_lower"]


def _readme_default_orders() -> dict[tuple[str, str], tuple[str, ...]]:
    """The README's list: ``- <backend>, <short|long> calls: `a` → `b` → ...``."""
    text = (ROOT / "README.md").read_text()
    pattern = re.compile(r"^- (cpu|gpu|tpu), (short|long) calls: (.+)$", re.M)
    return {
        (backend, size): tuple(re.findall(r"`(\w+)`", names))
        for backend, size, names in pattern.findall(text)
    }


def test_readme_states_the_default_order():
    """The README lists the order as it is today: DEFAULT_ORDER without the kernels that have
    not been verified on the backend's hardware."""
    stated = _readme_default_orders()
    actual = {
        (backend, size): tuple(n for n in order if jattn.kernels.verified(n, backend))
        for backend, sizes in jattn.kernels.DEFAULT_ORDER.items()
        for size, order in sizes.items()
    }
    assert stated == actual


def test_default_order_follows_the_literal_order():
    kernels = jattn.kernels
    for backend, sizes in kernels.DEFAULT_ORDER.items():
        short = kernels.default_order(backend, 8, 8)
        long = kernels.default_order(backend, 4096, 4096)
        for got, size in ((short, "short"), (long, "long")):
            want = [
                n for n in sizes[size] if n in kernels.REGISTRY and kernels.verified(n, backend)
            ]
            assert got == want
    # Every name in the orders is an implementation the project has, registered or not.
    names = {n for sizes in jattn.kernels.DEFAULT_ORDER.values() for o in sizes.values() for n in o}
    assert names <= set(jattn.kernels.REGISTRY) | set(jattn.kernels.UNAVAILABLE)
    assert set(jattn.kernels.VERIFIED_ON_DEVICE) <= names


def test_import_loads_neither_flax_nor_optax():
    """A user who only calls the kernels does not import Flax or optax; jattn.nn and
    jattn.optim bring them in when first used."""
    code = (
        "import sys, jattn\n"
        "print(sorted(m for m in ('flax', 'optax') if m in sys.modules))\n"
        "jattn.optim, jattn.nn\n"
        "print(sorted(m for m in ('flax', 'optax') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout.split("\n")
    assert out[:2] == ["[]", "['flax', 'optax']"]
