"""The public names of ``mongoengine_lockable``: exactly these, importable, documented."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import types

import pytest

import mongoengine_lockable
from mongoengine_lockable import signals

PUBLIC_NAMES = [
    "LockError",
    "LockNotOwnedError",
    "LockUnavailableError",
    "LockableMixin",
    "LockableQuerySet",
    "NamedLock",
    "NamedSemaphore",
    "ReadWriteLock",
    "UnsavedDocumentError",
    "__version__",
    "exclusive",
    "signals",
]

#: The names above that are submodules rather than classes or functions.
PUBLIC_MODULES = {"signals"}

PUBLIC_METHODS = {
    "LockableMixin": ["lock", "release", "renew", "update_if_held", "is_locked", "locked"],
    "LockableQuerySet": ["unlocked", "locked", "claim"],
    "NamedLock": ["acquire", "release", "renew", "locked", "owned", "remaining"],
    "NamedSemaphore": ["acquire", "release", "renew", "locked", "owned", "remaining",
                       "holders"],
    "ReadWriteLock": ["reader", "writer"],
}

SIGNALS = ["lock_acquired", "lock_lost", "lock_released", "lock_renewed", "lock_unavailable"]


def test_all_is_exactly_the_public_names():
    assert sorted(mongoengine_lockable.__all__) == sorted(PUBLIC_NAMES)
    assert len(mongoengine_lockable.__all__) == len(set(mongoengine_lockable.__all__))


def test_every_public_attribute_is_in_all():
    # Submodules become attributes of the package when imported (``testing``
    # by the pytest plugin): only the ones listed are part of the API.
    public = {
        name
        for name, value in vars(mongoengine_lockable).items()
        if not name.startswith("_")
        and (not isinstance(value, types.ModuleType) or name in PUBLIC_MODULES)
    }
    assert public == set(PUBLIC_NAMES) - {"__version__"}
    for name in PUBLIC_MODULES:
        assert isinstance(getattr(mongoengine_lockable, name), types.ModuleType)


def test_star_import_gives_exactly_all():
    namespace: dict = {}
    exec("from mongoengine_lockable import *", namespace)
    namespace.pop("__builtins__")
    assert sorted(namespace) == sorted(PUBLIC_NAMES)


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_each_name_is_importable(name):
    module = importlib.import_module("mongoengine_lockable")
    assert getattr(module, name) is not None
    namespace: dict = {}
    exec(f"from mongoengine_lockable import {name}", namespace)
    assert namespace[name] is getattr(mongoengine_lockable, name)


def test_version_is_the_installed_version():
    version = mongoengine_lockable.__version__
    assert isinstance(version, str)
    assert version.count(".") >= 2
    assert importlib.metadata.version("mongoengine-lockable") == version


def _documented(obj) -> bool:
    doc = inspect.getdoc(obj)
    return bool(doc and doc.strip())


@pytest.mark.parametrize("name", [n for n in PUBLIC_NAMES if n != "__version__"])
def test_each_public_name_has_a_docstring(name):
    obj = getattr(mongoengine_lockable, name)
    assert callable(obj) or name in PUBLIC_MODULES
    # A class's own docstring, not one inherited from a base.
    assert obj.__doc__ and obj.__doc__.strip(), name


@pytest.mark.parametrize(
    ("cls", "method"),
    [(cls, m) for cls, methods in PUBLIC_METHODS.items() for m in methods],
)
def test_public_methods_have_docstrings(cls, method):
    func = getattr(getattr(mongoengine_lockable, cls), method)
    assert callable(func)
    assert func.__doc__ and func.__doc__.strip(), f"{cls}.{method}"


def test_errors_tree():
    m = mongoengine_lockable
    for name in ("LockNotOwnedError", "LockUnavailableError", "UnsavedDocumentError"):
        assert issubclass(getattr(m, name), m.LockError)
    assert issubclass(m.LockError, Exception)
    assert issubclass(m.LockUnavailableError, TimeoutError)
    assert issubclass(m.LockableQuerySet, __import__("mongoengine").QuerySet)


def test_package_has_a_docstring():
    assert _documented(mongoengine_lockable)


def test_signals_module_exports():
    assert mongoengine_lockable.signals is signals
    assert sorted(signals.__all__) == SIGNALS
    for name in SIGNALS:
        signal = getattr(signals, name)
        assert signal.name == name
        assert hasattr(signal, "connect") and hasattr(signal, "send")
