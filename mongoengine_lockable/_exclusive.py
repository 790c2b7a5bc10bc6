"""``@exclusive``: run a function only while holding a named lock (a
:class:`~mongoengine_lockable.NamedLock`, or for a coroutine function an
:class:`~mongoengine_lockable.aio.AsyncNamedLock`)."""

from __future__ import annotations

import functools
import inspect
import logging
import string
from typing import Any, Callable, TypeVar

from . import _args
from ._named import DEFAULT_COLLECTION, NamedLock

__all__ = ["exclusive"]

log = logging.getLogger("mongoengine_lockable.named")

F = TypeVar("F", bound=Callable[..., Any])


def _namer(name: object, func: Callable[..., Any]) -> Callable[..., str]:
    """How a decorated call's lock name is made: a fixed name, a
    ``str.format`` template of the function's parameters, or a callable
    taking the function's arguments."""
    signature = inspect.signature(func)
    if callable(name) and not isinstance(name, str):
        namer = name

        def call_namer(*args: Any, **kwargs: Any) -> str:
            return _args.lock_name(namer(*args, **kwargs))

        return call_namer
    template = _args.lock_name(name)
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template)
                  if field is not None]
    except ValueError as exc:
        raise ValueError(f"lock name template {template!r}: {exc}") from None
    if not fields:
        return lambda *args, **kwargs: template
    for field in fields:
        head = field.split(".", 1)[0].split("[", 1)[0]
        if head not in signature.parameters:
            raise ValueError(
                f"lock name template {template!r}: {{{field}}} names no parameter of "
                f"{func.__qualname__}{signature}"
            )

    def render(*args: Any, **kwargs: Any) -> str:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return _args.lock_name(template.format(**bound.arguments))

    return render


def exclusive(
    name: str | Callable[..., str],
    duration: _args.Duration,
    *,
    wait: _args.Duration | None = 0,
    min_hold: _args.Duration = 0,
    keepalive: bool = False,
    alias: str = "default",
    collection: str = DEFAULT_COLLECTION,
) -> Callable[[F], F]:
    """Run the decorated function only while holding a named lock; when another
    holder has it, skip the call (logged, ``lock_unavailable`` sent) and return
    ``None``::

        @exclusive("nightly-report", 600, min_hold=30)
        def nightly_report(): ...

        @exclusive("report:{day}", 600)       # one lock per day
        def report(day): ...

        @exclusive(lambda user, **_: f"sync:{user.id}", 60)
        def sync(user, full=False): ...

        @exclusive("refresh:{key}", 30)       # a coroutine function
        async def refresh(key): ...

    Scheduled on many hosts, each tick runs once. ``name`` is a lock name, a
    ``str.format`` template whose fields name the function's parameters
    (``"{day.year}"`` uses ``day``), or a callable taking the function's
    arguments and returning the name. Other arguments as for
    :class:`~mongoengine_lockable.NamedLock`; they are all checked when
    decorating.

    On a coroutine function (``async def``) the wrapper is a coroutine
    function that holds an :class:`~mongoengine_lockable.aio.AsyncNamedLock`
    for the whole await, and waits without blocking the event loop.

    :raises TypeError: bad arguments.
    :raises ValueError: a template field that names no parameter, or bad
        arguments.
    :raises ImportError: on a coroutine function, when the installed pymongo
        has no stable asyncio API (see :mod:`mongoengine_lockable.aio`).
    """
    # Validate now, so a typo fails at import rather than at the first tick.
    probe = name if isinstance(name, str) and "{" not in name else "probe"
    NamedLock(probe, duration, wait=wait, min_hold=min_hold, keepalive=keepalive,
              alias=alias, collection=collection)
    if not (isinstance(name, str) or callable(name)):
        raise TypeError(f"lock name must be a str or a callable, not {type(name).__name__}")

    def decorate(func: F) -> F:
        lock_name = _namer(name, func)
        if inspect.iscoroutinefunction(func):
            # Never a silently unlocked run: without an asyncio-capable
            # pymongo this import raises, saying which one is needed.
            from .aio import exclusively

            return exclusively(func, lock_name, duration, wait=wait,  # type: ignore[return-value]
                               min_hold=min_hold, keepalive=keepalive, alias=alias,
                               collection=collection)

        @functools.wraps(func)
        def run_exclusively(*args: Any, **kwargs: Any) -> Any:
            lock = NamedLock(lock_name(*args, **kwargs), duration, wait=wait, min_hold=min_hold,
                             keepalive=keepalive, alias=alias, collection=collection)
            if not lock.acquire():
                log.info("skipped %s: lock %r is held elsewhere", func.__qualname__, lock.name)
                return None
            try:
                return func(*args, **kwargs)
            finally:
                lock.release()

        return run_exclusively  # type: ignore[return-value]

    return decorate
