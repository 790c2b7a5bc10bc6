"""Named locks and semaphores for asyncio: :class:`AsyncNamedLock` and
:class:`AsyncNamedSemaphore` (and :func:`~mongoengine_lockable.exclusive` on
coroutine functions holds an :class:`AsyncNamedLock`)::

    from mongoengine_lockable.aio import AsyncNamedLock

    async with AsyncNamedLock("nightly-report", 600, wait=30):
        await build_report()

They are the same locks as :class:`~mongoengine_lockable.NamedLock` and
:class:`~mongoengine_lockable.NamedSemaphore`: the same records, the same
fences, the same fair queue, the same signals, decided by the same rules; an
asyncio process and a blocking one exclude each other on the same name.
Waiting (on a change stream, or polling) never blocks the event loop, and
``keepalive`` renews from an asyncio task.

Requires pymongo 4.13.2 or later (its asyncio API, ``AsyncMongoClient``, is
stable from 4.13; 4.13.1 and 4.13.2 fixed timeouts and connection set-up
that blocked the loop): ``pip install 'mongoengine-lockable[asyncio]'``.
Importing this module on an older pymongo raises :class:`ImportError` saying
so.

The database is the ``database=`` argument, a pymongo ``AsyncDatabase``, or
by default the database of the MongoEngine connection ``alias``: an
``AsyncMongoClient`` is made from that connection's settings for each event
loop that uses it (a client belongs to the loop it first ran on), and closed
when that loop shuts down its asynchronous generators (``asyncio.run`` does).
On a mongomock connection the locks run in the loop on mongomock itself (no
server clock: see :mod:`mongoengine_lockable`), for tests.
"""

from __future__ import annotations

import functools
import logging
from types import TracebackType
from typing import Any, Callable, TypeVar

from pymongo.write_concern import WriteConcern

from . import _aio, _args
from ._aio import AsyncLease, arun, async_records
from ._args import collection_name, duration_ms, lock_name, text, wait_seconds
from ._engine import look
from ._named import (
    _DEFAULT,
    DEFAULT_COLLECTION,
    NamedHandle,
    NamedSettings,
    _same,
    lock_setup,
)
from ._rules import Kind, NamedKind, host_and_pid
from ._shared import holders_of, semaphore_setup

__all__ = ["AsyncNamedLock", "AsyncNamedSemaphore"]

log = logging.getLogger("mongoengine_lockable.named")

Face = TypeVar("Face", bound="AsyncNamedFace")


def _database(database: object) -> Any:
    """Check a ``database=`` argument: ``None`` or an ``AsyncDatabase``."""
    if database is not None and not _aio.is_async_database(database):
        raise TypeError(
            f"database must be a pymongo AsyncDatabase or None, not {type(database).__name__}")
    return database


async def _records(database: Any, alias: object, collection: object) -> Any:
    """Check the arguments of a class method, then open its collection."""
    coll_name = collection_name(collection)
    alias_name = text(alias, "alias")
    return await async_records(_database(database), alias_name, coll_name)


