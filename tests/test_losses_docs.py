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
