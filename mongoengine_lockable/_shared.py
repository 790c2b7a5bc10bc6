"""Shared locks by name: ``NamedSemaphore`` and ``ReadWriteLock``.

Both are leases on one record per name in the named-lock collection, shared
by several holders of some weight against a capacity
(:class:`~mongoengine_lockable._rules.SharedKind`): a semaphore of limit N
has capacity N and holders of weight 1; a read/write lock has readers of
weight 1 and writers that weigh the whole capacity. Each holder has its own
lease on the server's clock and its own fence, and the policy (waiting in
the record's queue, keepalive, signals, errors) is the engine's, as for
:class:`~mongoengine_lockable.NamedLock`. Acquire and release are each one
conditional ``findAndModify`` on the record.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pymongo.write_concern import WriteConcern

from . import _args
from ._engine import Read, Result, Steps
from ._errors import LockError
from ._io import executor_for, run
from ._named import DEFAULT_COLLECTION, NamedFace, NamedSettings, records
from ._rules import SharedKind

__all__ = ["NamedSemaphore", "ReadWriteHolder", "ReadWriteLock", "holders_of", "semaphore_setup"]


def semaphore_setup(
    name: object, limit: object, duration: object, **options: object
) -> tuple[NamedSettings, SharedKind, str]:
    """The checked arguments of a semaphore (blocking or asyncio), its kind
    (whose ``capacity`` is the limit) and its name in messages; no I/O.
    ``options`` are those of :meth:`NamedSettings.check`.

    :raises TypeError, ValueError: a bad argument.
    """
    settings = NamedSettings.check(name, duration, **options)
    kind = SharedKind.semaphore(_args.count(limit, "limit"))
    return settings, kind, f"semaphore {settings.name!r}"


def holders_of(name: str) -> Steps[list[str]]:
    """Read the primary: the owners of the live holders of the semaphore
    ``name``, in the order of their grants.

    :raises LockError: ``name`` is another kind of lock.
    """
    result: Result = yield Read({"_id": name})
    doc, now = result
    if doc is None:
        return []
    limit = doc.get(SharedKind.LIMIT_FIELD)
    kind = SharedKind.semaphore(limit if isinstance(limit, int) else 1)
    foreign = kind.view(doc, now).foreign
    if foreign is not None and not foreign.startswith(kind.tag):
        raise LockError(f"semaphore {name!r} is a {foreign} record, not a semaphore",
                        target=name)
    return [str(h.get("o")) for h in kind.live_holders(doc, now)]


class NamedSemaphore(NamedFace):
    """A counting semaphore by name: at most ``limit`` holders at once::

        exports = NamedSemaphore("exports", limit=3, duration=600, wait=None)
        with exports:
            run_export()

    Each holder (each instance that acquired it) has its own lease on the
    server's clock and its own fence, unique and increasing per name. Callers
    that wait are served first come, first served: a release admits the
    longest waiting callers in the same write, and a caller that does not
    wait is refused while others are queued. Not re-entrant: an instance
    holds at most one share. Constructing one does no I/O.

    Every user of a name must pass the same ``limit``: while the semaphore is
    in use, a caller with another limit is refused with :class:`LockError`.
    A name is used by one kind of lock per collection (a :class:`NamedLock`
    of the same name is refused, and the other way round).

    :param name: the semaphore's name, a non-empty ``str`` of at most 1000
        characters.
    :param limit: the most holders at once, an ``int`` >= 1.
    :param duration: each holder's lease, counted from its grant.
    :param owner: this instance's owner string; default a fresh
        ``host:pid:random`` token.
    :param wait: default ``wait`` of :meth:`acquire` and ``with``.
    :param keepalive: renew from a background thread while held.
    :param alias: the MongoEngine connection alias.
    :param collection: the collection of the records (that of the named locks
        by default).
    :param write_concern: of lease changes (default ``majority``).
    :raises TypeError, ValueError: bad arguments (``limit`` a ``bool`` or not
        an ``int``, or below 1).
    """

    def __init__(self, name: str, limit: int, duration: _args.Duration = 60, *,
                 owner: str | None = None, wait: _args.Duration | None = 0,
                 keepalive: bool = False, alias: str = "default",
                 collection: str = DEFAULT_COLLECTION,
                 write_concern: WriteConcern | None = None) -> None:
        settings, kind, what = semaphore_setup(
            name, limit, duration, owner=owner, wait=wait, keepalive=keepalive, alias=alias,
            collection=collection, write_concern=write_concern)
        self.limit = kind.capacity
        super().__init__(settings, kind, what)

    def _details(self) -> str:
        return f" limit={self.limit}"

    @staticmethod
    def holders(
        name: str, alias: str = "default", *, collection: str = DEFAULT_COLLECTION
    ) -> list[str]:
        """Read the primary: the owners of the semaphore's live holders, in
        the order of their grants (``[]`` when nobody holds it).

        :raises LockError: ``name`` is another kind of lock.
        :raises TypeError, ValueError: bad arguments.
        """
        name = _args.lock_name(name)
        coll = records(_args.text(alias, "alias"), _args.collection_name(collection))
        return run(holders_of(name), executor_for(coll))


Mode = Literal["read", "write"]


class ReadWriteLock:
    """A read/write lock by name: any number of readers, or one writer::

        catalog = ReadWriteLock("catalog", duration=60, wait=30)
        with catalog.reader():
            read_catalog()
        with catalog.writer():
            rebuild_catalog()

    :meth:`reader` and :meth:`writer` return a new holder each call, with the
    methods of a :class:`NamedLock` (``acquire``, ``release``, ``renew``,
    ``with``, ``locked``, ``owned``, ``remaining``; ``name``, ``owner``,
    ``fence``). Each holder has its own lease on the server's clock and its
    own fence. Callers that wait are served first come, first served, so a
    waiting writer keeps later readers out (writer preference): writers do
    not starve. Constructing one does no I/O.

    :param name: the lock's name, a non-empty ``str`` of at most 1000 characters.
    :param duration: each holder's lease, counted from its grant.
    :param wait: default ``wait`` of the holders' ``acquire`` and ``with``.
    :param keepalive: holders renew from a background thread while held.
    :param alias: the MongoEngine connection alias.
    :param collection: the collection of the records (that of the named locks
        by default).
    :param write_concern: of lease changes (default ``majority``).
    :raises TypeError, ValueError: bad arguments.
    """

    def __init__(self, name: str, duration: _args.Duration = 60, *,
                 wait: _args.Duration | None = 0, keepalive: bool = False,
                 alias: str = "default", collection: str = DEFAULT_COLLECTION,
                 write_concern: WriteConcern | None = None) -> None:
        # Checked now (no I/O); each holder gets these with its own owner.
        self._settings = NamedSettings.check(name, duration, owner=None, wait=wait,
                                             keepalive=keepalive, alias=alias,
                                             collection=collection, write_concern=write_concern)
        self.name = self._settings.name

    def __repr__(self) -> str:
        return f"<ReadWriteLock {self.name!r}>"

    def _holder(self, mode: Mode, owner: str | None) -> ReadWriteHolder:
        settings = dataclasses.replace(self._settings, owner=_args.owner_string(owner))
        return ReadWriteHolder(settings, mode)

    def reader(self, *, owner: str | None = None) -> ReadWriteHolder:
        """A new reader of this lock (not acquired yet).

        :param owner: its owner string; default a fresh token.
        :return: a holder that shares the lock with other readers.
        """
        return self._holder("read", owner)

    def writer(self, *, owner: str | None = None) -> ReadWriteHolder:
        """A new writer of this lock (not acquired yet).

        :param owner: its owner string; default a fresh token.
        :return: a holder that has the lock alone.
        """
        return self._holder("write", owner)


class ReadWriteHolder(NamedFace):
    """A reader or a writer of a :class:`ReadWriteLock` (made by its
    :meth:`~ReadWriteLock.reader` and :meth:`~ReadWriteLock.writer`).

    :ivar mode: ``"read"`` or ``"write"``.
    """

    def __init__(self, settings: NamedSettings, mode: Mode) -> None:
        kind = SharedKind.reader() if mode == "read" else SharedKind.writer()
        super().__init__(settings, kind, f"read/write lock {settings.name!r}")
        self.mode = mode

    def _details(self) -> str:
        return f" {self.mode}"
