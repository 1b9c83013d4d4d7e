"""The runnable examples in module docstrings stay true."""
import doctest
import importlib
import pkgutil

import pytest

import hfp_fx
import hfp_fx.passes

MODULES = sorted({m.name for m in pkgutil.walk_packages(hfp_fx.__path__, "hfp_fx.") if m.name != "hfp_fx.__main__"}
                 | {f"hfp_fx.passes.{m.name}" for m in pkgutil.iter_modules(hfp_fx.passes.__path__)})
#: modules whose docstrings show the public API at work: each must keep runnable examples
DOCUMENTED = {"hfp_fx.api", "hfp_fx.plan.cost", "hfp_fx.interop.io", "hfp_fx.progress", "hfp_fx.plan.target", "hfp_fx.analysis.viz",
              "hfp_fx.train.log"}


def examples_in(module) -> int:
    return sum(len(t.examples) for t in doctest.DocTestFinder().find(module))


def test_the_examples_are_found():
    assert DOCUMENTED <= set(MODULES)
    counts = {name: examples_in(importlib.import_module(name)) for name in MODULES}
    assert all(counts[name] > 0 for name in DOCUMENTED), counts
    assert sum(counts.values()) >= 40, counts


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted == examples_in(module)  # every example ran, none skipped
    if name in DOCUMENTED:
        assert result.attempted > 0
