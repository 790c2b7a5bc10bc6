"""The lease handle of a document instance: the document face's part of the
engine, shared by the document methods (:mod:`._mixin`) and the queryset's
claims (:mod:`._queryset`)."""

from __future__ import annotations

import uuid
import weakref
from typing import Any

from bson import ObjectId

from ._engine import Lease, Result
from ._io import SyncIO, checked_write_concern, executor_for
from ._keepalive import BlockingLease
from ._rules import DocumentKind

__all__ = ["KIND", "document_lease", "executor_of"]

KIND = DocumentKind()
#: Primary keys that cannot change in place: a handle made for one still
#: names its record while the document keeps that very object.
_IMMUTABLE_KEYS = frozenset({ObjectId, str, int, bytes, uuid.UUID})


def executor_of(doc_cls: Any, collection: Any | None = None) -> SyncIO:
    """The executor of a document class's leases on ``collection`` (default:
    the class's own), built once per class and collection; the class's
    ``lock_write_concern`` applies."""
    write_concern = checked_write_concern(doc_cls.lock_write_concern, "lock_write_concern")
    own = doc_cls._get_collection()
    collection = own if collection is None else collection
    cached = doc_cls.__dict__.get("_lockable_io")
    if cached is not None and cached[0] is collection and cached[1] is write_concern:
        io: SyncIO = cached[2]
        return io
    io = executor_for(collection, write_concern)
    # A switch_db()/using() collection differs from the class's: only the
    # class's own is worth keeping.
    if collection is own:
        type.__setattr__(doc_cls, "_lockable_io", (collection, write_concern, io))
    return io


def document_lease(doc: Any) -> BlockingLease:
    """The lease handle of a document instance (created on first use).

    The handle refers to its document weakly: a forgotten document can be
    garbage-collected, and its keepalive then stops.
    """
    own = doc.__dict__
    handle: BlockingLease | None = own.get("_lockable_handle")
    # The primary key as the instance holds it (what ``doc.pk`` reads).
    pk = doc._data.get(doc._meta["id_field"])
    if handle is not None and pk is own.get("_lockable_pk") \
            and type(pk) in _IMMUTABLE_KEYS and not doc._meta.get("shard_key"):
        return handle  # the same (immutable) primary key object: the same record
    match = doc._lease_match()
    own["_lockable_pk"] = pk
    if handle is None or handle.lease.match != match:
        cls = type(doc)
        ref = weakref.ref(doc)

        def subject() -> tuple[Any, dict[str, Any]]:
            return cls, {"document": ref()}

        def on_stored(result: Result, whole: bool) -> None:
            document = ref()
            if document is not None and result.doc is not None:
                if whole:
                    document._load_stored(result.doc)
                else:
                    document._load_lease_fields(result.doc)

        lease = Lease(
            KIND,
            match,
            what=f"{cls.__name__} {doc.pk!r}",
            target=doc.pk,
            subject=subject,
            on_stored=on_stored,
            missing=lambda: cls.DoesNotExist(f"{cls.__name__} {doc.pk!r} does not exist"),
        )
        handle = BlockingLease(lease, executor_of(cls))
        doc.__dict__["_lockable_handle"] = handle
    return handle
