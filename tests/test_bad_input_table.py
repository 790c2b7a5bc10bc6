"""One table of bad inputs across every public entry point.

Each case is a call, the exact exception type it must raise and a pattern its
message must match (naming the argument at fault). Every case runs on both
backends against the same set-up (a saved document, an instance of it holding
its lease, an acquired named lock), and the whole test database (collection
names, indexes and documents) must be the same afterwards: bad input writes
nothing. The held lease and the named lock must still be released normally:
a rejected call leaves the instances as they were.

``tests/test_bad_input.py`` goes deep on durations, waits and owners of the
document methods (and checks that no command is even sent); this table goes
wide: named locks, semaphores, read/write locks, ``exclusive``,
``update_if_held`` and ``claim`` included.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta
from typing import Any, Callable, NamedTuple

import pytest
from mongoengine.connection import ConnectionFailure
from pymongo.write_concern import WriteConcern

from mongoengine_lockable import (
    NamedLock,
    NamedSemaphore,
    ReadWriteLock,
    UnsavedDocumentError,
    exclusive,
)

from models import Item, UnacknowledgedItem


class Ctx(NamedTuple):
    """What a case can call: ``doc`` (saved, not locked by this instance),
    ``held`` (another instance of it, holding its lease as owner "holder"),
    ``named`` (a NamedLock, acquired), ``w0`` (a saved UnacknowledgedItem)."""

    doc: Item
    held: Item
    named: NamedLock
    w0: UnacknowledgedItem


def _enter(cm: Any) -> None:
    with cm:
        pass  # pragma: no cover - entering must fail


class Case(NamedTuple):
    id: str
    call: Callable[[Ctx], Any]
    exc: type[BaseException]
    message: str  # a regex searched for in str(exception)


NAME = "the-lock"  # the acquired named lock's name

CASES = [
    # -- LockableMixin.lock ---------------------------------------------------------
    Case("lock-duration-str", lambda c: c.doc.lock("30"), TypeError, r"\bduration\b"),
    Case("lock-duration-nan", lambda c: c.doc.lock(math.nan), ValueError, r"\bduration\b"),
    Case("lock-duration-negative-timedelta",
         lambda c: c.doc.lock(timedelta(seconds=-1)), ValueError, r"\bduration\b"),
    Case("lock-wait-negative", lambda c: c.doc.lock(30, wait=-1), ValueError, r"\bwait\b"),
    Case("lock-owner-empty", lambda c: c.doc.lock(30, owner=""), ValueError, r"\bowner\b"),
    Case("lock-force-int", lambda c: c.doc.lock(30, force=1), TypeError, r"\bforce\b"),
    Case("lock-keepalive-str",
         lambda c: c.doc.lock(30, keepalive="yes"), TypeError, r"\bkeepalive\b"),
    # The class's lock_write_concern is unacknowledged: lock() cannot know
    # whether it won (on a real server it reports False and the lease is taken).
    Case("lock-class-write_concern-unacknowledged",
         lambda c: c.w0.lock(30), ValueError, r"\block_write_concern\b"),
    Case("lock-unsaved-document",
         lambda c: Item(name="never saved").lock(30), UnsavedDocumentError, r"save"),
    # -- LockableMixin.locked ---------------------------------------------------------
    Case("locked-duration-inf", lambda c: _enter(c.doc.locked(math.inf)),
         ValueError, r"\bduration\b"),
    Case("locked-wait-str", lambda c: _enter(c.doc.locked(30, wait="5")), TypeError, r"\bwait\b"),
    Case("locked-owner-int", lambda c: _enter(c.doc.locked(30, owner=7)), TypeError, r"\bowner\b"),
    Case("locked-keepalive-none", lambda c: _enter(c.doc.locked(30, keepalive=None)),
         TypeError, r"\bkeepalive\b"),
    # -- LockableMixin.renew ----------------------------------------------------------
    Case("renew-duration-zero", lambda c: c.held.renew(0), ValueError, r"\bduration\b"),
    Case("renew-duration-1e300", lambda c: c.held.renew(1e300), ValueError, r"\bduration\b"),
    Case("renew-duration-bool", lambda c: c.held.renew(True), TypeError, r"\bduration\b"),
    Case("renew-owner-int", lambda c: c.held.renew(30, owner=7), TypeError, r"\bowner\b"),
    Case("renew-foreign-owner-without-duration",
         lambda c: c.doc.renew(owner="holder"), TypeError, r"\bduration\b"),
    # -- LockableMixin.release ----------------------------------------------------------
    Case("release-owner-empty", lambda c: c.held.release(owner=""), ValueError, r"\bowner\b"),
    Case("release-owner-bytes",
         lambda c: c.held.release(owner=b"holder"), TypeError, r"\bowner\b"),
    Case("release-positional-owner",
         lambda c: c.held.release("holder"), TypeError, r"release\(\)"),
    # -- LockableMixin.update_if_held -----------------------------------------------------
    Case("update-no-update", lambda c: c.held.update_if_held(), TypeError, r"\bupdate\b"),
    Case("update-unknown-field",
         lambda c: c.held.update_if_held(set__nope=1), TypeError, r"\bnope\b"),
    Case("update-unknown-operator",
         lambda c: c.held.update_if_held(frobnicate__tries=1), TypeError, r"\bfrobnicate\b"),
    Case("update-unknown-subfield",
         lambda c: c.held.update_if_held(set__tries__deep=1), TypeError, r"\bdeep\b"),
    Case("update-set-locked_until",
         lambda c: c.held.update_if_held(set__locked_until=datetime(2100, 1, 1)),
         ValueError, r"\blocked_until\b"),
    Case("update-unset-locked_until",
         lambda c: c.held.update_if_held(unset__locked_until=True),
         ValueError, r"\blocked_until\b"),
    Case("update-set-locked_by",
         lambda c: c.held.update_if_held(set__locked_by="thief"), ValueError, r"\blocked_by\b"),
    Case("update-inc-lock_fence",
         lambda c: c.held.update_if_held(inc__lock_fence=1), ValueError, r"\block_fence\b"),
    Case("update-lease-field-among-valid-ones",
         lambda c: c.held.update_if_held(inc__tries=1, set__locked_by="thief"),
         ValueError, r"\blocked_by\b"),
    Case("update-string-field-given-int",
         lambda c: c.held.update_if_held(set__status=5), ValueError, r"StringField|\bstatus\b"),
    Case("update-int-field-given-non-number",
         lambda c: c.held.update_if_held(set__tries="abc"), ValueError, r"\bset__tries\b"),
    Case("update-inc-int-field-by-non-number",
         lambda c: c.held.update_if_held(inc__tries="x"), ValueError, r"\binc__tries\b"),
    Case("update-set-pk-invalid",
         lambda c: c.held.update_if_held(set__id=5), ValueError, r"ObjectId"),
    # -- LockableQuerySet.claim ------------------------------------------------------------
    Case("claim-duration-none", lambda c: Item.objects.claim(None), TypeError, r"\bduration\b"),
    Case("claim-duration-negative",
         lambda c: Item.objects.claim(-5), ValueError, r"\bduration\b"),
    Case("claim-duration-missing", lambda c: Item.objects.claim(), TypeError, r"\bduration\b"),
    Case("claim-filtered-duration-str",
         lambda c: Item.objects(status="new").claim("60"), TypeError, r"\bduration\b"),
    Case("claim-ordered-duration-timedelta-max",
         lambda c: Item.objects.order_by("-tries").claim(timedelta.max),
         ValueError, r"\bduration\b"),
    Case("claim-owner-int", lambda c: Item.objects.claim(30, owner=3), TypeError, r"\bowner\b"),
    Case("claim-owner-empty",
         lambda c: Item.objects(name="x").claim(30, owner=""), ValueError, r"\bowner\b"),
    # -- NamedLock(...) ---------------------------------------------------------------------
    Case("named-name-int", lambda c: NamedLock(5), TypeError, r"\bname\b"),
    Case("named-name-none", lambda c: NamedLock(None), TypeError, r"\bname\b"),
    Case("named-name-empty", lambda c: NamedLock(""), ValueError, r"\bname\b"),
    Case("named-name-too-long", lambda c: NamedLock("x" * 1001), ValueError, r"\bname\b"),
    Case("named-name-bytes", lambda c: NamedLock(b"job"), TypeError, r"\bname\b"),
    Case("named-duration-str", lambda c: NamedLock("n", "60"), TypeError, r"\bduration\b"),
    Case("named-duration-zero", lambda c: NamedLock("n", 0), ValueError, r"\bduration\b"),
    Case("named-duration-timedelta-max",
         lambda c: NamedLock("n", timedelta.max), ValueError, r"\bduration\b"),
    Case("named-owner-empty", lambda c: NamedLock("n", owner=""), ValueError, r"\bowner\b"),
    Case("named-owner-int", lambda c: NamedLock("n", owner=3), TypeError, r"\bowner\b"),
    Case("named-wait-negative", lambda c: NamedLock("n", wait=-0.5), ValueError, r"\bwait\b"),
    Case("named-wait-str", lambda c: NamedLock("n", wait="1"), TypeError, r"\bwait\b"),
    Case("named-keepalive-int", lambda c: NamedLock("n", keepalive=1), TypeError, r"\bkeepalive\b"),
    Case("named-min_hold-negative",
         lambda c: NamedLock("n", min_hold=-1), ValueError, r"\bmin_hold\b"),
    Case("named-min_hold-none",
         lambda c: NamedLock("n", min_hold=None), TypeError, r"\bmin_hold\b"),
    Case("named-min_hold-nan",
         lambda c: NamedLock("n", min_hold=math.nan), ValueError, r"\bmin_hold\b"),
    Case("named-min_hold-over-duration",
         lambda c: NamedLock("n", 60, min_hold=61), ValueError, r"\bmin_hold\b"),
    Case("named-alias-empty", lambda c: NamedLock("n", alias=""), ValueError, r"\balias\b"),
    Case("named-alias-none", lambda c: NamedLock("n", alias=None), TypeError, r"\balias\b"),
    Case("named-collection-empty",
         lambda c: NamedLock("n", collection=""), ValueError, r"\bcollection\b"),
    Case("named-collection-dollar",
         lambda c: NamedLock("n", collection="locks$x"), ValueError, r"\bcollection\b"),
    Case("named-collection-system",
         lambda c: NamedLock("n", collection="system.locks"), ValueError, r"\bcollection\b"),
    Case("named-collection-int",
         lambda c: NamedLock("n", collection=5), TypeError, r"\bcollection\b"),
    Case("named-write_concern-str",
         lambda c: NamedLock("n", write_concern="majority"), TypeError, r"\bwrite_concern\b"),
    Case("named-write_concern-dict",
         lambda c: NamedLock("n", write_concern={"w": 1}), TypeError, r"\bwrite_concern\b"),
    # An unacknowledged write concern cannot work: findAndModify then returns
    # nothing, so a won acquisition would read as lost (the lock stays taken).
    Case("named-write_concern-unacknowledged",
         lambda c: NamedLock("n", write_concern=WriteConcern(w=0)),
         ValueError, r"\bwrite_concern\b"),
    # -- NamedLock.acquire / renew -----------------------------------------------------------
    Case("acquire-wait-negative",
         lambda c: NamedLock("other").acquire(wait=-1), ValueError, r"\bwait\b"),
    Case("acquire-wait-str",
         lambda c: NamedLock("other").acquire(wait="soon"), TypeError, r"\bwait\b"),
    Case("acquire-wait-nan",
         lambda c: NamedLock("other").acquire(wait=math.nan), ValueError, r"\bwait\b"),
    Case("acquire-held-wait-inf",
         lambda c: c.named.acquire(wait=math.inf), ValueError, r"\bwait\b"),
    Case("acquire-unknown-alias",
         lambda c: NamedLock("other", alias="no-such-alias").acquire(),
         ConnectionFailure, r"no-such-alias"),
    Case("named-renew-zero", lambda c: c.named.renew(0), ValueError, r"\bduration\b"),
    Case("named-renew-str", lambda c: c.named.renew("5"), TypeError, r"\bduration\b"),
    Case("named-renew-bool", lambda c: c.named.renew(True), TypeError, r"\bduration\b"),
    # -- NamedLock.owner_of / is_free -----------------------------------------------------------
    Case("owner_of-name-int", lambda c: NamedLock.owner_of(5), TypeError, r"\bname\b"),
    Case("owner_of-name-empty", lambda c: NamedLock.owner_of(""), ValueError, r"\bname\b"),
    Case("owner_of-alias-empty",
         lambda c: NamedLock.owner_of(NAME, alias=""), ValueError, r"\balias\b"),
    Case("owner_of-collection-dollar",
         lambda c: NamedLock.owner_of(NAME, collection="$x"), ValueError, r"\bcollection\b"),
    Case("is_free-name-none", lambda c: NamedLock.is_free(None), TypeError, r"\bname\b"),
    Case("is_free-name-too-long",
         lambda c: NamedLock.is_free("y" * 1001), ValueError, r"\bname\b"),
    Case("is_free-alias-int", lambda c: NamedLock.is_free(NAME, alias=1), TypeError, r"\balias\b"),
    Case("is_free-collection-none",
         lambda c: NamedLock.is_free(NAME, collection=None), TypeError, r"\bcollection\b"),
    # -- @exclusive(...), at decoration -----------------------------------------------------------
    Case("exclusive-name-empty", lambda c: exclusive("", 60), ValueError, r"\bname\b"),
    Case("exclusive-name-none", lambda c: exclusive(None, 60), TypeError, r"\bname\b"),
    Case("exclusive-duration-missing", lambda c: exclusive("job"), TypeError, r"\bduration\b"),
    Case("exclusive-duration-zero", lambda c: exclusive("job", 0), ValueError, r"\bduration\b"),
    Case("exclusive-duration-str", lambda c: exclusive("job", "60"), TypeError, r"\bduration\b"),
    Case("exclusive-wait-negative",
         lambda c: exclusive("job", 60, wait=-1), ValueError, r"\bwait\b"),
    Case("exclusive-min_hold-over-duration",
         lambda c: exclusive("job", 60, min_hold=120), ValueError, r"\bmin_hold\b"),
    Case("exclusive-keepalive-str",
         lambda c: exclusive("job", 60, keepalive="y"), TypeError, r"\bkeepalive\b"),
    Case("exclusive-alias-int", lambda c: exclusive("job", 60, alias=1), TypeError, r"\balias\b"),
    Case("exclusive-collection-empty",
         lambda c: exclusive("job", 60, collection=""), ValueError, r"\bcollection\b"),
    Case("exclusive-positional-wait",
         lambda c: exclusive("job", 60, 5), TypeError, r"exclusive\(\)"),
    # -- values that pass a type check but cannot be stored ----------------------------------
    Case("lock-owner-lone-surrogate",
         lambda c: c.doc.lock(30, owner="w\ud800"), ValueError, r"\bowner\b"),
    Case("lock-owner-too-long",
         lambda c: c.doc.lock(30, owner="o" * 1001), ValueError, r"\bowner\b"),
    Case("release-owner-too-long",
         lambda c: c.held.release(owner="o" * 1001), ValueError, r"\bowner\b"),
    Case("renew-owner-lone-surrogate",
         lambda c: c.held.renew(30, owner="\udfff"), ValueError, r"\bowner\b"),
    Case("claim-owner-lone-surrogate",
         lambda c: Item.objects.claim(30, owner="\ud800x"), ValueError, r"\bowner\b"),
    Case("claim-owner-too-long",
         lambda c: Item.objects.claim(30, owner="o" * 1001), ValueError, r"\bowner\b"),
    Case("owns_lock-owner-too-long",
         lambda c: c.doc.owns_lock(owner="o" * 1001), ValueError, r"\bowner\b"),
    Case("named-owner-lone-surrogate",
         lambda c: NamedLock("n", owner="\ud800"), ValueError, r"\bowner\b"),
    Case("named-owner-too-long", lambda c: NamedLock("n", owner="o" * 1001), ValueError,
         r"\bowner\b"),
    Case("named-name-lone-surrogate", lambda c: NamedLock("\ud800"), ValueError, r"\bname\b"),
    Case("named-collection-too-long",
         lambda c: NamedLock("n", collection="c" * 300), ValueError, r"\bcollection\b"),
    Case("named-collection-leading-dot",
         lambda c: NamedLock("n", collection=".locks"), ValueError, r"\bcollection\b"),
    Case("named-collection-nul",
         lambda c: NamedLock("n", collection="lo\0cks"), ValueError, r"\bcollection\b"),
    Case("named-collection-lone-surrogate",
         lambda c: NamedLock("n", collection="lo\ud800"), ValueError, r"\bcollection\b"),
    Case("owner_of-collection-too-long",
         lambda c: NamedLock.owner_of(NAME, collection="c" * 300), ValueError,
         r"\bcollection\b"),
    Case("exclusive-collection-too-long",
         lambda c: exclusive("job", 60, collection="c" * 300), ValueError, r"\bcollection\b"),
    # -- @exclusive: name templates and coroutine functions ---------------------------------------
    Case("exclusive-template-unknown-field",
         lambda c: exclusive("report:{day}", 60)(lambda date: None), ValueError, r"\{day\}"),
    Case("exclusive-template-attribute-of-unknown-field",
         lambda c: exclusive("r:{nope.attr}", 60)(lambda day: None), ValueError, r"nope"),
    Case("exclusive-template-positional-field",
         lambda c: exclusive("r:{0}", 60)(lambda day: None), ValueError, r"\{0\}"),
    Case("exclusive-name-bytes", lambda c: exclusive(b"job", 60), TypeError, r"\bname\b"),
    Case("exclusive-coroutine-function-template-unknown-field",
         lambda c: exclusive("job:{nope}", 60)(_coroutine_function), ValueError, r"\{nope\}"),
    Case("exclusive-callable-returns-empty",
         lambda c: exclusive(lambda: "", 60)(lambda: None)(), ValueError, r"\bname\b"),
    # -- NamedSemaphore(...) and its methods -------------------------------------------------------
    Case("semaphore-name-int", lambda c: NamedSemaphore(5, 2), TypeError, r"\bname\b"),
    Case("semaphore-name-too-long",
         lambda c: NamedSemaphore("s" * 1001, 2), ValueError, r"\bname\b"),
    Case("semaphore-limit-missing", lambda c: NamedSemaphore("s"), TypeError, r"\blimit\b"),
    Case("semaphore-limit-bool", lambda c: NamedSemaphore("s", True), TypeError, r"\blimit\b"),
    Case("semaphore-limit-float", lambda c: NamedSemaphore("s", 2.0), TypeError, r"\blimit\b"),
    Case("semaphore-limit-str", lambda c: NamedSemaphore("s", "2"), TypeError, r"\blimit\b"),
    Case("semaphore-limit-zero", lambda c: NamedSemaphore(NAME, 0), ValueError, r"\blimit\b"),
    Case("semaphore-limit-too-large",
         lambda c: NamedSemaphore("s", 2**63), ValueError, r"\blimit\b"),
    Case("semaphore-duration-zero",
         lambda c: NamedSemaphore("s", 2, 0), ValueError, r"\bduration\b"),
    Case("semaphore-duration-str",
         lambda c: NamedSemaphore("s", 2, "60"), TypeError, r"\bduration\b"),
    Case("semaphore-owner-empty",
         lambda c: NamedSemaphore("s", 2, owner=""), ValueError, r"\bowner\b"),
    Case("semaphore-wait-negative",
         lambda c: NamedSemaphore("s", 2, wait=-1), ValueError, r"\bwait\b"),
    Case("semaphore-keepalive-int",
         lambda c: NamedSemaphore("s", 2, keepalive=1), TypeError, r"\bkeepalive\b"),
    Case("semaphore-alias-none",
         lambda c: NamedSemaphore("s", 2, alias=None), TypeError, r"\balias\b"),
    Case("semaphore-collection-dollar",
         lambda c: NamedSemaphore("s", 2, collection="a$b"), ValueError, r"\bcollection\b"),
    Case("semaphore-write_concern-unacknowledged",
         lambda c: NamedSemaphore("s", 2, write_concern=WriteConcern(w=0)),
         ValueError, r"\bwrite_concern\b"),
    Case("semaphore-acquire-wait-str",
         lambda c: NamedSemaphore("s", 2).acquire(wait="1"), TypeError, r"\bwait\b"),
    Case("semaphore-renew-duration-nan",
         lambda c: NamedSemaphore("s", 2).renew(math.nan), ValueError, r"\bduration\b"),
    Case("holders-name-none", lambda c: NamedSemaphore.holders(None), TypeError, r"\bname\b"),
    Case("holders-alias-int",
         lambda c: NamedSemaphore.holders("s", alias=1), TypeError, r"\balias\b"),
    Case("holders-collection-empty",
         lambda c: NamedSemaphore.holders("s", collection=""), ValueError, r"\bcollection\b"),
    # -- ReadWriteLock(...), reader(), writer() ----------------------------------------------
    Case("rwlock-name-empty", lambda c: ReadWriteLock(""), ValueError, r"\bname\b"),
    Case("rwlock-duration-str", lambda c: ReadWriteLock("rw", "60"), TypeError, r"\bduration\b"),
    Case("rwlock-wait-negative",
         lambda c: ReadWriteLock("rw", wait=-2), ValueError, r"\bwait\b"),
    Case("rwlock-keepalive-str",
         lambda c: ReadWriteLock("rw", keepalive="y"), TypeError, r"\bkeepalive\b"),
    Case("rwlock-alias-empty", lambda c: ReadWriteLock("rw", alias=""), ValueError, r"\balias\b"),
    Case("rwlock-collection-system",
         lambda c: ReadWriteLock("rw", collection="system.x"), ValueError, r"\bcollection\b"),
    Case("rwlock-write_concern-str",
         lambda c: ReadWriteLock("rw", write_concern="majority"), TypeError,
         r"\bwrite_concern\b"),
    Case("rwlock-owner-not-an-argument",
         lambda c: ReadWriteLock("rw", owner="me"), TypeError, r"\bowner\b"),
    Case("rwlock-reader-owner-empty",
         lambda c: ReadWriteLock("rw").reader(owner=""), ValueError, r"\bowner\b"),
    Case("rwlock-writer-owner-int",
         lambda c: ReadWriteLock("rw").writer(owner=1), TypeError, r"\bowner\b"),
    Case("rwlock-reader-positional-owner",
         lambda c: ReadWriteLock("rw").reader("me"), TypeError, r"reader\(\)"),
    Case("rwlock-writer-acquire-wait-inf",
         lambda c: ReadWriteLock("rw").writer().acquire(wait=math.inf), ValueError, r"\bwait\b"),
]


async def _coroutine_function() -> None:  # pragma: no cover - never awaited
    pass


# -- the database, whole ---------------------------------------------------------------------


def snapshot(db: Any) -> dict[str, Any]:
    """Every collection of ``db``: its indexes and its documents."""
    state = {}
    for name in sorted(db.list_collection_names()):
        coll = db[name]
        docs = sorted(coll.find(), key=lambda d: repr(d.get("_id")))
        indexes = {
            index_name: (info.get("key"), info.get("expireAfterSeconds"), info.get("unique"))
            for index_name, info in coll.index_information().items()
        }
        state[name] = {"documents": docs, "indexes": indexes}
    return state


@pytest.fixture
def ctx(lockable_db):
    doc = Item(name="item").save()
    held = Item.objects.get(pk=doc.pk)
    assert held.lock(60, owner="holder") is True
    named = NamedLock(NAME, 60, owner="named-holder")
    assert named.acquire() is True
    w0 = UnacknowledgedItem(name="w0").save()
    return Ctx(doc=doc, held=held, named=named, w0=w0)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_is_rejected_and_writes_nothing(lockable_db, ctx, case):
    before = snapshot(lockable_db.database)
    with pytest.raises(BaseException) as info:
        case.call(ctx)
    assert type(info.value) is case.exc, f"{type(info.value).__name__}: {info.value}"
    assert re.search(case.message, str(info.value)), (
        f"the message does not name the argument ({case.message!r}): {info.value}"
    )
    assert snapshot(lockable_db.database) == before
    # The instances are untouched: their lease and lock are still theirs.
    ctx.held.release()
    ctx.named.release()
    assert NamedLock.is_free(NAME)


def test_the_table_covers_every_entry_point():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) >= 30
    prefixes = ("lock-", "locked-", "renew-", "release-", "update-", "claim-", "named-",
                "acquire-", "named-renew-", "owner_of-", "is_free-", "exclusive-",
                "semaphore-", "holders-", "rwlock-")
    for prefix in prefixes:
        assert sum(i.startswith(prefix) for i in ids) >= 3, prefix
    for argument in ("name", "duration", "owner", "wait", "keepalive", "min_hold", "alias",
                     "collection", "write_concern"):
        assert any(i.startswith(f"named-{argument}-") for i in ids), argument
    for argument in ("name", "duration", "wait", "min_hold", "keepalive", "alias", "collection",
                     "template"):
        assert any(i.startswith(f"exclusive-{argument}-") for i in ids), argument
    for argument in ("name", "limit", "duration", "owner", "wait", "keepalive", "alias",
                     "collection", "write_concern"):
        assert any(i.startswith(f"semaphore-{argument}-") for i in ids), argument
    for argument in ("name", "duration", "wait", "keepalive", "alias", "collection",
                     "write_concern"):
        assert any(i.startswith(f"rwlock-{argument}-") for i in ids), argument
    for field in ("locked_until", "locked_by", "lock_fence"):
        assert any(field in i for i in ids if i.startswith("update-")), field
