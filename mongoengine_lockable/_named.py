"""Named (advisory) locks: ``NamedLock``, and what the other faces on named
records share (settings, the record collection, the handle).

A named lock is a lease on one record per name in a collection of its own
(``lockable_named_locks`` by default), with the same rules and policy as a
document lease (:mod:`mongoengine_lockable._rules`,
:mod:`mongoengine_lockable._engine`). A record looks like::

    {_id: "nightly-report", kind: "lock", locked_until: <date>,
     owner: "web-1:4242:9f0c...", fence: 1795379760218, token: "...",
     stamp: "...", host: "web-1", pid: 4242, acquired_at: <date>,
     waiters: [...]}

``locked_until``, ``acquired_at`` and the fence come from the server's clock.
Released records keep an expired ``locked_until`` (not ``null``) so that the
TTL index removes them once they have been expired for ``RECORD_GRACE_SECONDS``;
a held record is never removed, since its ``locked_until`` is in the future.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from mongoengine.connection import get_db
from pymongo.errors import OperationFailure
from pymongo.write_concern import WriteConcern

from . import _args
from ._engine import Lease, look
from ._io import checked_write_concern, executor_for, run
from ._keepalive import BlockingLease
from ._rules import Kind, NamedKind, View, host_and_pid, new_owner

__all__ = [
    "DEFAULT_COLLECTION",
    "NamedFace",
    "NamedHandle",
    "NamedLock",
    "NamedSettings",
    "lock_setup",
]

log = logging.getLogger("mongoengine_lockable.named")

#: The collection of named-lock records unless ``collection=`` says otherwise.
DEFAULT_COLLECTION = "lockable_named_locks"

#: How long an expired record stays before the TTL index removes it. Fences
#: survive the removal: a new record's fence starts from the server time in
#: milliseconds, which has passed every fence handed out an hour earlier
#: unless a name was granted more than once per millisecond for that long.
RECORD_GRACE_SECONDS = 3600

_DEFAULT: Any = object()

# Collections whose TTL index this process has already ensured.
_ttl_ready: set[tuple[int, str]] = set()
_ttl_lock = threading.Lock()

F = TypeVar("F", bound=Callable[..., Any])


#: The TTL index of a named-lock collection: its field and options.
TTL_FIELD = "locked_until"
TTL_OPTIONS: dict[str, Any] = {"expireAfterSeconds": RECORD_GRACE_SECONDS, "name": "lockable_ttl"}


def ttl_key(coll: Any) -> tuple[int, str]:
    """What the TTL index is ensured once per process for: a collection
    of a client (blocking or asyncio)."""
    return (id(coll.database.client), coll.full_name)


def ttl_refused(coll: Any, exc: OperationFailure) -> None:
    # An index on locked_until with other options exists: the operator chose
    # it; locks work without the cleanup.
    log.warning("named-lock TTL index not created on %s: %s", coll.full_name, exc)


def records(alias: str, collection: str) -> Any:
    """The collection of named records ``collection`` on connection ``alias``,
    with its TTL index ensured once per process (no index is created for a
    name MongoDB would refuse: names are checked before they get here)."""
    coll = get_db(alias)[collection]
    key = ttl_key(coll)
    if key not in _ttl_ready:
        with _ttl_lock:
            if key not in _ttl_ready:
                try:
                    coll.create_index(TTL_FIELD, **TTL_OPTIONS)
                except OperationFailure as exc:
                    ttl_refused(coll, exc)
                _ttl_ready.add(key)
    return coll


def _same(a: Any, b: Any) -> bool:
    """Are two collection objects the same collection of the same client?"""
    return bool(a.database.client is b.database.client and a.full_name == b.full_name)


def view_of(kind: Any, name: str, alias: str, collection: str) -> View:
    """Read the primary: the record of ``name`` as it stands now."""
    coll = records(alias, collection)
    return run(look(kind, {"_id": name}), executor_for(coll))


@dataclass(frozen=True)
class NamedSettings:
    """The checked arguments every named face takes (see :meth:`check`)."""

    name: str
    ms: int
    owner: str | None
    wait: float | None
    keepalive: bool
    alias: str
    collection: str
    write_concern: WriteConcern

    @classmethod
    def check(
        cls,
        name: object,
        duration: object,
        *,
        owner: object,
        wait: object,
        keepalive: object,
        alias: object,
        collection: object,
        write_concern: object,
    ) -> NamedSettings:
        """Check the arguments of a named face, before any I/O.

        :raises TypeError, ValueError: a bad argument.
        """
        return cls(
            name=_args.lock_name(name),
            ms=_args.duration_ms(duration),
            owner=_args.owner_string(owner),
            wait=_args.wait_seconds(wait),
            keepalive=_args.flag(keepalive, "keepalive"),
            alias=_args.text(alias, "alias"),
            collection=_args.collection_name(collection),
            write_concern=checked_write_concern(write_concern, "write_concern"),
        )


Face = TypeVar("Face", bound="NamedFace")


class NamedHandle:
    """One caller's handle on one named record (a lock, a semaphore's share,
    a reader or writer), blocking or asyncio: its settings and its
    :class:`~mongoengine_lockable._engine.Lease` of the record's ``kind``;
    no I/O.

    :param settings: the checked arguments.
    :param kind: the rules of the record.
    :param what: how the record is named in messages (``"lock 'nightly'"``).
    """

    def __init__(self, settings: NamedSettings, kind: Kind, what: str) -> None:
        self.name = name = settings.name
        self._ms = settings.ms
        self.owner = settings.owner or new_owner()
        self.wait = settings.wait
        self.keepalive = settings.keepalive
        self.alias = settings.alias
        self.collection = settings.collection
        self._write_concern = settings.write_concern
        ref = weakref.ref(self)
        self._lease = Lease(
            kind,
            {"_id": name},
            what=what,
            target=name,
            subject=lambda: (ref(), {"name": name}),
        )

    def _details(self) -> str:
        """What :meth:`__repr__` shows besides the name, owner and fence."""
        return ""

    def __repr__(self) -> str:
        state = "held" if self._lease.held is not None else "not held"
        return (f"<{type(self).__name__} {self.name!r}{self._details()} owner={self.owner!r} "
                f"fence={self.fence} {state}>")

    @property
    def duration(self) -> float:
        """The lease's length in seconds."""
        return self._ms / 1000

    @property
    def fence(self) -> int | None:
        """The fence of this instance's latest grant; ``None`` before the first.
        It only ever increases for a name."""
        return self._lease.fence

    def remaining(self) -> float:
        """Seconds this instance may still count on its lease, with no I/O (see
        :meth:`~mongoengine_lockable.LockableMixin.lease_remaining`); ``0.0``
        when not held."""
        return self._lease.remaining()


