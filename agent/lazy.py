"""Modules imported on their first use, to keep an idle agent small.

An idle agent on a node that has no libvirtd, no Ceph and no chassis should not
pay for the code that drives them: the libvirt binding alone is ~12 MB of RSS.
``lazy_import("x")`` returns a stand-in whose first attribute access imports
``x`` through the normal import system (so under its lock: two threads that
touch it at once get the same, fully initialised module; the stdlib's LazyLoader
is not thread-safe on 3.11).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any


class LazyModule(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        module = sys.modules.get(self.__name__)
        # While another thread is still importing the module, sys.modules already holds
        # it half-initialised (a Cython module then fails with NameError/AttributeError):
        # import_module waits for that import (importlib marks it the same way).
        if module is None or module is self or \
                getattr(getattr(module, "__spec__", None), "_initializing", False):
            module = importlib.import_module(self.__name__)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


def lazy_import(name: str) -> Any:
    """The module `name`, imported when first used; ImportError at once if it is
    not installed at all (a broken one fails at first use, with its own error)."""
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec(name) is None:
        raise ImportError(f"No module named '{name}'")
    return LazyModule(name)
