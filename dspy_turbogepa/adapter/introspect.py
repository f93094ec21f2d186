"""Whose code is this: DSPy's, an installed library's, or the user's.

Several decisions hang on it, and they must agree: which traceback frame an error is attributed to
(the evaluator), which functions' code keys a run (a library's changes with an upgrade, not with the
user's edits; run_identity), which classes a stored row may rebuild from their fields
(trajectory_json), and whether a program runs through its own ``aforward``. So there is one answer
here. "Installed" is the interpreter's library paths, its site directories (a ``pip install --user``
package included) and any ``site-packages`` / ``dist-packages`` directory (Debian's, a second venv
on ``sys.path``); an editable install is the user's code, since it is edited like it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import site
import sys
import sysconfig
from typing import Any

__all__ = [
    "defines_own_aforward", "defines_own_forward", "in_dspy_package", "is_a", "library_class",
    "library_function", "library_path", "runs_async", "user_defines", "users_file",
]


def is_a(value: Any, kind: type | tuple[type, ...]) -> bool:
    """``isinstance`` for any object the user's code names, which we only look at: ``isinstance`` reads
    ``__class__``, which a lazy proxy (django's ``settings``) sets itself up for, raising while it is not
    configured. Looking must never become the compile's failure."""
    try:
        return isinstance(value, kind)
    except Exception:  # noqa: BLE001 - a proxy that cannot say what it is is none of ours
        return False


def in_dspy_package(cls: type) -> bool:
    """Whether ``cls`` is DSPy's own (``dspy`` or a submodule), as opposed to the user's code."""
    module = cls.__module__ or ""
    return module == "dspy" or module.startswith("dspy.")


def defines_own_aforward(program: Any) -> bool:
    """Whether the user's code gives ``program`` an ``aforward`` that is as current as its ``forward``:
    the nearest class in its MRO that defines either lies outside the ``dspy`` package and defines
    ``aforward`` (a subclass of ``dspy.Predict`` inherits Predict's; a subclass that overrides only
    ``forward`` of a base with both would run the base's stale ``aforward``, which ``forward`` replaced)."""
    for cls in type(program).__mro__:
        if "aforward" in vars(cls):
            return not in_dspy_package(cls)
        if "forward" in vars(cls):
            return False
    return False


def runs_async(program: Any) -> bool:
    """Whether the evaluator runs ``program`` through ``acall`` (its own ``aforward``). Not when the
    user's ``__call__`` is nearer in the MRO than any ``acall`` of theirs and a ``forward`` of theirs
    exists: dspy's ``acall`` goes straight to ``aforward``, past a ``__call__`` that maps or renames the
    inputs, which is what dspy.GEPA runs. Read from the classes' own dicts (``vars``), so a tracer that
    wraps ``dspy.Module.__call__`` (wrapt returns a new wrapper at each lookup) changes nothing."""
    if not defines_own_aforward(program):
        return False
    call_owner = _nearest_owner(type(program), "__call__")
    acall_owner = _nearest_owner(type(program), "acall")
    mro = type(program).__mro__
    own_call_first = (user_defines(type(program), "__call__")
                      and (acall_owner is None or mro.index(call_owner) < mro.index(acall_owner)))
    return not (own_call_first and defines_own_forward(program))


def _nearest_owner(cls: type, name: str) -> type | None:
    """The first class in ``cls``'s MRO whose own dict defines ``name``."""
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def user_defines(cls: type, name: str) -> bool:
    """Whether the nearest definition of ``name`` in ``cls``'s MRO is the user's, not dspy's."""
    owner = _nearest_owner(cls, name)
    return owner is not None and not in_dspy_package(owner)


def defines_own_forward(program: Any) -> bool:
    """Whether the nearest ``forward`` in ``program``'s MRO is the user's (a sync path of their own)."""
    return user_defines(type(program), "forward")


@functools.lru_cache(maxsize=1)
def library_dirs() -> tuple[str, ...]:
    """Every directory whose code is the standard library's or an installed package's (each ending
    in a separator, for a prefix test)."""
    paths = sysconfig.get_paths()
    dirs = [paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    with contextlib.suppress(AttributeError):  # an old virtualenv's site module lacks them
        dirs += [*site.getsitepackages(), site.getusersitepackages()]
    return tuple(sorted({os.path.realpath(d) + os.sep for d in dirs if d}))


@functools.lru_cache(maxsize=4096)
def library_path(filename: str) -> bool:
    """Whether a source file belongs to the standard library or an installed package (cached: every
    failed evaluation and every keyed function asks, and resolving a path costs system calls)."""
    path = os.path.realpath(filename)
    return path.startswith(library_dirs()) or any(
        f"{os.sep}{d}{os.sep}" in path for d in ("site-packages", "dist-packages"))


@functools.lru_cache(maxsize=1024)
def users_file(filename: str) -> bool:
    """Whether a traceback frame's file is the user's: not a library's and not this package's."""
    package_dir = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    return not (library_path(filename) or os.path.realpath(filename).startswith(package_dir + os.sep))


def library_class(klass: type) -> bool:
    """Defined in the standard library or an installed (not editable) package. (A class built by
    ``exec`` without a ``__name__`` says it is from ``builtins``; it is the user's unless ``builtins``
    really holds it.)"""
    module = sys.modules.get(klass.__module__)
    if klass.__module__ in sys.builtin_module_names:
        return getattr(module, klass.__qualname__, None) is klass
    path = getattr(module, "__file__", None)
    return isinstance(path, str) and library_path(path)


def library_function(fn: Any) -> bool:
    """A function of DSPy, of this package, of the standard library or of an installed package."""
    module = getattr(fn, "__module__", None) or ""
    if module == "dspy" or module.startswith(("dspy.", "dspy_turbogepa")):
        return True
    path = getattr(sys.modules.get(module), "__file__", None)
    return isinstance(path, str) and library_path(path)
