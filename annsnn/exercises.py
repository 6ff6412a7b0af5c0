"""Helpers for the chapters' self-checks.

Every exercise in the book has a checker that prints one line: ``Not implemented yet: ...`` while the
stub returns ``None``, ``Not yet: ...`` with a hint when the answer is wrong, and ``Correct!`` when it
is right. A checker never raises, so "Run all" goes on to the end of the chapter.

Some exercises ask for something the package already computes (a closed-form rate, Omega, the fit
curve). :func:`library_calls` tells a checker whether the answer was written or borrowed: it calls the
student's function while watching the package's functions, and it reads the function's source for
their names.
"""
from __future__ import annotations

import inspect
import re
import types
from typing import Any, Callable


def _public_functions(module: types.ModuleType) -> dict[str, Callable]:
    return {name: f for name, f in vars(module).items()
            if not name.startswith("_") and inspect.isfunction(f) and f.__module__ == module.__name__}


def library_calls(fn: Callable, *args: Any, modules: tuple[types.ModuleType, ...] = ()) -> tuple[Any, list[str]]:
    """Call ``fn(*args)``; return its result and the names of ``modules``' functions it used.

    A function counts as used when ``fn`` called it while running, through its module
    (``theory.omega(...)``), through the package (``annsnn.omega(...)``) or through a name bound to
    it where ``fn`` was defined (``from annsnn.theory import omega`` at the top of a notebook), or when
    ``fn``'s source calls it as an attribute (``.omega(``) or imports it (``from annsnn.theory import
    omega``). A variable of the same name is not a use. Everything is restored afterwards, also when
    ``fn`` raises.
    """
    import annsnn

    used: list[str] = []
    saved = []
    for module in modules:
        for name, f in _public_functions(module).items():
            def watched(*a, _name=f"{module.__name__}.{name}", _f=f, **k):
                used.append(_name)
                return _f(*a, **k)
            for namespace in (vars(module), vars(annsnn), getattr(fn, "__globals__", {})):
                for bound in [k for k, v in namespace.items() if v is f]:
                    saved.append((namespace, bound, f))
                    namespace[bound] = watched
    try:
        result = fn(*args)
    finally:
        for namespace, bound, f in reversed(saved):
            namespace[bound] = f
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):  # defined where its source cannot be read
        source = ""
    imports = " ".join(re.findall(r"^\s*from\s+annsnn[\w.]*\s+import\s+([^\n]*)", source, re.M))
    for module in modules:
        for name in _public_functions(module):
            if re.search(rf"\.{re.escape(name)}\s*\(", source) or re.search(rf"\b{re.escape(name)}\b", imports):
                used.append(f"{module.__name__}.{name}")
    return result, sorted(set(used))
