"""Querysets that select free or held documents and claim one atomically."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mongoengine import QuerySet
from mongoengine.errors import OperationError
from mongoengine.queryset import QuerySetNoCache

from . import _args
from ._lease import LeaseOps, lease_ops_for, new_owner

__all__ = ["LockableQuerySet", "LockableQuerySetNoCache"]


class _LeaseQueries:
    """``unlocked()``, ``locked()`` and ``claim()``, shared by the caching and
    the non-caching queryset."""

    if TYPE_CHECKING:  # MongoEngine's, declared for the type checker
        _document: Any
        _collection: Any
        _query: dict[str, Any]
        _ordering: Any

        def filter(self, *args: Any, **kwargs: Any) -> Any: ...
        def _get_order_by(self, keys: Any) -> Any: ...

    def _lease_ops(self) -> LeaseOps:
        return lease_ops_for(self._document, self._collection)

    def unlocked(self) -> LockableQuerySet:
        """Documents whose lease is free now (never locked, released or expired).

        On a real server the expiry is decided by the server's clock when the
        query runs; on mongomock by the client's clock at this call.
        """
        return self._lease_filter(held=False)

    def locked(self) -> LockableQuerySet:
        """Documents whose lease is held (unexpired) now."""
        return self._lease_filter(held=True)

    def _lease_filter(self, *, held: bool) -> LockableQuerySet:
        ops = self._lease_ops()
        return self.filter(__raw__=ops.held() if held else ops.free())  # type: ignore[no-any-return]

    def _claim_order(self) -> list[Any] | None:
        if self._ordering:
            return list(self._ordering)
        if self._ordering is None and self._document._meta.get("ordering"):
            return list(self._get_order_by(self._document._meta["ordering"]))
        return None

    def claim(self, duration: _args.Duration, *, owner: str | None = None) -> Any:
        """Lock one document of this queryset whose lease is free, atomically.

        One ``findAndModify``: filter = this queryset's filter AND lease free,
        sorted by its ``order_by`` (or the document's ``meta['ordering']``);
        the update grants the lease. Like ``SELECT ... FOR UPDATE SKIP LOCKED``,
        documents held by others are skipped, never returned. ``skip``,
        ``limit`` and projections of the queryset are not applied: the whole
        document is returned.

        :param duration: the lease's length (seconds or ``timedelta``).
        :param owner: the holder's name; default a fresh random token.
        :return: the locked document, as :meth:`LockableMixin.lock` leaves it,
            or ``None`` if no matching document is free.
        :raises TypeError, ValueError: bad ``duration`` or ``owner``, before any
            database call.
        """
        ms = _args.duration_ms(duration)
        token = _args.owner_string(owner) or new_owner()
        raw = self._lease_ops().grant(self._query, token, ms, sort=self._claim_order())
        if raw is None:
            return None
        doc = self._document._from_son(raw, created=False)
        doc._lease_taken(raw, token, ms)
        return doc


class LockableQuerySet(_LeaseQueries, QuerySet):
    """The queryset of :class:`~mongoengine_lockable.LockableMixin` documents.

    A document with its own ``queryset_class`` should subclass this one.
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
