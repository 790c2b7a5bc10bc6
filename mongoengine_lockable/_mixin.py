"""``LockableMixin``: a lease on any MongoEngine document."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple

from bson import ObjectId
from mongoengine import fields as _fields
from mongoengine import signals as _me_signals
from mongoengine.base import BaseField
from mongoengine.errors import InvalidQueryError, LookUpError, ValidationError
from mongoengine.fields import DateTimeField, DictField, IntField, ListField, StringField
from mongoengine.queryset import QuerySet, QuerySetManager, transform
from pymongo.write_concern import WriteConcern

from . import _args
from ._document import KIND, document_lease
from ._errors import UnsavedDocumentError
from ._io import DEFAULT_WRITE_CONCERN
from ._keepalive import BlockingLease
from ._queryset import LockableQuerySet
from ._rules import DOCUMENT_LAYOUT, new_owner

__all__ = ["LockableMixin"]

_PROTECTED = KIND.protected()


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


def _qualified(cls: Any) -> str:
    if cls is LockableQuerySet:
        return "LockableQuerySet"
    name = getattr(cls, "__qualname__", repr(cls))
    module = getattr(cls, "__module__", "")
    return name if module in ("", "__main__", "builtins") else f"{module}.{name}"


def _declared_querysets(cls: type) -> list[type]:
    """The queryset classes that the bases of ``cls`` declare: in their
    ``meta`` (MongoEngine's merged ``_meta`` or a plain mixin's ``meta``), or as
    the default of a queryset manager (django-mongoengine's ``objects``)."""
    found: list[type] = []
    for base in cls.__mro__[1:]:
        if base is LockableMixin:
            continue
        for name in ("_meta", "meta"):
            declared = base.__dict__.get(name)
            if isinstance(declared, dict) and isinstance(declared.get("queryset_class"), type):
                found.append(declared["queryset_class"])
        for value in base.__dict__.values():
            default = getattr(value, "default", None)
            if isinstance(value, QuerySetManager) and isinstance(default, type) and \
                    default is not QuerySet:
                found.append(default)
    return found


#: Field classes whose stored value becomes the instance's by ``to_python``
#: alone: no container to bind, no document to build (exact classes only: a
#: subclass may load differently).
_PLAIN_FIELD_CLASSES = frozenset({
    _fields.StringField, _fields.IntField, _fields.LongField, _fields.FloatField,
    _fields.BooleanField, _fields.DateTimeField, _fields.ObjectIdField,
    _fields.DecimalField, _fields.EmailField, _fields.URLField, _fields.UUIDField,
})
#: For field classes whose ``to_python`` returns a value of this type as it
#: is: that type.
_NATIVE: dict[type, type] = {
    _fields.StringField: str, _fields.EmailField: str, _fields.URLField: str,
    _fields.IntField: int, _fields.LongField: int, _fields.FloatField: float,
    _fields.BooleanField: bool, _fields.ObjectIdField: ObjectId,
    _fields.DateTimeField: datetime,
}


class _Fields:
    """How stored values of some fields become an instance's (:meth:`load`)."""

    def __init__(self, fields: list[tuple[str, Any]]) -> None:
        #: Per field: its name, its name in the database, the type of stored
        #: values that load as they are (``None``: none), its ``to_python``
        #: (``None`` where it returns every value as is) and the value of a
        #: missing or null stored value (a callable is called). Plain tuples,
        #: read in one loop: the path of every grant and release.
        self.loaders: tuple[tuple[str, str, Any, Any, Any], ...] = tuple(
            (name, field.db_field, _NATIVE.get(type(field)),
             None if type(field).to_python is BaseField.to_python else field.to_python,
             None if field.null else field.default)
            for name, field in fields)

    def load(self, data: dict[str, Any], raw: dict[str, Any]) -> None:
        """Set ``data`` (an instance's) from the stored document ``raw``, as
        ``reload()`` would: a value of the field's native type as it is, any
        other through the field's ``to_python``, a missing or null one as the
        field's default."""
        get = raw.get
        for name, db_field, native, convert, default in self.loaders:
            value = get(db_field)
            if value is None:
                if default is not None:
                    value = default() if callable(default) else default
            elif convert is not None and type(value) is not native:
                value = convert(value)
            data[name] = value


class _Plain(NamedTuple):
    """How the stored documents of a class load field by field."""

    #: The keys a stored document may have.
    keys: frozenset[str]
    class_name: str
    fields: _Fields


#: What _per_class finds before a value is built (a built one may be None).
_UNBUILT = object()


def _per_class(cls: type, key: str, build: Callable[[type], Any]) -> Any:
    """``build(cls)``, built once and kept in the class itself (a subclass
    builds its own)."""
    value = cls.__dict__.get(key, _UNBUILT)
    if value is _UNBUILT:
        value = build(cls)
        type.__setattr__(cls, key, value)
    return value


def _lease_fields(cls: type) -> _Fields:
    """How the lease's own fields of a class load."""
    lease: _Fields = _per_class(cls, "_lockable_lease_fields", _build_lease_fields)
    return lease


def _build_lease_fields(cls: type) -> _Fields:
    fields: dict[str, Any] = cls._fields  # type: ignore[attr-defined]
    return _Fields([(name, fields[name]) for name in DOCUMENT_LAYOUT.all])


def _plain_fields(cls: type) -> _Plain | None:
    """For a class whose stored documents load field by field, how (the
    lease's own fields load as :meth:`_load_lease_fields` loads them);
    ``None`` for other classes (dynamic documents, fields with containers or
    references, ``pre_init``/``post_init`` receivers, which see the
    throw-away document that a reload builds)."""
    if (_me_signals.pre_init.receivers or _me_signals.post_init.receivers) and (
            _me_signals.pre_init.has_receivers_for(cls)
            or _me_signals.post_init.has_receivers_for(cls)):
        return None
    plain: _Plain | None = _per_class(cls, "_lockable_plain", _build_plain)
    return plain


def _build_plain(cls: type) -> _Plain | None:
    fields: dict[str, Any] = cls._fields  # type: ignore[attr-defined]
    eligible = not cls._dynamic and all(  # type: ignore[attr-defined]
        type(field) in _PLAIN_FIELD_CLASSES or name in DOCUMENT_LAYOUT.all
        for name, field in fields.items())
    return _Plain(
        frozenset([f.db_field for f in fields.values()] + ["_cls"]),
        cls._class_name,  # type: ignore[attr-defined]
        _Fields(list(fields.items())),
    ) if eligible else None


class LockableMixin:
    """Mix into a :class:`mongoengine.Document` to give it a lease::

        class Job(LockableMixin, Document):
            payload = StringField()

    Adds the stored fields ``locked_until`` (indexed; ``None`` when free after
    a release or never locked), ``locked_by`` (owner of the current or last
    lease) and ``lock_fence`` (fencing token, +1 on every acquisition), and
    the bookkeeping fields ``lock_token`` (ticket of the current grant),
    ``lock_stamp`` (id of the last lease change) and ``lock_waiters`` (the
    queue of waiting callers); the lease methods below; and
    :class:`LockableQuerySet` as ``Job.objects``.

    ``lock_write_concern`` (class attribute) is the write concern of lease
    changes, ``majority`` by default.

    :raises TypeError: at class creation, when the document's
        ``queryset_class`` is not a :class:`LockableQuerySet`.
    """

    locked_until = DateTimeField(default=None)
    locked_by = StringField(default=None)
    lock_fence = IntField(default=0)
    lock_token = StringField(default=None)
    lock_stamp = StringField(default=None)
    lock_waiters = ListField(DictField(), default=None)

    meta = _MixinMeta({"indexes": ["locked_until"], "queryset_class": LockableQuerySet})

    lock_write_concern: ClassVar[WriteConcern] = DEFAULT_WRITE_CONCERN

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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        meta = cls.__dict__.get("_meta")
        if not isinstance(meta, dict):
            return
        final = meta.get("queryset_class") or LockableQuerySet
        # Every queryset class the bases ask for (in their meta, or as the
        # default of a framework's manager) must survive in the final one.
        wanted = [LockableQuerySet, *_declared_querysets(cls)]
        lost = [q for q in dict.fromkeys(wanted)
                if not (isinstance(final, type) and issubclass(final, q))]
        if lost:
            others = [q for q in dict.fromkeys([final, *wanted[1:], *lost])
                      if isinstance(q, type) and q not in (LockableQuerySet, QuerySet)]
            names = ", ".join(_qualified(q) for q in others)
            raise TypeError(
                f"{cls.__name__}.objects would be a {_qualified(final)}, "
                f"losing the methods of {', '.join(_qualified(q) for q in lost)} "
                "(LockableQuerySet has claim(), unlocked() and locked()). Combine them: "
                f"class {cls.__name__}QuerySet(LockableQuerySet, {names or '...'}): pass, "
                f"and set meta = {{'queryset_class': {cls.__name__}QuerySet}}"
            )

    # -- plumbing -------------------------------------------------------------

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

    def _load_stored(self, raw: dict[str, Any]) -> None:
        """Replace every field by the stored document ``raw`` (as ``reload``).

        The values go to the instance's data directly (bound to it by
        ``_reload``, as ``reload`` binds them) rather than through each field's
        setter: nothing is marked changed, and the grant's path stays short.
        A class of plain scalar fields loads each value by its field's
        ``to_python`` alone, as building a throw-away document would.
        """
        plain = _plain_fields(type(self))
        if plain is not None and raw.keys() <= plain.keys \
                and raw.get("_cls", plain.class_name) == plain.class_name:
            plain.fields.load(self._data, raw)
        else:
            stored = type(self)._from_son(raw, created=False)  # type: ignore[attr-defined]
            data = self._data
            for name in self._fields:
                data[name] = self._reload(name, stored._data.get(name))
            for name, value in stored._data.items():
                if name not in self._fields:  # a DynamicDocument's dynamic fields
                    setattr(self, name, value)
        if self._changed_fields != []:
            self._changed_fields = []
        if self._created is not False:
            self._created = False

    def _load_lease_fields(self, raw: dict[str, Any]) -> None:
        _lease_fields(type(self)).load(self._data, raw)

    def _refuse_unsaved_changes(self, what: str) -> None:
        if not self._changed_fields:
            return
        changed = sorted({str(f).split(".")[0] for f in self._changed_fields or ()})
        if changed:
            raise ValueError(
                f"{type(self).__name__} {self.pk!r} has unsaved changes to {changed}: "
                f"{what} would replace them with the document as stored; save() or "
                "reload() it first"
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

        One ``findAndModify`` per attempt, decided by the server's clock:
        granted only if the lease is free and nobody is queued for it, or always
        with ``force``. Waiting callers queue in the document and are served
        first come, first served: a release hands the lease to the longest
        waiting one in the same write.

        :param duration: the lease's length, counted from the grant.
        :param wait: seconds to wait for the lease (``None``: no limit); 0 tries
            once.
        :param owner: the holder's name; default a fresh random token per call.
        :param force: take the lease even while held; the fence still grows, so
            the previous holder's :meth:`update_if_held` fails.
        :param keepalive: renew the lease from a background thread until
            :meth:`release`; if it is lost anyway, ``lock_lost`` fires and the
            following release raises.
        :return: ``True`` if this caller now holds the lease (the instance shows
            the document as stored at that moment), ``False`` if it was still
            held (or others were queued) for the whole wait.
        :raises TypeError, ValueError: bad arguments, before any database call;
            ``ValueError`` also when the instance has unsaved changes, which the
            stored document would replace.
        :raises UnsavedDocumentError: the document has no primary key.
        :raises DoesNotExist: the document was deleted.
        """
        ms = _args.duration_ms(duration)
        wait_s = _args.wait_seconds(wait)
        token = _args.owner_string(owner) or new_owner()
        force = _args.flag(force, "force")
        keepalive = _args.flag(keepalive, "keepalive")
        handle = document_lease(self)
        self._refuse_unsaved_changes("lock()")
        result = handle.acquire(token, ms, wait=wait_s, force=force, keepalive=keepalive)
        return result is not None

    def release(self, *, owner: str | None = None) -> None:
        """End this caller's lease now; the document is lockable again at once
        (or passes to the longest waiting caller in the same write).

        "This caller" is the instance's last acquisition, or ``owner``.
        ``locked_until`` becomes ``None``; ``locked_by`` and ``lock_fence`` stay
        (unless a waiter gets the lease in the same write: the record then
        shows that waiter's owner, next fence and end).

        :raises LockNotOwnedError: the caller does not hold an unexpired lease
            now. A lease of the caller's that expired and that nobody took since
            is cleared before this is raised.
        """
        owner = _args.owner_string(owner)
        document_lease(self).release(owner)

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
        document_lease(self).renew(ms, owner)

    def update_if_held(self, **update: Any) -> None:
        """Apply a MongoEngine-style update (``set__status="done"``,
        ``inc__tries=1``) only while this instance's lease, with its fence, is
        unexpired; the instance then shows the document as stored after it.

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
            touched = {str(path).split(".")[0] for path in paths} & _PROTECTED
            if touched:
                raise ValueError(
                    f"update_if_held() cannot change the lease fields {sorted(touched)}: "
                    "use lock(), renew() or release()"
                )
        handle = document_lease(self)
        self._refuse_unsaved_changes("update_if_held()")
        handle.update(raw_update)

    def _bad_update_value(self, update: dict[str, Any], exc: Exception) -> str:
        """Name the keyword whose value the field refused."""
        for key, value in update.items():
            try:
                transform.update(type(self), **{key: value})
            except (TypeError, ValueError):
                return f"invalid value {value!r} for {key}: {exc}"
        return str(exc)  # pragma: no cover - only a combination failed

    def is_locked(self) -> bool:
        """Read the database: is an unexpired lease held on this document now
        (by anyone)?

        :raises DoesNotExist: the document was deleted.
        """
        view = document_lease(self).look()
        if not view.exists:
            raise self.DoesNotExist(f"{type(self).__name__} {self.pk!r} does not exist")
        return view.held

    def owns_lock(self, *, owner: str | None = None) -> bool:
        """Read the primary: does the caller (this instance's last acquisition
        with its fence, or ``owner``) hold an unexpired lease now?"""
        owner = _args.owner_string(owner)
        return document_lease(self).owned(owner)

    def lease_remaining(self) -> float:
        """Seconds the caller may still count on its lease, with no I/O.

        The granted duration minus the time since the successful attempt was
        sent (so never more than the server granted), extended by each
        renewal; ``0.0`` when not held (never acquired, released, expired by
        this count, or known to be lost).
        """
        handle: BlockingLease | None = self.__dict__.get("_lockable_handle")
        return 0.0 if handle is None else handle.remaining()

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
            raise document_lease(self).lease.unavailable()
        try:
            yield self
        finally:
            self.release()

