"""docs/losses.md is generated from the registry; the committed file must equal the generator's output."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dpolab.losses import LOSSES

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_loss_docs", ROOT / "scripts" / "gen_loss_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docs_are_up_to_date():
    text = (ROOT / "docs" / "losses.md").read_text()
    assert text == _generator().render(), "docs/losses.md is stale: run python scripts/gen_loss_docs.py"


def test_docs_cover_every_loss_and_param():
    text = (ROOT / "docs" / "losses.md").read_text()
    for name, loss in LOSSES.items():
        assert f"### `{name}`" in text and loss.paper in text
        for p in loss.params:
            assert f"`{p}`" in text


def test_every_loss_names_the_independent_check_that_pins_it():
    """docs/losses.md says, per registry loss, which independent check pins it (TRL's code, a closed form, an
    optimisation, calculus, a hand-worked number) and names the test; every named test exists."""
    import ast

    tests_by_file: dict = {}
    for name, loss in LOSSES.items():
        entries = loss.pinned_by  # declared with the loss, in its module
        assert entries, f"no pinning check declared for {name}"
        for what, test in entries:
            path, func = test.split("::")
            if path not in tests_by_file:
                tree = ast.parse((ROOT / path).read_text())
                tests_by_file[path] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert func in tests_by_file[path], f"{name}: {test} does not exist"
    text = (ROOT / "docs" / "losses.md").read_text()
    for name in LOSSES:
        section = text.split(f"### `{name}`", 1)[1].split("```text", 1)[0]
        assert "- pinned by: " in section and "tests/" in section, name
