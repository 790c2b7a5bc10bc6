"""The atomic lease operations that documents and named locks share.

A lease lives in three fields of one MongoDB document: when it ends (``until``),
who holds it (``owner``) and its fencing token (``fence``, raised by one on every
grant). Every state change below is exactly one conditional ``findAndModify``:
the condition and the change are decided together by the server, so two callers
can never both see "free" and both write "mine".

Whether a lease has expired is decided by the clock of the server (``$$NOW``)
on a real MongoDB, so a client whose clock is wrong cannot steal a lease or keep
one alive. mongomock has no server clock: there the client's clock is used, and
every operation runs under one process-wide lock, because mongomock's
``find_one_and_update`` is not atomic across threads.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple, Union

from pymongo import ReadPreference, ReturnDocument
from pymongo.collection import Collection
from pymongo.errors import (
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from ._waiting import Waker, open_waker

log = logging.getLogger("mongoengine_lockable.lease")

Filter = dict[str, Any]
Update = Union[dict[str, Any], list[dict[str, Any]]]

#: Lease changes are acknowledged by a majority unless the caller says otherwise,
#: so that a failover cannot roll back a grant the caller was told about.
DEFAULT_WRITE_CONCERN = WriteConcern("majority")

#: Computed fields a read adds: is the lease held now, and the clock's time.
HELD = "_lockable_held"
NOW = "_lockable_now"

# mongomock is an in-process fake whose updates are not atomic across threads:
# every lease operation on it takes this lock.
_MOCK_GUARD = threading.RLock()


class Fields(NamedTuple):
    """Where a lease is stored in its document.

    ``acquired_at`` (named-lock records only) makes grants record the server
    time and release leave an expired date (for the TTL index) instead of null.
    """

    until: str
    owner: str
    fence: str
    acquired_at: str | None = None

    @property
    def lease(self) -> tuple[str, str, str]:
        """The three fields every lease has."""
        return (self.until, self.owner, self.fence)


DOCUMENT_FIELDS = Fields("locked_until", "locked_by", "lock_fence")
NAMED_FIELDS = Fields("locked_until", "owner", "fence", "acquired_at")


def is_mongomock(collection: Any) -> bool:
    """Is this a mongomock collection (no server clock, no atomicity)?"""
    return type(collection).__module__.partition(".")[0] == "mongomock"


_HOST = socket.gethostname()


def new_owner() -> str:
    """A fresh owner token for one acquisition: host, pid and 48 random bits,
    so that an operator can tell where a lease came from."""
    return f"{_HOST}:{os.getpid()}:{secrets.token_hex(6)}"


_EPOCH = datetime(1970, 1, 1)


def client_now() -> datetime:
    """The client's UTC time as MongoDB stores it: naive, millisecond precision."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def checked_write_concern(write_concern: object, what: str = "write concern") -> WriteConcern:
    """The write concern of lease changes: ``None`` means ``majority``.

    :raises TypeError: not a :class:`~pymongo.write_concern.WriteConcern`.
    :raises ValueError: unacknowledged (``w=0``): the caller could not know
        whether it won a lease.
    """
    if write_concern is None:
        return DEFAULT_WRITE_CONCERN
    if not isinstance(write_concern, WriteConcern):
        kind = type(write_concern).__name__
        raise TypeError(f"{what} must be a pymongo WriteConcern, not {kind}")
    if not write_concern.acknowledged:
        raise ValueError(f"{what} must be acknowledged (w=0 cannot tell who won a lease)")
    return write_concern


def is_ambiguous(exc: PyMongoError) -> bool:
    """Could the write behind ``exc`` have been applied, or later be?

    A network error (the reply was lost), a write concern not confirmed, or an
    error labelled retryable after pymongo's own retry failed.
    """
    if isinstance(exc, (ConnectionFailure, WriteConcernError)):
        return True
    return isinstance(exc, OperationFailure) and exc.has_error_label("RetryableWriteError")


def combine(*parts: Mapping[str, Any]) -> Filter:
    """AND filters together, flat when their keys do not collide."""
    merged: Filter = {}
    for part in parts:
        if merged.keys() & part.keys():
            return {"$and": [dict(p) for p in parts if p]}
        merged.update(part)
    return merged


