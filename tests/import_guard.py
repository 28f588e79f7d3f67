"""Run code with some packages refused: ``refused_imports`` hides the named packages (and
re-imports the ``fresh`` ones, so their top-level imports run again), refuses every import of
the refused ones, and afterwards puts every module back as it was."""

from __future__ import annotations

import contextlib
import importlib.abc
import sys
from collections.abc import Callable


class RefuseImports(importlib.abc.MetaPathFinder):
    """Refuses (and records) every import whose top-level package is in ``refused``."""

    def __init__(self, refused: tuple[str, ...]) -> None:
        self.refused, self.asked = refused, []

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.refused:
            self.asked.append(name)
            raise ImportError(f"{name} is refused here")
        return None


@contextlib.contextmanager
def refused_imports(refused: tuple[str, ...], fresh: Callable[[str], bool]):
    """Modules of ``refused`` packages and those ``fresh(name)`` selects leave ``sys.modules``;
    importing a refused one raises. Yields the names that were asked for."""
    saved = dict(sys.modules)
    for name in list(sys.modules):
        if name.partition(".")[0] in refused or fresh(name):
            del sys.modules[name]
    finder = RefuseImports(refused)
    sys.meta_path.insert(0, finder)
    try:
        yield finder.asked
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n not in saved]:
            del sys.modules[name]
        sys.modules.update(saved)
        # A package's attribute names its submodule too: point those back as well.
        for name, module in saved.items():
            parent, _, child = name.rpartition(".")
            if fresh(name) and parent in saved:
                setattr(saved[parent], child, module)