class AsyncNamedFace(NamedHandle):
    """An asyncio handle on one named record: the methods every asyncio
    named face has. Constructing one does no I/O.

    :param settings: the checked arguments.
    :param kind: the rules of the record.
    :param what: how the record is named in messages (``"lock 'nightly'"``).
    :param database: a pymongo ``AsyncDatabase``; ``None``: that of ``alias``.
    """

    def __init__(self, settings: NamedSettings, kind: Kind, what: str, database: object) -> None:
        self.database = _database(database)
        super().__init__(settings, kind, what)
        self._handle: AsyncLease | None = None
        self._bound: tuple[Any, Any] = (None, None)

    async def _async(self) -> AsyncLease:
        handle = self._handle
        loop, source = bound = _aio.binding(self.database, self.alias)
        if handle is not None and loop is self._bound[0] and source is self._bound[1]:
            return handle  # the same loop and connection as last time
        coll = await async_records(self.database, self.alias, self.collection)
        if handle is None or not _same(handle.io.source, coll):
            io = _aio.executor_for(coll, self._write_concern)
            if handle is None:
                handle = self._handle = AsyncLease(self._lease, io)
            else:
                handle.io = io
        self._bound = bound
        return handle

    async def acquire(self, *, wait: _args.Duration | None = _DEFAULT) -> bool:
        """Take the lease.

        One conditional upsert per attempt; waiting callers queue in the record
        and are served first come, first served. Cancelling a waiting
        acquisition leaves the queue (and gives back a lease granted at that
        very moment) before the cancellation goes on.

        :param wait: seconds to wait (``None``: no limit); default the
            instance's ``wait``.
        :return: ``True`` if this instance now holds the lease.
        :raises LockError: the name belongs to another kind of lock.
        """
        wait_s = self.wait if wait is _DEFAULT else wait_seconds(wait)
        handle = await self._async()
        result = await handle.acquire(self.owner, self._ms, wait=wait_s,
                                      keepalive=self.keepalive, extra=host_and_pid())
        return result is not None

    async def release(self) -> None:
        """Release the lease now (stopping its keepalive task); waiting
        callers it makes room for get it in the same write.

        :raises LockNotOwnedError: this instance does not hold it now
            (never acquired, released, expired or taken over).
        """
        await (await self._async()).release()

    async def renew(self, duration: _args.Duration | None = None) -> None:
        """Extend the held lease to now + ``duration`` (default: the
        instance's), keeping its fence.

        :param duration: the new term, counted from now.
        :raises LockNotOwnedError: not held now (an expired lease is not revived).
        """
        ms = self._ms if duration is None else duration_ms(duration)
        await (await self._async()).renew(ms)

    async def locked(self) -> bool:
        """Read the primary: does anyone hold it now?

        :return: ``True`` while an unexpired lease is held.
        """
        return (await (await self._async()).look()).held

    async def owned(self) -> bool:
        """Read the primary: does this instance hold it now?

        :return: ``True`` while this instance's lease is unexpired.
        """
        return await (await self._async()).owned()

    async def __aenter__(self: Face) -> Face:
        if not await self.acquire():
            raise self._lease.unavailable()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()


class AsyncNamedLock(AsyncNamedFace):
    """An advisory lock by name for asyncio, the same lock as a
    :class:`~mongoengine_lockable.NamedLock` of that name::

        lock = AsyncNamedLock("nightly-report", duration=60)
        if await lock.acquire():
            try:
                await build_report()
            finally:
                await lock.release()

    Not re-entrant. Callers that wait are served first come, first served,
    and wait without blocking the event loop. ``async with lock:`` acquires
    with the default ``wait`` or raises
    :class:`~mongoengine_lockable.LockUnavailableError`, and
    releases on exit.

    :param name: the lock's name, a non-empty ``str`` of at most 1000 characters.
    :param duration: the lease's length, counted from each grant.
    :param owner: this instance's owner string; default a fresh
        ``host:pid:random`` token.
    :param wait: default ``wait`` of :meth:`acquire` and ``async with``.
    :param keepalive: renew from an asyncio task while held.
    :param min_hold: on release, keep the lease until at least this long after
        the grant (at most ``duration``).
    :param alias: the MongoEngine connection alias (when ``database`` is not given).
    :param collection: the collection of the lock records.
    :param write_concern: of lease changes (default ``majority``).
    :param database: a pymongo ``AsyncDatabase``; default: that of ``alias``.
    :raises TypeError, ValueError: bad arguments.
    """

    def __init__(self, name: str, duration: _args.Duration = 60, *, owner: str | None = None,
                 wait: _args.Duration | None = 0, keepalive: bool = False,
                 min_hold: _args.Duration = 0, alias: str = "default",
                 collection: str = DEFAULT_COLLECTION,
                 write_concern: WriteConcern | None = None, database: Any = None) -> None:
        super().__init__(*lock_setup(
            name, duration, owner=owner, wait=wait, keepalive=keepalive, min_hold=min_hold,
            alias=alias, collection=collection, write_concern=write_concern,
        ), database=database)

    @staticmethod
    async def owner_of(
        name: str, alias: str = "default", *, collection: str = DEFAULT_COLLECTION,
        database: Any = None,
    ) -> str | None:
        """Read the primary: the owner holding ``name`` now.

        :param name: the lock's name.
        :param alias: the MongoEngine connection alias (when ``database`` is not given).
        :param collection: the collection of the lock records.
        :param database: a pymongo ``AsyncDatabase``; default: that of ``alias``.
        :return: the holder's owner string, or ``None`` when it is free.
        :raises TypeError, ValueError: bad arguments.
        """
        name = lock_name(name)
        coll = await _records(database, alias, collection)
        view = await arun(look(NamedKind(), {"_id": name}), _aio.executor_for(coll))
        return view.holder

    @staticmethod
    async def is_free(
        name: str, alias: str = "default", *, collection: str = DEFAULT_COLLECTION,
        database: Any = None,
    ) -> bool:
        """Read the primary: is ``name`` free now?

        :return: ``True`` when nobody holds it.
        :raises TypeError, ValueError: bad arguments.
        """
        owner = await AsyncNamedLock.owner_of(name, alias, collection=collection,
                                              database=database)
        return owner is None


