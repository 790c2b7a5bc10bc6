"""Named (advisory) locks: ``NamedLock`` and ``@exclusive``.

A named lock is a lease on one record per name in a collection of its own
(``lockable_named_locks`` by default), through the same operations as a
document lease (:mod:`mongoengine_lockable._lease`). A record looks like::

    {_id: "nightly-report", locked_until: <date>, owner: "web-1:4242:9f0c...",
     fence: 1795379760218, token: "...", host: "web-1", pid: 4242,
     acquired_at: <date>}

``locked_until``, ``acquired_at`` and the fence come from the server's clock.
Released records keep an expired ``locked_until`` (not ``null``) so that the
TTL index removes them once they have been expired for ``RECORD_GRACE_SECONDS``;
a held record is never removed, since its ``locked_until`` is in the future.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
import threading
from datetime import datetime
from types import TracebackType
from typing import Any, Callable, NamedTuple, TypeVar

from mongoengine.connection import get_db
from pymongo.errors import OperationFailure
from pymongo.write_concern import WriteConcern

from . import _args, signals
from ._errors import LockNotOwnedError, LockUnavailableError, held_by
from ._keepalive import KeepAlive
from ._lease import HELD, NAMED_FIELDS, LeaseOps, checked_write_concern, new_owner, time_left
from ._waiting import retry_until

__all__ = ["DEFAULT_COLLECTION", "NamedLock", "exclusive"]

log = logging.getLogger("mongoengine_lockable.named")

#: The collection of named-lock records unless ``collection=`` says otherwise.
DEFAULT_COLLECTION = "lockable_named_locks"

#: How long an expired record stays before the TTL index removes it. Fences
#: survive the removal: a new record's fence starts from the server time in
#: milliseconds, which has passed every fence handed out an hour earlier
#: unless a name was granted more than once per millisecond for that long.
RECORD_GRACE_SECONDS = 3600

_HOST = socket.gethostname()
_DEFAULT: Any = object()
_RECORD_PROJECTION = dict.fromkeys(NAMED_FIELDS.lease, True)

# Collections whose TTL index this process has already ensured.
_ttl_ready: set[tuple[int, str]] = set()
_ttl_lock = threading.Lock()

F = TypeVar("F", bound=Callable[..., Any])


class _Acquired(NamedTuple):
    fence: int
    acquired_at: datetime | None
    until: datetime | None


def _collection_name(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value or "$" in value or "\0" in value or value.startswith("system."):
        raise ValueError(f"{what} is not a usable collection name: {value!r}")
    return value


def _alias(value: object) -> str:
    return _args.text(value, "alias")


def _ops_on(alias: str, collection: str, write_concern: WriteConcern | None) -> LeaseOps:
    coll = get_db(alias)[collection]
    ops = LeaseOps(coll, NAMED_FIELDS, write_concern)
    key = (id(coll.database.client), coll.full_name)
    if key not in _ttl_ready:
        with _ttl_lock:
            if key not in _ttl_ready:
                try:
                    coll.create_index(
                        "locked_until",
                        expireAfterSeconds=RECORD_GRACE_SECONDS,
                        name="lockable_ttl",
                    )
                except OperationFailure as exc:
                    # An index on locked_until with other options exists: the
                    # operator chose it; locks work without the cleanup.
                    log.warning("named-lock TTL index not created on %s: %s", coll.full_name, exc)
                _ttl_ready.add(key)
    return ops


class NamedLock:
    """An advisory lock by name, held by at most one owner at a time::

        lock = NamedLock("nightly-report", duration=60)
        if lock.acquire():
            try:
                build_report()
            finally:
                lock.release()

    Not re-entrant: while held, a second ``acquire`` fails, even from this
    instance. Constructing one does no I/O; acquire, release and renew each
    send one ``findAndModify`` (and waiting adds reads and a change stream).

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
        self.name = _args.lock_name(name)
        self._ms = _args.duration_ms(duration)
        self.owner = _args.owner_string(owner) or new_owner()
        self.wait = _args.wait_seconds(wait)
        self.keepalive = _args.flag(keepalive, "keepalive")
        hold = _args.seconds_at_least_zero(min_hold, "min_hold")
        self._min_hold_ms = round(hold * 1000)
        if self._min_hold_ms > self._ms:
            raise ValueError(f"min_hold ({hold} s) must not exceed duration ({self._ms / 1000} s)")
        self.alias = _alias(alias)
        self.collection = _collection_name(collection, "collection")
        self._write_concern = checked_write_concern(write_concern, "write_concern")
        #: Fence of this instance's latest grant; ``None`` before the first.
        self.fence: int | None = None
        self._held: _Acquired | None = None
        self._keeper: KeepAlive | None = None

    def __repr__(self) -> str:
        state = "held" if self._held is not None else "not held"
        return f"<NamedLock {self.name!r} owner={self.owner!r} fence={self.fence} {state}>"

    @property
    def duration(self) -> float:
        """The lease's length in seconds."""
        return self._ms / 1000

    def _ops(self) -> LeaseOps:
        return _ops_on(self.alias, self.collection, self._write_concern)

    def acquire(self, *, wait: _args.Duration | None = _DEFAULT) -> bool:
        """Take the lock.

        One conditional upsert per attempt (:meth:`LeaseOps.grant_upsert`);
        a lost race to create the record counts as "held".

        :param wait: seconds to keep trying (``None``: no limit); default the
            lock's ``wait``.
        :return: ``True`` if this instance now holds the lock.
        """
        wait_s = self.wait if wait is _DEFAULT else _args.wait_seconds(wait)
        ops = self._ops()
        extra = {"host": _HOST, "pid": os.getpid()}

        def attempt(read: bool) -> tuple[dict[str, Any] | None, float | None]:
            token = secrets.token_hex(8)
            record = ops.grant_upsert(self.name, self.owner, token, self._ms, extra)
            if record is not None and record.get("token") == token:
                return record, None
            if not read:
                return None, self._ms / 1000
            seen = ops.peek({"_id": self.name})
            return None, None if seen is None else time_left(seen, ops.fields)

        record = retry_until(attempt, wait_s, lambda: ops.waker(self.name))
        if record is None:
            return False
        self._stop_keepalive()
        self.fence = int(record["fence"])
        self._held = _Acquired(self.fence, record.get("acquired_at"), record.get("locked_until"))
        signals.lock_acquired.send(self, name=self.name, owner=self.owner, fence=self.fence)
        if self.keepalive:
            self._keeper = KeepAlive(self, self._ms)
        return True

    def _not_owned(self, what: str) -> LockNotOwnedError:
        return LockNotOwnedError(
            f"cannot {what} lock {self.name!r}: owner {self.owner!r} does not hold it",
            target=self.name,
            owner=self.owner,
        )

    def release(self) -> None:
        """Release the lock (kept until ``min_hold`` after the grant, if set).

        :raises LockNotOwnedError: this instance does not hold it now
            (never acquired, released, expired or taken over).
        """
        held = self._held
        if held is None:
            raise self._not_owned("release")
        self._stop_keepalive()
        raw = self._ops().release(
            {"_id": self.name},
            self.owner,
            held.fence,
            projection=_RECORD_PROJECTION,
            min_hold_ms=self._min_hold_ms,
            acquired_at=held.acquired_at,
            until_now=held.until,
        )
        # Forgotten only once the server answered: after an error the caller
        # can still retry the release.
        self._held = None
        if raw is None:
            raise self._not_owned("release")
        signals.lock_released.send(self, name=self.name, owner=self.owner, fence=held.fence)

    def renew(self, duration: _args.Duration | None = None) -> None:
        """Extend the held lock to now + ``duration`` (default: the lock's).

        :raises LockNotOwnedError: not held now (an expired lock is not revived).
        """
        ms = self._ms if duration is None else _args.duration_ms(duration)
        held = self._held
        if held is None:
            raise self._not_owned("renew")
        raw = self._ops().renew(
            {"_id": self.name}, self.owner, held.fence, ms, projection=_RECORD_PROJECTION
        )
        if raw is None:
            raise self._not_owned("renew")
        self._held = held._replace(until=raw.get(NAMED_FIELDS.until))
        signals.lock_renewed.send(self, name=self.name, owner=self.owner, fence=held.fence)

    def _keepalive_renew(self) -> bool:
        held = self._held
        if held is None:
            return False
        try:
            self.renew()
        except LockNotOwnedError:
            log.warning("named lock %r lost (owner %s)", self.name, self.owner)
            signals.lock_lost.send(self, name=self.name, owner=self.owner, fence=held.fence)
            return False
        return True

    def _stop_keepalive(self) -> None:
        keeper = self._keeper
        if keeper is not None:
            self._keeper = None
            keeper.stop()

    def __enter__(self) -> NamedLock:
        if not self.acquire():
            holder = self.owner_of(self.name, self.alias, collection=self.collection)
            raise LockUnavailableError(
                f"lock {self.name!r} {held_by(holder)}", target=self.name, owner=holder
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    @staticmethod
    def owner_of(
        name: str, alias: str = "default", *, collection: str = DEFAULT_COLLECTION
    ) -> str | None:
        """Read the database: the owner holding ``name`` now, or ``None``."""
        name = _args.lock_name(name)
        coll = get_db(_alias(alias))[_collection_name(collection, "collection")]
        ops = LeaseOps(coll, NAMED_FIELDS)
        seen = ops.peek({"_id": name})
        if seen is None or not seen[HELD]:
            return None
        owner: str | None = seen.get(NAMED_FIELDS.owner)
        return owner

    @staticmethod
    def is_free(
        name: str, alias: str = "default", *, collection: str = DEFAULT_COLLECTION
    ) -> bool:
        """Read the database: is ``name`` free now?"""
        return NamedLock.owner_of(name, alias, collection=collection) is None


def exclusive(
    name: str,
    duration: _args.Duration,
    *,
    wait: _args.Duration | None = 0,
    min_hold: _args.Duration = 0,
    keepalive: bool = False,
    alias: str = "default",
    collection: str = DEFAULT_COLLECTION,
) -> Callable[[F], F]:
    """Run the decorated function only while holding the named lock ``name``;
    when another holder has it, skip the call (logged) and return ``None``::

        @exclusive("nightly-report", 600, min_hold=30)
        def nightly_report(): ...

    Scheduled on many hosts, each tick runs once. Arguments as for
    :class:`NamedLock`; they are checked when decorating.
    """
    # Validate now, so a typo fails at import rather than at the first tick.
    NamedLock(name, duration, wait=wait, min_hold=min_hold, keepalive=keepalive,
              alias=alias, collection=collection)

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def run_exclusively(*args: Any, **kwargs: Any) -> Any:
            lock = NamedLock(name, duration, wait=wait, min_hold=min_hold,
                             keepalive=keepalive, alias=alias, collection=collection)
            if not lock.acquire():
                log.info("skipped %s: lock %r is held elsewhere", func.__qualname__, name)
                return None
            try:
                return func(*args, **kwargs)
            finally:
                lock.release()

        return run_exclusively  # type: ignore[return-value]

    return decorate
