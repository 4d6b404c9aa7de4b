"""Every docstring example in the package is also a test (STYLE: the collator's example is its test)."""

import doctest
import importlib
import pkgutil

import pytest

import dpolab

MODULES = sorted(m.name for m in pkgutil.walk_packages(dpolab.__path__, "dpolab."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
