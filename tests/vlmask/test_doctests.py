"""The examples in docstrings run (``--doctest-modules`` over ``vlmask`` and ``vlmask_plugins``).

Each module is one test, so a broken example fails naming its module. The same check from the
command line: ``python -m pytest --doctest-modules vlmask plugins/vlmask_plugins -o addopts=""``.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import vlmask
import vlmask_plugins


def modules() -> list[str]:
    names = []
    for package in (vlmask, vlmask_plugins):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            if not info.name.endswith("__main__"):
                names.append(info.name)
    return sorted(names)


def test_the_doctests_cover_both_packages() -> None:
    with_examples = [name for name in modules() if doctest.DocTestFinder().find(importlib.import_module(name))
                     and any(t.examples for t in doctest.DocTestFinder().find(importlib.import_module(name)))]
    assert any(n.startswith("vlmask.") for n in with_examples) and any(n.startswith("vlmask_plugins.") for n in with_examples)


@pytest.mark.parametrize("name", modules())
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed (output above)"
