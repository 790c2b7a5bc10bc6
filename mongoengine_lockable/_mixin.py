"""``LockableMixin``: a lease on any MongoEngine document."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from mongoengine.errors import InvalidQueryError, LookUpError, ValidationError
from mongoengine.fields import DateTimeField, IntField, StringField
from mongoengine.queryset import transform
from pymongo.write_concern import WriteConcern

from . import _args, signals
from ._errors import LockNotOwnedError, LockUnavailableError, UnsavedDocumentError, held_by
from ._keepalive import KeepAlive
from ._lease import (
    DEFAULT_WRITE_CONCERN,
    DOCUMENT_FIELDS,
    HELD,
    LeaseOps,
    checked_write_concern,
    lease_ops_for,
    new_owner,
    time_left,
)
from ._queryset import LockableQuerySet
from ._waiting import retry_until

__all__ = ["LockableMixin"]

log = logging.getLogger("mongoengine_lockable.document")

_LEASE_FIELDS = frozenset(DOCUMENT_FIELDS.lease)
# Release and renew read back only the lease fields: the caller's unsaved
# edits to other fields are left alone.
_LEASE_PROJECTION = dict.fromkeys(DOCUMENT_FIELDS.lease, True)


class _Held(NamedTuple):
    """The instance's last acquisition."""

    owner: str
    fence: int
    ms: int


class _MixinMeta:
    """The mixin's ``meta``, visible on the mixin class only.

    MongoEngine merges the ``meta`` of plain mixin classes into a document's.
    A plain class attribute would also be inherited by the document class, and
    MongoEngine would then take it for that document's own meta when a subclass
    is declared (an ``allow_inheritance`` subclass would lose its base's
    collection). Raising ``AttributeError`` below the mixin prevents that.
    """

    def __init__(self, meta: dict[str, Any]) -> None:
        self._meta = meta

    def __set_name__(self, owner: type, name: str) -> None:
        self._owner = owner

    def __get__(self, instance: object, cls: type | None = None) -> dict[str, Any]:
        if instance is None and cls is self._owner:
            return dict(self._meta)
        raise AttributeError("meta")