class NamedFace(NamedHandle):
    """A blocking handle on one named record: the methods every blocking
    named face has (see :class:`NamedHandle`)."""

    _handle: BlockingLease | None = None

    def _blocking(self) -> BlockingLease:
        handle = self._handle
        if handle is not None and handle.io.source.database is get_db(self.alias):
            return handle  # the same connection as last time
        coll = records(self.alias, self.collection)
        if handle is None or not _same(handle.io.source, coll):
            io = executor_for(coll, self._write_concern)
            if handle is None:
                handle = self._handle = BlockingLease(self._lease, io)
            else:
                handle.io = io
        return handle

    def acquire(self, *, wait: _args.Duration | None = _DEFAULT) -> bool:
        """Take the lease.

        One conditional upsert per attempt; waiting callers queue in the record
        and are served first come, first served.

        :param wait: seconds to wait (``None``: no limit); default the
            instance's ``wait``.
        :return: ``True`` if this instance now holds the lease.
        :raises LockError: the name belongs to another kind of lock.
        """
        wait_s = self.wait if wait is _DEFAULT else _args.wait_seconds(wait)
        result = self._blocking().acquire(self.owner, self._ms, wait=wait_s,
                                          keepalive=self.keepalive, extra=host_and_pid())
        return result is not None

    def release(self) -> None:
        """Release the lease now; waiting callers it makes room for get it in
        the same write.

        :raises LockNotOwnedError: this instance does not hold it now
            (never acquired, released, expired or taken over).
        """
        self._blocking().release()

    def renew(self, duration: _args.Duration | None = None) -> None:
        """Extend the held lease to now + ``duration`` (default: the
        instance's), keeping its fence.

        :raises LockNotOwnedError: not held now (an expired lease is not revived).
        """
        ms = self._ms if duration is None else _args.duration_ms(duration)
        self._blocking().renew(ms)

    def locked(self) -> bool:
        """Read the primary: does anyone hold it now?"""
        return self._blocking().look().held

    def owned(self) -> bool:
        """Read the primary: does this instance hold it now?"""
        return self._blocking().owned()

    def __enter__(self: Face) -> Face:
        if not self.acquire():
            raise self._lease.unavailable()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def lock_setup(
    name: object, duration: object, *, min_hold: object, **options: object
) -> tuple[NamedSettings, NamedKind, str]:
    """The checked arguments of a named lock (blocking or asyncio), its kind
    and its name in messages; no I/O. ``options`` are those of
    :meth:`NamedSettings.check`.

    :raises TypeError, ValueError: a bad argument.
    """
    settings = NamedSettings.check(name, duration, **options)
    hold = _args.seconds_at_least_zero(min_hold, "min_hold")
    min_hold_ms = round(hold * 1000)
    if min_hold_ms > settings.ms:
        raise ValueError(
            f"min_hold ({hold} s) must not exceed duration ({settings.ms / 1000} s)")
    return settings, NamedKind(min_hold_ms), f"lock {settings.name!r}"


