"""The dependency lower bounds in pyproject.toml cover the APIs dpolab calls."""

import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# package → (first release with the API, the API dpolab relies on): from the packages' release history.
FIRST_RELEASE_WITH = {
    "peft": ((0, 19), "PeftModel.set_adapter(..., inference_mode=True), in dpolab.adapters.AdapterReference"),
}


def lower_bound(package: str) -> tuple[int, ...]:
    """The ``>=`` bound of ``package`` in the project's dependencies (tomllib needs Python 3.11; 3.10 is supported)."""
    text = (ROOT / "pyproject.toml").read_text()
    version = re.search(rf'^\s*"{package}>=([\d.]+)', text, re.MULTILINE).group(1)
    return tuple(int(x) for x in version.split("."))


def test_lower_bounds_cover_the_apis_used():
    for package, (first, api) in FIRST_RELEASE_WITH.items():
        assert lower_bound(package) >= first, f"{package}: {api} needs >= {'.'.join(map(str, first))}"


def test_the_installed_peft_has_the_api():
    from peft import PeftModel

    assert "inference_mode" in inspect.signature(PeftModel.set_adapter).parameters