class AsyncNamedSemaphore(AsyncNamedFace):
    """A counting semaphore by name for asyncio, the same semaphore as a
    :class:`~mongoengine_lockable.NamedSemaphore` of that name: at most
    ``limit`` holders at once, each with its own lease and fence::

        exports = AsyncNamedSemaphore("exports", limit=3, duration=600, wait=None)
        async with exports:
            await run_export()

    :param name: the semaphore's name, a non-empty ``str`` of at most 1000
        characters.
    :param limit: the most holders at once, an ``int`` >= 1; every user of a
        name must pass the same.
    :param duration: each holder's lease, counted from its grant.
    :param owner: this instance's owner string; default a fresh
        ``host:pid:random`` token.
    :param wait: default ``wait`` of :meth:`acquire` and ``async with``.
    :param keepalive: renew from an asyncio task while held.
    :param alias: without ``database``, the MongoEngine connection whose
        database holds the records.
    :param collection: the collection of the records (that of the named
        locks by default).
    :param write_concern: of lease changes (default ``majority``).
    :param database: a pymongo ``AsyncDatabase`` holding the records.
    :raises TypeError, ValueError: bad arguments (``limit`` a ``bool`` or not
        an ``int``, or below 1).
    """

    def __init__(
        self,
        name: str,
        limit: int,
        duration: _args.Duration = 60,
        *,
        owner: str | None = None,
        wait: _args.Duration | None = 0,
        keepalive: bool = False,
        alias: str = "default",
        collection: str = DEFAULT_COLLECTION,
        write_concern: WriteConcern | None = None,
        database: Any = None,
    ) -> None:
        settings, kind, what = semaphore_setup(
            name, limit, duration, owner=owner, wait=wait, keepalive=keepalive, alias=alias,
            collection=collection, write_concern=write_concern)
        self.limit = kind.capacity
        super().__init__(settings, kind, what, database=database)

    def _details(self) -> str:
        return f" limit={self.limit}"

    @staticmethod
    async def holders(
        name: str, alias: str = "default", *, collection: str = DEFAULT_COLLECTION,
        database: Any = None,
    ) -> list[str]:
        """Read the primary: the owners of the semaphore's live holders, in
        the order of their grants.

        :param name: the semaphore's name.
        :param alias: the MongoEngine connection alias (when ``database`` is not given).
        :param collection: the collection of the records.
        :param database: a pymongo ``AsyncDatabase``; default: that of ``alias``.
        :return: the owners (``[]`` when nobody holds it).
        :raises LockError: ``name`` is another kind of lock.
        :raises TypeError, ValueError: bad arguments.
        """
        name = lock_name(name)
        coll = await _records(database, alias, collection)
        return await arun(holders_of(name), _aio.executor_for(coll))


def exclusively(
    func: Callable[..., Any],
    namer: Callable[..., str],
    duration: _args.Duration,
    *,
    wait: _args.Duration | None,
    min_hold: _args.Duration,
    keepalive: bool,
    alias: str,
    collection: str,
) -> Callable[..., Any]:
    """The wrapper :func:`~mongoengine_lockable.exclusive` makes of a coroutine function: a
    coroutine function that awaits ``func`` only while holding the
    :class:`AsyncNamedLock` named ``namer(*args, **kwargs)``, and returns
    ``None`` (logged, ``lock_unavailable`` sent) when another holder has it.

    :param func: the coroutine function.
    :param namer: makes the lock's name from the call's arguments.
    :return: the wrapper, with ``func``'s name and docstring.
    """

    @functools.wraps(func)
    async def run_exclusively(*args: Any, **kwargs: Any) -> Any:
        lock = AsyncNamedLock(namer(*args, **kwargs), duration, wait=wait,
                              min_hold=min_hold, keepalive=keepalive, alias=alias,
                              collection=collection)
        if not await lock.acquire():
            log.info("skipped %s: lock %r is held elsewhere", func.__qualname__, lock.name)
            return None
        try:
            return await func(*args, **kwargs)
        finally:
            await lock.release()

    return run_exclusively