class NamedLock(NamedFace):
    """An advisory lock by name, held by at most one owner at a time::

        lock = NamedLock("nightly-report", duration=60)
        if lock.acquire():
            try:
                build_report()
            finally:
                lock.release()

    Not re-entrant: while held, a second ``acquire`` fails, even from this
    instance. Callers that wait are served first come, first served.
    Constructing one does no I/O; acquire, release and renew each send one
    ``findAndModify`` per attempt. ``with lock:`` acquires with the default
    ``wait`` or raises :class:`LockUnavailableError`, and releases on exit.

    :param name: the lock's name, a non-empty ``str`` of at most 1000 characters.
    :param duration: the lease's length, counted from each grant.
    :param owner: this instance's owner string; default a fresh
        ``host:pid:random`` token.
    :param wait: default ``wait`` of :meth:`acquire` and ``with``.
    :param keepalive: renew from a background thread while held.
    :param min_hold: on release, keep the lease until at least this long after
        the grant, so that hosts whose schedules fire a little later skip the
        same run (at most ``duration``).
    :param alias: the MongoEngine connection alias.
    :param collection: the collection of the lock records; locks in different
        collections are independent.
    :param write_concern: of lease changes (default ``majority``).
    :raises TypeError, ValueError: bad arguments.
    """

    def __init__(
        self,
        name: str,
        duration: _args.Duration = 60,
        *,
        owner: str | None = None,
        wait: _args.Duration | None = 0,
        keepalive: bool = False,
        min_hold: _args.Duration = 0,
        alias: str = "default",
        collection: str = DEFAULT_COLLECTION,
        write_concern: WriteConcern | None = None,
    ) -> None:
        super().__init__(*lock_setup(
            name, duration, owner=owner, wait=wait, keepalive=keepalive, min_hold=min_hold,
            alias=alias, collection=collection, write_concern=write_concern,
        ))

    def acquire(self, *, wait: _args.Duration | None = _DEFAULT) -> bool:
        """Take the lock.

        One conditional upsert per attempt; waiting callers queue in the record
        and a release hands the lock to the longest waiting one.

        :param wait: seconds to wait (``None``: no limit); default the lock's
            ``wait``.
        :return: ``True`` if this instance now holds the lock.
        """
        return super().acquire(wait=wait)

    def release(self) -> None:
        """Release the lock (kept until ``min_hold`` after the grant, if set;
        otherwise passed to the longest waiting caller at once).

        :raises LockNotOwnedError: this instance does not hold it now
            (never acquired, released, expired or taken over).
        """
        super().release()

    @staticmethod
    def owner_of(
        name: str, alias: str = "default", *, collection: str = DEFAULT_COLLECTION
    ) -> str | None:
        """Read the primary: the owner holding ``name`` now, or ``None``."""
        view = view_of(NamedKind(), _args.lock_name(name), _args.text(alias, "alias"),
                       _args.collection_name(collection))
        return view.holder

    @staticmethod
    def is_free(
        name: str, alias: str = "default", *, collection: str = DEFAULT_COLLECTION
    ) -> bool:
        """Read the primary: is ``name`` free now?"""
        return NamedLock.owner_of(name, alias, collection=collection) is None