class LeaseOps:
    """The lease operations on one collection.

    Each method sends one command. ``match`` selects the document (its ``_id``,
    plus the shard key where there is one); ``owner`` and ``fence`` identify the
    caller's acquisition (``fence=None`` matches any acquisition of ``owner``).

    :param collection: the pymongo (or mongomock) collection holding the leases.
    :param fields: the names of the lease fields in its documents.
    :param write_concern: write concern of lease changes (default ``majority``).
    """

    def __init__(
        self,
        collection: Collection[Any],
        fields: Fields = DOCUMENT_FIELDS,
        write_concern: WriteConcern | None = None,
    ) -> None:
        self.source = collection
        self.fields = fields
        write_concern = checked_write_concern(write_concern)
        self.server_clock = not is_mongomock(collection)
        # Reads that decide lease state must see the primary's latest writes.
        self.collection: Collection[Any] = collection.with_options(
            write_concern=write_concern,
            read_preference=ReadPreference.PRIMARY,
        )
        self._majority = self.collection.with_options(read_concern=ReadConcern("majority"))
        self._guard: AbstractContextManager[Any] = (
            nullcontext() if self.server_clock else _MOCK_GUARD
        )

    # -- conditions ---------------------------------------------------------

    def free(self) -> Filter:
        """Filter: the lease is free now (never taken, released or expired)."""
        until = self.fields.until
        if self.server_clock:
            # A missing or null date sorts below every date, so one comparison
            # covers "never locked", "released" and "expired"; the planner turns
            # it into the index bounds [MinKey, $$NOW] on ``until``.
            return {"$expr": {"$lte": ["$" + until, "$$NOW"]}}
        return {"$or": [{until: None}, {until: {"$lte": client_now()}}]}

    def held(self) -> Filter:
        """Filter: an unexpired lease is held now."""
        until = self.fields.until
        if self.server_clock:
            return {"$expr": {"$gt": ["$" + until, "$$NOW"]}}
        return {until: {"$gt": client_now()}}

    def mine(self, owner: str, fence: int | None) -> Filter:
        """Filter: the lease was granted to this acquisition (whether or not it
        has expired)."""
        if fence is None:
            return {self.fields.owner: owner}
        return {self.fields.owner: owner, self.fields.fence: fence}

    def _ends_in(self, ms: int) -> Any:
        """The value of ``until`` for a lease of ``ms`` milliseconds from now."""
        if self.server_clock:
            return {"$add": ["$$NOW", ms]}
        return client_now() + timedelta(milliseconds=ms)

    # -- operations ---------------------------------------------------------

    def _find_and_modify(
        self,
        query: Filter,
        update: Update,
        *,
        sort: list[Any] | None = None,
        projection: Mapping[str, Any] | None = None,
        upsert: bool = False,
        resolve: Callable[[], dict[str, Any] | None] | None = None,
    ) -> dict[str, Any] | None:
        """Send one ``findAndModify``.

        When the outcome is unknown (the connection failed, or the write
        concern was not confirmed, after pymongo's own retry), ``resolve`` finds
        out what happened by reading the record back; without it the error
        propagates.
        """
        try:
            with self._guard:
                result: dict[str, Any] | None = self.collection.find_one_and_update(
                    query,
                    update,
                    projection=projection,
                    sort=sort,
                    upsert=upsert,
                    return_document=ReturnDocument.AFTER,
                )
        except PyMongoError as exc:
            if resolve is None or not is_ambiguous(exc):
                raise
            log.warning("outcome of a lease change unknown (%s); reading it back", exc)
            try:
                return resolve()
            except PyMongoError as again:
                raise exc from again
        return result

    def read_back(self, query: Filter) -> dict[str, Any] | None:
        """Read ``query``'s document as a majority has committed it, from the
        primary: a write that a failover will roll back is not seen."""
        with self._guard:
            doc: dict[str, Any] | None = self._majority.find_one(query)
        return doc

    def grant(
        self,
        match: Filter,
        owner: str,
        ms: int,
        *,
        force: bool = False,
        sort: list[Any] | None = None,
    ) -> dict[str, Any] | None:
        """Grant a lease of ``ms`` milliseconds to ``owner`` on the first document
        (by ``sort``) matching ``match`` whose lease is free (any, with ``force``).

        Filter: ``match AND free`` (``match`` alone with ``force``).
        Update: ``until = now + ms``, ``owner = owner``, ``fence = fence + 1``
        (a missing fence counts as 0).

        :return: the whole document as stored after the grant, or ``None`` when
            no document matched (held, or gone).
        """
        f = self.fields
        query = match if force else combine(match, self.free())

        def resolve() -> dict[str, Any] | None:
            # Granted iff our owner token is on an unexpired lease.
            return self.read_back(combine(match, {f.owner: owner}, self.held()))

        update: Update
        if self.server_clock:
            update = [
                {
                    "$set": {
                        f.until: self._ends_in(ms),
                        # $literal: an owner starting with "$" is not a field path.
                        f.owner: {"$literal": owner},
                        f.fence: {"$add": [{"$ifNull": ["$" + f.fence, 0]}, 1]},
                    }
                }
            ]
        else:
            return self._grant_mock(query, owner, ms, sort)
        return self._find_and_modify(query, update, sort=sort, resolve=resolve)

    def _grant_mock(
        self, query: Filter, owner: str, ms: int, sort: list[Any] | None
    ) -> dict[str, Any] | None:
        """:meth:`grant` on mongomock: pick the document, then write the lease
        with the fence computed here (a stored null fence counts as 0, as
        ``$ifNull`` does on the server); atomic under the process-wide guard."""
        f = self.fields
        with self._guard:
            target = self.collection.find_one(query, {f.fence: True}, sort=sort)
            if target is None:
                return None
            fence = int(target.get(f.fence) or 0) + 1
            lease = {f.until: self._ends_in(ms), f.owner: owner, f.fence: fence}
            return self._find_and_modify({"_id": target["_id"]}, {"$set": lease})

    def release(
        self,
        match: Filter,
        owner: str,
        fence: int | None,
        *,
        projection: Mapping[str, Any] | None = None,
        min_hold_ms: int = 0,
        acquired_at: datetime | None = None,
        until_now: datetime | None = None,
    ) -> dict[str, Any] | None:
        """End the caller's unexpired lease now.

        Filter: ``match AND mine(owner, fence) AND held``.
        Update, documents: ``until = null``. Named-lock records:
        ``until = max(now, min(until, acquired_at + min_hold_ms))``, an expired
        date the TTL index can act on, or the end of the minimum hold.
        Owner and fence stay, so the fence keeps growing.

        :param acquired_at: the grant's time, and ``until_now`` the lease's
            current end, for ``min_hold_ms`` on mongomock (the server reads both
            from the record).
        :return: the document after the release, or ``None`` if the caller did
            not hold an unexpired lease.
        """
        f = self.fields
        query = combine(match, self.mine(owner, fence), self.held())
        update: Update
        if f.acquired_at is None:
            update = {"$set": {f.until: None}}
        elif self.server_clock:
            hold_end = {"$add": ["$" + f.acquired_at, min_hold_ms]}
            # The token is dropped: a read-back can tell "released" from "expired".
            update = [
                {"$set": {f.until: {"$max": ["$$NOW", {"$min": ["$" + f.until, hold_end]}]}}},
                {"$unset": "token"},
            ]
        else:
            now = client_now()
            ends = now if acquired_at is None else acquired_at + timedelta(milliseconds=min_hold_ms)
            until = until_now if until_now is not None else ends
            update = {"$set": {f.until: max(now, min(until, ends))}, "$unset": {"token": ""}}

        ours = combine(match, self.mine(owner, fence))

        def released(seen: Mapping[str, Any]) -> bool:
            return seen.get(f.until) is None if f.acquired_at is None else "token" not in seen

        def resolve() -> dict[str, Any] | None:
            seen = self.read_back(ours)
            if seen is None:
                return None  # taken by another since: not ours to release
            if released(seen):
                return seen
            # Not released as a majority sees it: send it again; the server
            # decides whether the lease is still held.
            again = self._find_and_modify(query, update, projection=projection)
            if again is None:
                # Our first release may be applied but not yet majority-committed.
                with self._guard:
                    local: dict[str, Any] | None = self.collection.find_one(ours)
                if local is not None and released(local):
                    return local
            return again

        return self._find_and_modify(query, update, projection=projection, resolve=resolve)

    def clear_expired(self, match: Filter, owner: str, fence: int | None) -> bool:
        """Clear the caller's lease if it is still recorded although expired.

        Filter: ``match AND mine(owner, fence) AND until != null AND free``;
        nobody took the lease since (a grant would have changed owner or fence).
        Update: ``until = null``.

        :return: whether a stale lease of the caller's was cleared.
        """
        # "free" too: never clear a live lease, even one of the same owner name.
        query = combine(
            match, self.mine(owner, fence), {self.fields.until: {"$ne": None}}, self.free()
        )
        projection = {self.fields.until: True}
        return self._find_and_modify(
            query, {"$set": {self.fields.until: None}}, projection=projection
        ) is not None

    def renew(
        self,
        match: Filter,
        owner: str,
        fence: int | None,
        ms: int,
        *,
        projection: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Extend the caller's unexpired lease to now + ``ms``.

        Filter: ``match AND mine(owner, fence) AND held`` (an expired lease is
        not revived). Update: ``until = now + ms``; the fence is kept.
        """
        query = combine(match, self.mine(owner, fence), self.held())
        update: Update
        if self.server_clock:
            update = [{"$set": {self.fields.until: self._ends_in(ms)}}]
        else:
            update = {"$set": {self.fields.until: self._ends_in(ms)}}

        def resolve() -> dict[str, Any] | None:
            # Renewing twice is harmless: if the lease is still ours, send it again.
            if self.read_back(query) is None:
                return None
            return self._find_and_modify(query, update, projection=projection)

        return self._find_and_modify(query, update, projection=projection, resolve=resolve)

    def update_held(
        self, match: Filter, owner: str, fence: int, update: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Apply ``update`` only while the caller's lease, with its fence, is
        unexpired.

        Filter: ``match AND mine(owner, fence) AND held``. Update: the caller's.
        """
        query = combine(match, self.mine(owner, fence), self.held())
        return self._find_and_modify(query, update)

    def _grant_upsert_mock(
        self, key: Any, owner: str, token: str, ms: int, extra: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """:meth:`grant_upsert` on mongomock: the same rules on the client's
        clock, made atomic by the process-wide guard (a read, then one write)."""
        f = self.fields
        assert f.acquired_at is not None
        with self._guard:
            now = client_now()
            old = self.collection.find_one({"_id": key}, {f.until: True, f.fence: True})
            old_until = None if old is None else old.get(f.until)
            if old_until is not None and old_until > now:
                return old  # held: the caller sees another token
            old_fence = 0 if old is None else int(old.get(f.fence) or 0)
            epoch_ms = int((now - _EPOCH).total_seconds() * 1000)
            new = {
                f.until: now + timedelta(milliseconds=ms),
                f.owner: owner,
                "token": token,
                f.fence: max(old_fence + 1, epoch_ms),
                f.acquired_at: now,
                **extra,
            }
            return self._find_and_modify({"_id": key}, {"$set": new}, upsert=True)

    def waker(self, key: Any) -> Waker:
        """What a waiter for the lease on ``{_id: key}`` blocks on: a change
        stream of the events that can free it, else polling.

        Only a release (``until`` set to null; a named lock's release drops its
        token) or a delete of that record wakes the waiter. Grants,
        renewals and the holder's own writes do not: with many waiters, waking
        all of them on every write costs more than it saves. A lease that
        simply runs out is not an event; the waiter's timeout covers it.
        """
        until = self.fields.until
        if self.fields.acquired_at is None:
            released: list[Filter] = [
                {"updateDescription.updatedFields." + until: {"$type": "null"}},
                # The server may log a small document's pipeline update (a grant,
                # a renewal) as a replacement: only one without a lease wakes.
                {"operationType": "replace", "fullDocument." + until: {"$not": {"$type": "date"}}},
            ]
        else:
            released = [
                {"updateDescription.removedFields": "token"},
                {"operationType": "replace", "fullDocument.token": {"$exists": False}},
            ]
        record = {"documentKey._id": key, "$or": [{"operationType": "delete"}, *released]}
        # A dropped or renamed collection ends the stream (the waiter polls on).
        events = {"$or": [record, {"operationType": {"$in": ["drop", "rename", "invalidate"]}}]}
        return open_waker(self.collection, events, self.server_clock)

    def peek(self, match: Filter) -> dict[str, Any] | None:
        """Read the lease fields of the document, from the primary, with
        ``HELD`` (is an unexpired lease held now?) and ``NOW`` (the deciding
        clock's time, so that ``until - NOW`` is the lease's time left,
        whatever the client's clock says).

        :return: ``None`` if no document matches.
        """
        f = self.fields
        projection: dict[str, Any] = {f.until: True, f.owner: True, f.fence: True}
        if self.server_clock:
            projection[HELD] = {"$gt": ["$" + f.until, "$$NOW"]}
            projection[NOW] = "$$NOW"
        doc: dict[str, Any] | None
        with self._guard:
            if self.server_clock:
                # An aggregation, not a find: find projections accept
                # expressions only from MongoDB 4.4 on.
                stages: list[dict[str, Any]] = [
                    {"$match": match}, {"$limit": 1}, {"$project": projection}
                ]
                doc = next(iter(self.collection.aggregate(stages)), None)
            else:
                doc = self.collection.find_one(match, projection)
        if doc is not None and not self.server_clock:
            until, now = doc.get(f.until), client_now()
            doc[HELD] = until is not None and until > now
            doc[NOW] = now
        return doc

    def grant_upsert(
        self, key: Any, owner: str, token: str, ms: int, extra: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Grant a lease on the record ``{_id: key}``, creating it if missing
        (named locks). ``token`` is unique to this attempt: the caller won iff
        the returned record carries it.

        Real server: MongoDB rejects ``$expr`` in the filter of an upsert, so the
        filter is ``{_id: key}`` alone and the pipeline decides: with
        ``free = until <= $$NOW`` (true for a new record), every lease field
        becomes ``free ? new value : old value``. When held, the record is left
        as it was. The fence becomes ``max(fence + 1, $$NOW in ms)``, so that it
        keeps growing even after the TTL index removed an expired record.

        mongomock: the same decision on the client's clock, under the
        process-wide guard (see :meth:`_grant_upsert_mock`).

        :return: the record after the operation (check its ``token``), or
            ``None`` when a concurrent creation won the race.
        """
        f = self.fields
        assert f.acquired_at is not None
        if not self.server_clock:
            return self._grant_upsert_mock(key, owner, token, ms, extra)
        free = self.free()["$expr"]
        values: dict[str, Any] = {
            f.until: self._ends_in(ms),
            f.owner: {"$literal": owner},
            "token": {"$literal": token},
            f.fence: {"$max": [{"$add": [{"$ifNull": ["$" + f.fence, 0]}, 1]},
                               {"$toLong": "$$NOW"}]},
            f.acquired_at: "$$NOW",
            **{k: {"$literal": v} for k, v in extra.items()},
        }
        # One $set stage: every expression sees the record as it was before.
        stage = {k: {"$cond": [free, v, "$" + k]} for k, v in values.items()}

        def resolve() -> dict[str, Any] | None:
            return self.read_back(combine({"_id": key, "token": token}, self.held()))

        try:
            return self._find_and_modify(
                {"_id": key}, [{"$set": stage}], upsert=True, resolve=resolve
            )
        except DuplicateKeyError:
            # Two first acquisitions raced to create the record; the other won.
            return None


def time_left(seen: Mapping[str, Any], fields: Fields) -> float:
    """Seconds until the lease read by :meth:`LeaseOps.peek` runs out, by the
    deciding clock; 0 if it is free already (retry at once)."""
    until = seen.get(fields.until)
    if not seen.get(HELD) or until is None:
        return 0.0
    left: float = (until - seen[NOW]).total_seconds()
    return left


def lease_ops_for(doc_cls: Any, collection: Collection[Any]) -> LeaseOps:
    """The :class:`LeaseOps` of a document class on ``collection``, built once
    per class and collection (the class's ``lock_write_concern`` applies)."""
    write_concern = getattr(doc_cls, "lock_write_concern", None)
    cached = doc_cls.__dict__.get("_lockable_ops")
    if cached is not None and cached[0] is collection and cached[1] is write_concern:
        ops: LeaseOps = cached[2]
        return ops
    ops = LeaseOps(collection, DOCUMENT_FIELDS, write_concern)
    # A switch_db()/using() collection differs from the class's: only the
    # class's own collection is worth keeping.
    if collection is doc_cls._get_collection():
        type.__setattr__(doc_cls, "_lockable_ops", (collection, write_concern, ops))
    return ops
