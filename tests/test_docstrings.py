"""The runnable examples in module docstrings stay true."""
import doctest
import importlib
import pkgutil

import pytest

import hfp_fx
import hfp_fx.passes

MODULES = sorted({f"hfp_fx.{m.name}" for m in pkgutil.iter_modules(hfp_fx.__path__) if m.name not in ("__main__",)}
                 | {f"hfp_fx.passes.{m.name}" for m in pkgutil.iter_modules(hfp_fx.passes.__path__)})


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