class LockableMixin:
    """Mix into a :class:`mongoengine.Document` to give it a lease::

        class Job(LockableMixin, Document):
            payload = StringField()

    Adds the stored fields ``locked_until`` (indexed; ``None`` when free after
    a release or never locked), ``locked_by`` (owner of the current or last
    lease) and ``lock_fence`` (fencing token, +1 on every acquisition), the
    lease methods below, and :class:`LockableQuerySet` as ``Job.objects``.

    ``lock_write_concern`` (class attribute) is the write concern of lease
    changes, ``majority`` by default.
    """

    locked_until = DateTimeField(default=None)
    locked_by = StringField(default=None)
    lock_fence = IntField(default=0)

    meta = _MixinMeta({"indexes": ["locked_until"], "queryset_class": LockableQuerySet})

    lock_write_concern: ClassVar[WriteConcern] = DEFAULT_WRITE_CONCERN

    _lockable_held: _Held | None = None
    _lockable_keepalive: KeepAlive | None = None

    # The attributes below are MongoEngine's; declared for the type checker.
    if TYPE_CHECKING:  # pragma: no cover
        pk: Any
        DoesNotExist: type[Exception]
        _meta: dict[str, Any]
        _fields: dict[str, Any]
        _data: dict[str, Any]
        _changed_fields: Any
        _created: bool

        def _get_collection(self) -> Any: ...
        def _reload(self, key: str, value: Any) -> Any: ...
        @property
        def _qs(self) -> Any: ...
        @property
        def _object_key(self) -> dict[str, Any]: ...

    # -- plumbing -------------------------------------------------------------

    def _lease_ops(self) -> LeaseOps:
        # Checked before the collection is touched (its first use creates indexes).
        checked_write_concern(type(self).lock_write_concern, "lock_write_concern")
        return lease_ops_for(type(self), self._get_collection())

    def _lease_match(self) -> dict[str, Any]:
        """The raw filter naming this document: ``_id``, and the shard key
        where the class declares one (a sharded find-and-modify needs it)."""
        if self.pk is None:
            raise UnsavedDocumentError(
                f"{type(self).__name__} has no primary key: save it before locking it"
            )
        if not self._meta.get("shard_key"):
            return {"_id": self._fields[self._meta["id_field"]].to_mongo(self.pk)}
        query: dict[str, Any] = self._qs.filter(**self._object_key)._query
        return query

    def _lease_taken(self, raw: dict[str, Any], owner: str, ms: int) -> None:
        """Show the document as stored at the grant and remember the lease."""
        self._stop_keepalive()
        self._load_stored(raw)
        self._lockable_held = _Held(owner, int(raw[DOCUMENT_FIELDS.fence]), ms)
        signals.lock_acquired.send(type(self), document=self, owner=owner, fence=self.lock_fence)

    def _stop_keepalive(self) -> None:
        keeper = self._lockable_keepalive
        if keeper is not None:
            self._lockable_keepalive = None
            keeper.stop()

    def _keepalive_renew(self) -> bool:
        """One renewal from the keepalive thread; ``False`` once the lease is lost."""
        held = self._lockable_held
        if held is None:
            return False
        try:
            self.renew()
        except LockNotOwnedError:
            log.warning("lease on %s %r lost (owner %s)", type(self).__name__, self.pk, held.owner)
            signals.lock_lost.send(type(self), document=self, owner=held.owner, fence=held.fence)
            return False
        return True

    def _load_stored(self, raw: dict[str, Any]) -> None:
        """Replace every field by the stored document ``raw`` (as ``reload``)."""
        stored = type(self)._from_son(raw, created=False)  # type: ignore[attr-defined]
        for name in self._fields:
            setattr(self, name, self._reload(name, stored._data.get(name)))
        self._changed_fields = []
        self._created = False

    def _load_lease_fields(self, raw: dict[str, Any]) -> None:
        for name in DOCUMENT_FIELDS.lease:
            self._data[name] = self._fields[name].to_python(raw.get(name))

    def _caller(self, owner: str | None) -> tuple[str, int | None, _Held | None]:
        """Who "this caller" is: ``owner`` if given, else the instance's last
        acquisition. Returns (owner, fence or None, the instance's own lease if
        it is the one meant)."""
        held = self._lockable_held
        if owner is None:
            if held is None:
                raise LockNotOwnedError(
                    f"this {type(self).__name__} instance has not acquired a lease "
                    "(pass owner= to act on a lease acquired elsewhere)",
                    target=self.pk,
                )
            return held.owner, held.fence, held
        if held is not None and held.owner == owner:
            return owner, held.fence, held
        return owner, None, None

    def _not_owned(self, what: str, owner: str) -> LockNotOwnedError:
        return LockNotOwnedError(
            f"cannot {what} {type(self).__name__} {self.pk!r}: "
            f"owner {owner!r} does not hold an unexpired lease on it",
            target=self.pk,
            owner=owner,
        )

    # -- public API -----------------------------------------------------------

    def lock(
        self,
        duration: _args.Duration,
        *,
        wait: _args.Duration | None = 0,
        owner: str | None = None,
        force: bool = False,
        keepalive: bool = False,
    ) -> bool:
        """Take the lease on this document.

        One conditional ``findAndModify`` per attempt (see
        :meth:`LeaseOps.grant`): granted only if the lease is free by the
        server's clock, or always with ``force``.

        :param duration: the lease's length, counted from the grant.
        :param wait: seconds to keep trying while another holder has it
            (``None``: no limit); 0 tries once.
        :param owner: the holder's name; default a fresh random token per call.
        :param force: take the lease even while held; the fence still grows, so
            the previous holder's :meth:`update_if_held` fails.
        :param keepalive: renew the lease from a background thread until
            :meth:`release`; if a renewal finds it lost, ``lock_lost`` fires and
            the following release raises.
        :return: ``True`` if this caller now holds the lease (the instance shows
            the document as stored at that moment), ``False`` if another
            holder's lease stayed unexpired for the whole wait.
        :raises TypeError, ValueError: bad arguments, before any database call.
        :raises UnsavedDocumentError: the document has no primary key.
        :raises DoesNotExist: the document was deleted.
        """
        ms = _args.duration_ms(duration)
        wait_s = _args.wait_seconds(wait)
        token = _args.owner_string(owner) or new_owner()
        force = _args.flag(force, "force")
        keepalive = _args.flag(keepalive, "keepalive")
        match = self._lease_match()
        ops = self._lease_ops()

        def attempt(read: bool) -> tuple[dict[str, Any] | None, float | None]:
            raw = ops.grant(match, token, ms, force=force)
            if raw is not None:
                return raw, None
            if not read:
                return None, ms / 1000
            # Held, or gone? The read also tells how long the holder has left.
            seen = ops.peek(match)
            if seen is None:
                raise self.DoesNotExist(f"{type(self).__name__} {self.pk!r} does not exist")
            return None, time_left(seen, ops.fields)

        raw = retry_until(
            attempt, wait_s, lambda: ops.waker(match["_id"])
        )
        if raw is None:
            return False
        self._lease_taken(raw, token, ms)
        if keepalive:
            self._lockable_keepalive = KeepAlive(self, ms)
        return True

    def release(self, *, owner: str | None = None) -> None:
        """End this caller's lease now; the document is lockable again at once.

        "This caller" is the instance's last acquisition, or ``owner``.
        ``locked_until`` becomes ``None``; ``locked_by`` and ``lock_fence`` stay.

        :raises LockNotOwnedError: the caller does not hold an unexpired lease
            now. A lease of the caller's that expired and that nobody took since
            is cleared before this is raised.
        """
        owner = _args.owner_string(owner)
        token, fence, held = self._caller(owner)
        match = self._lease_match()
        ops = self._lease_ops()
        if held is not None:
            self._stop_keepalive()
        raw = ops.release(match, token, fence, projection=_LEASE_PROJECTION)
        if held is not None:
            self._lockable_held = None
        if raw is None:
            ops.clear_expired(match, token, fence)
            raise self._not_owned("release", token)
        self._load_lease_fields(raw)
        signals.lock_released.send(type(self), document=self, owner=token, fence=self.lock_fence)

    def renew(
        self, duration: _args.Duration | None = None, *, owner: str | None = None
    ) -> None:
        """Extend this caller's unexpired lease to now + ``duration``.

        :param duration: default: the duration this instance acquired it with.
        :raises TypeError: no ``duration`` and this instance did not acquire the
            lease (for ``owner=``), or bad arguments.
        :raises LockNotOwnedError: the lease is not held by the caller, or has
            expired (an expired lease is not revived).
        """
        ms = None if duration is None else _args.duration_ms(duration)
        owner = _args.owner_string(owner)
        token, fence, held = self._caller(owner)
        if ms is None:
            if held is None:
                raise TypeError(
                    "renew() needs a duration for a lease this instance did not acquire"
                )
            ms = held.ms
        match = self._lease_match()
        raw = self._lease_ops().renew(match, token, fence, ms, projection=_LEASE_PROJECTION)
        if raw is None:
            raise self._not_owned("renew", token)
        self._load_lease_fields(raw)
        signals.lock_renewed.send(type(self), document=self, owner=token, fence=self.lock_fence)

    def update_if_held(self, **update: Any) -> None:
        """Apply a MongoEngine-style update (``set__status="done"``,
        ``inc__tries=1``) only while this instance's lease, with its fence, is
        unexpired; the instance then shows the updated document.

        :raises TypeError: no update, or an update naming unknown fields.
        :raises ValueError: the update touches the lease fields, or a value is
            invalid for its field.
        :raises LockNotOwnedError: the lease is not held (expired, released or
            taken over): nothing was written.
        """
        if not update:
            raise TypeError("update_if_held() needs at least one update, e.g. set__status='done'")
        try:
            raw_update: dict[str, Any] = transform.update(type(self), **update)
        except (InvalidQueryError, LookUpError) as exc:
            raise TypeError(f"update_if_held(): {exc}") from None
        except ValidationError as exc:
            raise ValueError(f"update_if_held(): {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"update_if_held(): {self._bad_update_value(update, exc)}") from None
        if not isinstance(raw_update, dict):
            raise TypeError("update_if_held() takes operator updates, not an update pipeline")
        for operator, changes in raw_update.items():
            paths = set(changes)
            if operator == "$rename":  # its values are paths too
                paths |= set(changes.values())
            touched = {str(path).split(".")[0] for path in paths} & _LEASE_FIELDS
            if touched:
                raise ValueError(
                    f"update_if_held() cannot change the lease fields {sorted(touched)}: "
                    "use lock(), renew() or release()"
                )
        held = self._lockable_held
        if held is None:
            raise LockNotOwnedError(
                f"this {type(self).__name__} instance has not acquired a lease", target=self.pk
            )
        raw = self._lease_ops().update_held(self._lease_match(), held.owner, held.fence, raw_update)
        if raw is None:
            raise self._not_owned("update", held.owner)
        self._load_stored(raw)

    def _bad_update_value(self, update: dict[str, Any], exc: Exception) -> str:
        """Name the keyword whose value the field refused."""
        for key, value in update.items():
            try:
                transform.update(type(self), **{key: value})
            except (TypeError, ValueError):
                return f"invalid value {value!r} for {key}: {exc}"
        return str(exc)  # pragma: no cover - only a combination failed

    def is_locked(self) -> bool:
        """Read the database: is an unexpired lease held on this document now?

        :raises DoesNotExist: the document was deleted.
        """
        seen = self._lease_ops().peek(self._lease_match())
        if seen is None:
            raise self.DoesNotExist(f"{type(self).__name__} {self.pk!r} does not exist")
        return bool(seen[HELD])

    @contextmanager
    def locked(
        self,
        duration: _args.Duration,
        *,
        wait: _args.Duration | None = 0,
        owner: str | None = None,
        keepalive: bool = False,
    ) -> Iterator[Any]:
        """Hold the lease for a ``with`` block::

            with job.locked(30, wait=5):
                ...

        Arguments as for :meth:`lock`.

        :raises LockUnavailableError: the lease stayed held by another for the
            whole ``wait``.
        :raises LockNotOwnedError: on exit, if the lease was lost meanwhile
            (chained to the block's own exception, if any).
        """
        if not self.lock(duration, wait=wait, owner=owner, keepalive=keepalive):
            holder = self._holder_now()
            raise LockUnavailableError(
                f"{type(self).__name__} {self.pk!r} {held_by(holder)}",
                target=self.pk,
                owner=holder,
            )
        try:
            yield self
        finally:
            self.release()

    def _holder_now(self) -> str | None:
        """The owner of the unexpired lease now, or ``None``."""
        seen = self._lease_ops().peek(self._lease_match())
        if seen is None or not seen[HELD]:
            return None
        owner: str | None = seen.get(DOCUMENT_FIELDS.owner)
        return owner
