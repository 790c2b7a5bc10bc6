"""Querysets that select documents by lease state and claim them atomically."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from mongoengine import QuerySet
from mongoengine.errors import OperationError
from mongoengine.queryset import QuerySetNoCache

from . import _args
from ._document import KIND, document_lease, executor_of
from ._engine import ClaimSpec, Result, claim, claim_many, release_all
from ._io import SyncIO, run
from ._rules import Ask, new_owner, new_ticket

__all__ = ["LockableQuerySet", "LockableQuerySetNoCache"]



class _LeaseQueries:
    """The lease methods, shared by the caching and the non-caching queryset."""

    if TYPE_CHECKING:  # MongoEngine's, declared for the type checker
        _document: Any
        _collection: Any
        _query: dict[str, Any]
        _ordering: Any
        _where_clause: Any
        _none: bool
        _empty: bool
        _skip: int | None
        _limit: int | None
        _hint: Any
        _collation: Any

        def filter(self, *args: Any, **kwargs: Any) -> Any: ...
        def _get_order_by(self, keys: Any) -> Any: ...
        def _sub_js_fields(self, code: str) -> str: ...

    def _io(self) -> SyncIO:
        return executor_of(self._document, self._collection)

    def _lease_filter(self, flt: dict[str, Any]) -> Any:
        return self.filter(__raw__=self._io().localize(flt))

    # -- selecting --------------------------------------------------------------

    def unlocked(self) -> Any:
        """Documents whose lease is free now (never locked, released or expired).

        On a real server the expiry is decided by the server's clock when the
        query runs; on mongomock by the client's clock at this call.
        """
        return self._lease_filter(KIND.free())

    def locked(self) -> Any:
        """Documents whose lease is held (unexpired) now."""
        return self._lease_filter(KIND.held())

    def held_by(self, owner: str) -> Any:
        """Documents whose unexpired lease belongs to ``owner``.

        :raises TypeError, ValueError: ``owner`` is not a non-empty ``str``.
        """
        return self._lease_filter(KIND.held_by(_args.owner_name(owner)))

    def expired(self) -> Any:
        """Documents whose lease ran out without a release (a crashed or stuck
        holder): a lease was set, its time has passed, it was not released."""
        return self._lease_filter(KIND.expired())

    def exhausted(self, max_attempts: int) -> Any:
        """Documents granted ``max_attempts`` times or more (the dead letters of
        a queue whose claims use ``max_attempts``).

        :raises TypeError, ValueError: ``max_attempts`` is not an ``int`` >= 1.
        """
        return self.filter(__raw__=KIND.exhausted(_args.count(max_attempts, "max_attempts")))

    # -- claiming ---------------------------------------------------------------

    def _claim_spec(self) -> ClaimSpec | None:
        """What this queryset selects; ``None`` when it selects nothing."""
        if self._none or self._empty:
            return None
        flt = dict(self._query)
        if self._where_clause:
            flt["$where"] = self._sub_js_fields(self._where_clause)
        sort = None
        if self._ordering:
            sort = list(self._ordering)
        elif self._ordering is None and self._document._meta.get("ordering"):
            sort = list(self._get_order_by(self._document._meta["ordering"]))
        return ClaimSpec(
            filter=flt,
            sort=sort,
            skip=self._skip or 0,
            limit=self._limit,
            hint=None if self._hint in (-1, None) else self._hint,
            collation=self._collation,
        )

    def _claimed(self, result: Result, ask: Ask, sent: float, waited: float,
                 keepalive: bool) -> Any:
        assert result.doc is not None
        doc = self._document._from_son(result.doc, created=False)
        handle = document_lease(doc)
        handle.lease.adopt(result, ask, (sent, result.now), waited, direct=True)
        if keepalive:
            handle.keep_alive()
        return doc

    def claim(
        self,
        duration: _args.Duration,
        *,
        owner: str | None = None,
        wait: _args.Duration | None = 0,
        keepalive: bool = False,
        max_attempts: int | None = None,
    ) -> Any:
        """Lock one document of this queryset whose lease is free, atomically:
        ``SELECT ... FOR UPDATE SKIP LOCKED`` for MongoDB.

        One ``findAndModify``: this queryset's filter AND lease free AND nobody
        queued for it, sorted by its ``order_by`` (or the document's
        ``meta['ordering']``); the update grants the lease. Everything that
        narrows or orders the queryset counts: ``none()``, ``where()``,
        ``search_text()``, ``hint()``, ``collation()``, and ``skip()``/``limit()``
        and slices (the first free document among those the queryset would
        yield; such a window is read in batches of ids first). Documents held
        by others are skipped, never returned. The whole document is returned,
        whatever the queryset's projection.

        :param duration: the lease's length (seconds or ``timedelta``).
        :param owner: the holder's name; default a fresh random token.
        :param wait: seconds to wait for a claimable document (``None``: no
            limit): woken by a change stream of inserts, releases and updates
            where the server has one, and by the earliest expiry of a held
            match; polling otherwise.
        :param keepalive: renew the claimed lease from a background thread until
            it is released (as :meth:`LockableMixin.lock`).
        :param max_attempts: skip documents whose lease was already granted this
            many times (their ``lock_fence``): a job that keeps failing is set
            aside (see :meth:`exhausted`).
        :return: the locked document, as :meth:`LockableMixin.lock` leaves it,
            or ``None`` if no matching document became claimable in time.
        :raises TypeError, ValueError: bad arguments, before any database call.
        """
        ms = _args.duration_ms(duration)
        token = _args.owner_string(owner) or new_owner()
        wait_s = _args.wait_seconds(wait)
        keepalive = _args.flag(keepalive, "keepalive")
        extra = self._attempts(max_attempts)
        spec = self._claim_spec()
        if spec is None:
            return None
        ask = Ask(token, new_ticket(), ms)
        steps = claim(KIND, spec, ask, extra, wait_s, time.monotonic)
        got = run(steps, self._io(), track=wait_s != 0)
        if got is None:
            return None
        result, sent, waited = got
        return self._claimed(result, ask, sent, waited, keepalive)

    def claim_many(
        self,
        n: int,
        duration: _args.Duration,
        *,
        owner: str | None = None,
        max_attempts: int | None = None,
    ) -> list[Any]:
        """Lock up to ``n`` documents of this queryset whose leases are free,
        all for one owner, in the queryset's order.

        Each document is granted atomically (never one held by another caller,
        each with its own fence), in three round trips per round whatever
        ``n`` (see :func:`mongoengine_lockable._engine.claim_many`).

        :param n: how many at most, an ``int`` >= 1.
        :return: the locked documents (possibly fewer than ``n``, or none).
        :raises TypeError, ValueError: bad arguments, before any database call.
        """
        count = _args.count(n, "n")
        ms = _args.duration_ms(duration)
        token = _args.owner_string(owner) or new_owner()
        extra = self._attempts(max_attempts)
        spec = self._claim_spec()
        if spec is None:
            return []
        ask = Ask(token, new_ticket(), ms)
        granted = run(claim_many(KIND, spec, ask, extra, count, time.monotonic), self._io())
        return [self._claimed(result, ask, sent, 0.0, False) for result, sent in granted]

    def release_all(self, owner: str) -> int:
        """Release every unexpired lease of ``owner`` among the documents of this
        queryset (a worker shutting down), in one ``update``; each passes to its
        longest waiting caller, if any.

        :return: how many leases were released.
        :raises TypeError, ValueError: ``owner`` is not a non-empty ``str``.
        """
        owner = _args.owner_name(owner)
        spec = self._claim_spec()
        if spec is None:
            return 0
        return run(release_all(KIND, spec, owner), self._io())

    @staticmethod
    def _attempts(max_attempts: object) -> dict[str, Any]:
        if max_attempts is None:
            return {}
        return KIND.attempts_below(_args.count(max_attempts, "max_attempts"))


class LockableQuerySet(_LeaseQueries, QuerySet):
    """The queryset of :class:`~mongoengine_lockable.LockableMixin` documents.

    A document with its own ``queryset_class`` must subclass this one.
    """

    def no_cache(self) -> LockableQuerySetNoCache:
        """As MongoEngine's, keeping the lease methods."""
        if self._result_cache is not None:
            raise OperationError("QuerySet already cached")
        queryset: LockableQuerySetNoCache = self._clone_into(
            LockableQuerySetNoCache(self._document, self._collection)
        )
        return queryset


class LockableQuerySetNoCache(_LeaseQueries, QuerySetNoCache):
    """What :meth:`LockableQuerySet.no_cache` returns."""

    def cache(self) -> LockableQuerySet:
        """As MongoEngine's, keeping the lease methods."""
        queryset: LockableQuerySet = self._clone_into(
            LockableQuerySet(self._document, self._collection)
        )
        return queryset
