"""The lease of one document: ``lock``, ``release``, ``renew``, ``update_if_held``,
``is_locked`` and ``locked()``, on mongomock and on a real server."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import mongoengine
import pytest
from bson import ObjectId

from mongoengine_lockable import (
    LockError,
    LockNotOwnedError,
    LockUnavailableError,
    UnsavedDocumentError,
)
from mongoengine_lockable._mixin import _NATIVE
from mongoengine_lockable._rules import DOCUMENT_LAYOUT
from mongoengine_lockable.signals import lock_acquired, lock_released, lock_renewed

from models import (
    CustomQSJob,
    EmailTask,
    Job,
    KeyedJob,
    MixedFields,
    PendingQuerySet,
    PlainFields,
    Task,
    TenantJob,
    W1Job,
    raw,
)

pytestmark = pytest.mark.usefixtures("lockable_db")

SHORT = 0.2  # a lease that expires during the test
PAST_SHORT = 0.35  # sleep this long to be sure it has


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def fresh(doc: Job) -> Job:
    """Another instance of the same stored document (another "process")."""
    return type(doc).objects.get(pk=doc.pk)


@pytest.fixture
def job() -> Job:
    return Job(payload="p", status="pending").save()


# -- lock ----------------------------------------------------------------------


def test_lock_free_document(job):
    before = utcnow()
    assert job.lock(30) is True
    assert job.locked_by  # a fresh token
    assert job.lock_fence == 1
    assert job.locked_until is not None
    assert before + timedelta(seconds=25) < job.locked_until < utcnow() + timedelta(seconds=35)
    stored = raw(job)
    assert stored["locked_by"] == job.locked_by
    assert stored["lock_fence"] == 1
    assert stored["locked_until"] == job.locked_until


def test_new_document_is_free_with_fence_zero(job):
    assert job.locked_until is None
    assert job.lock_fence == 0
    assert job.is_locked() is False
    stored = raw(job)
    assert stored.get("locked_until") is None
    assert stored.get("lock_fence", 0) == 0


def test_lock_accepts_timedelta(job):
    assert job.lock(timedelta(minutes=2)) is True
    assert job.locked_until > utcnow() + timedelta(seconds=100)


def test_lock_held_by_other_returns_false_and_changes_nothing(job):
    assert job.lock(30, owner="holder") is True
    before = raw(job)
    other = fresh(job)
    assert other.lock(30, owner="intruder") is False
    assert raw(job) == before
    assert other.locked_by == "holder"  # the instance was not refreshed either


def test_not_reentrant_same_owner_same_instance(job):
    assert job.lock(30, owner="me") is True
    assert job.lock(30, owner="me") is False
    assert raw(job)["lock_fence"] == 1


def test_not_reentrant_same_owner_other_instance(job):
    assert job.lock(30, owner="me") is True
    assert fresh(job).lock(30, owner="me") is False
    assert raw(job)["lock_fence"] == 1


def test_not_reentrant_default_owner(job):
    assert job.lock(30) is True
    assert job.lock(30) is False


def test_default_owner_is_a_fresh_token_per_acquisition(job):
    tokens = set()
    for _ in range(3):
        assert job.lock(30) is True
        assert isinstance(job.locked_by, str) and job.locked_by
        tokens.add(job.locked_by)
        job.release()
    assert len(tokens) == 3


def test_owner_is_stored(job):
    assert job.lock(30, owner="worker-1") is True
    assert job.locked_by == "worker-1"
    assert raw(job)["locked_by"] == "worker-1"


def test_owner_starting_with_dollar_is_stored_literally(job):
    assert job.lock(30, owner="$payload") is True
    assert raw(job)["locked_by"] == "$payload"
    job.release(owner="$payload")
    assert raw(job)["locked_until"] is None


def test_lock_refreshes_every_field_from_the_database(job):
    Job._get_collection().update_one(
        {"_id": job.pk}, {"$set": {"payload": "changed behind", "tries": 7}}
    )
    assert job.lock(30) is True
    assert job.payload == "changed behind"
    assert job.tries == 7
    assert job.status == "pending"  # as stored
    assert job._get_changed_fields() == []


STORED_VARIANTS = [
    # Every field stored.
    {"name": "n", "count": 5, "ratio": 0.5, "price": "1.239", "when": datetime(2026, 1, 2, 3, 4, 5),
     "flag": False, "ref": ObjectId()},
    # Values of another type than the field's own, which load converted.
    {"count": 5.0, "ratio": 2, "flag": 1, "name": "n"},
    # Fields missing from the stored document, or stored as null: defaults
    # apply where the field has one, as a reload applies them.
    {"name": None, "ratio": None},
    {},
]


@pytest.mark.usefixtures("lockable_db")
@pytest.mark.parametrize("stored", STORED_VARIANTS)
@pytest.mark.parametrize("cls", [PlainFields, MixedFields])
def test_a_grant_loads_the_document_as_reload_does(cls, stored):
    doc = cls().save()
    names = set(cls._fields) - {"id"}
    fields = {k: v for k, v in stored.items() if k in names}
    if cls is MixedFields:
        fields = {"name": stored.get("name", "x"), "tags": ["a", "b"], "extra": {"k": [1]}}
    coll = cls._get_collection()
    plain = names - set(DOCUMENT_LAYOUT.all)
    coll.update_one({"_id": doc.pk}, {"$unset": dict.fromkeys(plain, "")})
    if fields:
        coll.update_one({"_id": doc.pk}, {"$set": fields})
    assert doc.lock(30) is True
    reloaded = cls.objects.get(pk=doc.pk)
    for name in cls._fields:
        assert getattr(doc, name) == getattr(reloaded, name), name
        assert type(getattr(doc, name)) is type(getattr(reloaded, name)), name
    assert doc._get_changed_fields() == []
    doc.release()


@pytest.mark.parametrize("field_class, native", sorted(_NATIVE.items(), key=str))
def test_a_native_value_loads_as_it_is(field_class, native):
    """A stored value of a field's native type is kept as it is, without the
    field's ``to_python``: which returns it unchanged (checked for every
    field class of the table, on the MongoEngine installed)."""
    samples = {str: "text", int: 7, float: 0.25, bool: True, ObjectId: ObjectId(),
               datetime: datetime(2026, 1, 2, 3, 4, 5, 6000)}
    value = samples[native]
    assert field_class().to_python(value) is value


def test_released_lease_fields_load_as_reload_does(job):
    assert job.lock(30) is True
    job.release()
    reloaded = Job.objects.get(pk=job.pk)
    for name in DOCUMENT_LAYOUT.all:
        assert getattr(job, name) == getattr(reloaded, name), name
        assert type(getattr(job, name)) is type(getattr(reloaded, name)), name


@pytest.mark.usefixtures("lockable_db")
def test_a_post_init_receiver_sees_the_loaded_document():
    """With a ``post_init`` receiver, a grant builds the document it loads
    (as ``reload()`` does), so that the receiver can change what is loaded."""
    seen = []

    def receiver(sender, document, **kwargs):
        seen.append(document)
        document._data["name"] = (document._data.get("name") or "").upper()

    doc = PlainFields(name="low").save()
    mongoengine.signals.post_init.connect(receiver, sender=PlainFields)
    try:
        assert doc.lock(30) is True
    finally:
        mongoengine.signals.post_init.disconnect(receiver, sender=PlainFields)
    assert seen and doc.name == "LOW"
    doc.release()


@pytest.mark.parametrize("call", ["lock", "update_if_held"])
def test_unsaved_changes_are_refused_before_anything_is_sent(job, call):
    # lock() and update_if_held() load the stored document into the instance:
    # an unsaved edit would be lost without a word, so they refuse first.
    if call == "update_if_held":
        assert job.lock(30) is True
    before = raw(job)
    job.status = "unsaved local edit"
    with pytest.raises(ValueError, match=r"unsaved changes to \['status'\]"):
        if call == "lock":
            job.lock(30)
        else:
            job.update_if_held(inc__tries=1)
    assert raw(job) == before
    assert job.status == "unsaved local edit"


def test_failed_lock_leaves_the_instance_alone(job):
    assert fresh(job).lock(30, owner="holder") is True
    Job._get_collection().update_one({"_id": job.pk}, {"$set": {"payload": "changed behind"}})
    assert job.lock(30) is False
    assert job.payload == "p"
    assert job.locked_until is None


# -- fence ---------------------------------------------------------------------


def test_fence_grows_by_one_per_acquisition_and_survives_release(job):
    fences = []
    for _ in range(3):
        assert job.lock(30) is True
        fences.append(job.lock_fence)
        job.release()
        assert job.lock_fence == fences[-1]
        assert raw(job)["lock_fence"] == fences[-1]
    assert fences == [1, 2, 3]


def test_fence_grows_on_force_and_after_expiry(job):
    assert job.lock(SHORT) is True
    assert job.lock_fence == 1
    time.sleep(PAST_SHORT)
    other = fresh(job)
    assert other.lock(30) is True
    assert other.lock_fence == 2
    third = fresh(job)
    assert third.lock(30, force=True) is True
    assert third.lock_fence == 3
    assert raw(job)["lock_fence"] == 3


def test_failed_lock_does_not_grow_fence(job):
    assert job.lock(30) is True
    for _ in range(3):
        assert fresh(job).lock(30) is False
    assert raw(job)["lock_fence"] == 1


# -- release -------------------------------------------------------------------


def test_release_frees_the_document_at_once(job):
    assert job.lock(30) is True
    owner = job.locked_by
    job.release()
    assert job.locked_until is None
    assert job.is_locked() is False
    stored = raw(job)
    assert stored["locked_until"] is None
    assert stored["locked_by"] == owner  # owner of the last lease stays
    assert fresh(job).locked_until is None  # reads back as None
    assert fresh(job).lock(30) is True


def test_an_instance_given_another_primary_key_locks_that_document(job):
    other = Job(payload="other").save()
    assert job.lock(30) is True
    job.release()
    job.pk = other.pk  # the same instance, now naming another record
    job.reload()
    assert job.lock(30) is True
    assert raw(other)["locked_until"] is not None
    assert Job.objects.get(pk=other.pk).is_locked()
    job.release()
    assert not Job.objects.get(pk=other.pk).is_locked()


def test_release_twice_raises(job):
    assert job.lock(30) is True
    job.release()
    with pytest.raises(LockNotOwnedError):
        job.release()


def test_release_without_lock_raises(job):
    with pytest.raises(LockNotOwnedError) as info:
        job.release()
    assert isinstance(info.value, LockError)
    assert raw(job).get("locked_until") is None


def test_release_by_owner_from_another_instance(job):
    assert job.lock(30, owner="worker-1") is True
    other = fresh(job)
    other.release(owner="worker-1")
    assert raw(job)["locked_until"] is None
    assert other.locked_until is None


def test_release_with_wrong_owner_raises_and_keeps_lease(job):
    assert job.lock(30, owner="worker-1") is True
    before = raw(job)
    with pytest.raises(LockNotOwnedError) as info:
        fresh(job).release(owner="worker-2")
    assert info.value.owner == "worker-2"
    assert info.value.target == job.pk
    assert raw(job) == before
    assert job.is_locked() is True


def test_release_of_someone_elses_lease_raises(job):
    assert job.lock(30) is True
    other = fresh(job)
    with pytest.raises(LockNotOwnedError):
        other.release()  # this instance never acquired it
    assert job.is_locked() is True


def test_release_leaves_unsaved_local_edits_alone(job):
    assert job.lock(30) is True
    job.payload = "local edit"
    job.release()
    assert job.payload == "local edit"
    assert job.locked_until is None
    assert raw(job)["payload"] == "p"
    job.save()  # the edit is still pending and saving it keeps the lease fields
    stored = raw(job)
    assert stored["payload"] == "local edit"
    assert stored["locked_until"] is None
    assert stored["lock_fence"] == 1


def test_release_of_expired_lease_raises_but_clears_it(job):
    assert job.lock(SHORT) is True
    time.sleep(PAST_SHORT)
    assert raw(job)["locked_until"] is not None
    with pytest.raises(LockNotOwnedError):
        job.release()
    stored = raw(job)
    assert stored["locked_until"] is None
    assert stored["lock_fence"] == 1


def test_release_of_expired_lease_taken_since_leaves_new_lease(job):
    assert job.lock(SHORT, owner="first") is True
    time.sleep(PAST_SHORT)
    other = fresh(job)
    assert other.lock(30, owner="second") is True
    before = raw(job)
    with pytest.raises(LockNotOwnedError):
        job.release()
    assert raw(job) == before
    assert job.is_locked() is True


def test_release_of_expired_lease_taken_since_by_same_owner_name(job):
    # Same owner string, but a later acquisition (another fence): not ours.
    assert job.lock(SHORT, owner="worker") is True
    time.sleep(PAST_SHORT)
    other = fresh(job)
    assert other.lock(30, owner="worker") is True
    before = raw(job)
    with pytest.raises(LockNotOwnedError):
        job.release()
    assert raw(job) == before
    assert raw(job)["lock_fence"] == 2


# -- renew ---------------------------------------------------------------------


def test_renew_extends_and_keeps_fence(job):
    assert job.lock(10) is True
    first_until = job.locked_until
    fence = job.lock_fence
    job.renew(3600)
    assert job.locked_until > utcnow() + timedelta(seconds=3500)
    assert job.locked_until > first_until
    assert job.lock_fence == fence
    stored = raw(job)
    assert stored["locked_until"] == job.locked_until
    assert stored["lock_fence"] == fence


def test_renew_default_is_the_acquired_duration(job):
    assert job.lock(1000) is True
    Job._get_collection().update_one(
        {"_id": job.pk}, {"$set": {"locked_until": utcnow() + timedelta(seconds=5)}}
    )
    job.renew()
    left = job.locked_until - utcnow()
    assert timedelta(seconds=900) < left < timedelta(seconds=1100)


def test_renew_accepts_timedelta(job):
    assert job.lock(10) is True
    job.renew(timedelta(hours=1))
    assert job.locked_until > utcnow() + timedelta(minutes=55)


def test_renew_can_shorten(job):
    assert job.lock(3600) is True
    job.renew(SHORT)
    time.sleep(PAST_SHORT)
    assert job.is_locked() is False


def test_renew_by_owner_from_another_instance(job):
    assert job.lock(10, owner="worker-1") is True
    other = fresh(job)
    other.renew(3600, owner="worker-1")
    assert raw(job)["locked_until"] > utcnow() + timedelta(seconds=3500)
    assert raw(job)["lock_fence"] == 1


def test_renew_by_owner_without_duration_needs_one(job):
    assert job.lock(10, owner="worker-1") is True
    before = raw(job)
    with pytest.raises(TypeError, match="duration"):
        fresh(job).renew(owner="worker-1")
    assert raw(job) == before


def test_renew_without_lock_raises(job):
    with pytest.raises(LockNotOwnedError):
        job.renew(10)


def test_renew_after_release_raises(job):
    assert job.lock(10) is True
    job.release()
    with pytest.raises(LockNotOwnedError):
        job.renew(10)
    assert raw(job)["locked_until"] is None


def test_renew_with_wrong_owner_raises(job):
    assert job.lock(10, owner="worker-1") is True
    before = raw(job)
    with pytest.raises(LockNotOwnedError):
        fresh(job).renew(3600, owner="worker-2")
    assert raw(job) == before


def test_expired_lease_is_not_revived_by_renew(job):
    assert job.lock(SHORT) is True
    time.sleep(PAST_SHORT)
    with pytest.raises(LockNotOwnedError):
        job.renew(3600)
    assert job.is_locked() is False
    stored_until = raw(job)["locked_until"]
    assert stored_until is None or stored_until < utcnow()
    assert fresh(job).lock(30) is True


def test_renew_after_force_takeover_raises(job):
    assert job.lock(30) is True
    assert fresh(job).lock(30, force=True) is True
    before = raw(job)
    with pytest.raises(LockNotOwnedError):
        job.renew(3600)
    assert raw(job) == before


def test_renew_leaves_unsaved_local_edits_alone(job):
    assert job.lock(10) is True
    job.payload = "local edit"
    job.renew(3600)
    assert job.payload == "local edit"
    assert job.locked_until > utcnow() + timedelta(seconds=3500)
    assert raw(job)["payload"] == "p"
    assert "payload" in job._get_changed_fields()


# -- update_if_held --------------------------------------------------------------


def test_update_if_held_applies_the_update(job):
    assert job.lock(30) is True
    lease = {k: raw(job)[k] for k in ("locked_until", "locked_by", "lock_fence")}
    job.update_if_held(set__status="done", inc__tries=2)
    stored = raw(job)
    assert stored["status"] == "done"
    assert stored["tries"] == 2
    assert {k: stored[k] for k in lease} == lease  # the lease is untouched
    assert job.status == "done"
    assert job.tries == 2
    assert job.is_locked() is True


def test_update_if_held_without_lease_raises(job):
    before = raw(job)
    with pytest.raises(LockNotOwnedError):
        job.update_if_held(set__status="done")
    assert raw(job) == before


def test_update_if_held_after_release_raises(job):
    assert job.lock(30) is True
    job.release()
    before = raw(job)
    with pytest.raises(LockNotOwnedError):
        job.update_if_held(set__status="done")
    assert raw(job) == before


def test_update_if_held_after_expiry_writes_nothing(job):
    assert job.lock(SHORT) is True
    time.sleep(PAST_SHORT)
    before = raw(job)
    with pytest.raises(LockNotOwnedError):
        job.update_if_held(set__status="done", inc__tries=1)
    assert raw(job) == before
    assert raw(job)["status"] == "pending"


def test_update_if_held_after_force_takeover_writes_nothing(job):
    assert job.lock(30) is True
    thief = fresh(job)
    assert thief.lock(30, force=True) is True
    with pytest.raises(LockNotOwnedError):
        job.update_if_held(set__status="stale write")
    assert raw(job)["status"] == "pending"
    thief.update_if_held(set__status="done")
    assert raw(job)["status"] == "done"


def test_update_if_held_after_takeover_by_same_owner_name(job):
    # The fence, not only the owner string, guards the write.
    assert job.lock(SHORT, owner="worker") is True
    time.sleep(PAST_SHORT)
    assert fresh(job).lock(30, owner="worker") is True
    with pytest.raises(LockNotOwnedError):
        job.update_if_held(set__status="stale write")
    assert raw(job)["status"] == "pending"


def test_update_if_held_rejects_lease_fields(job):
    assert job.lock(30) is True
    before = raw(job)
    for update in (
        {"set__locked_until": None},
        {"set__locked_by": "x"},
        {"inc__lock_fence": 1},
        {"unset__locked_until": True},
    ):
        with pytest.raises(ValueError, match="lease"):
            job.update_if_held(**update)
    assert raw(job) == before


@pytest.mark.parametrize(
    "update",
    [
        pytest.param({"rename__status": "locked_until"}, id="rename-onto-locked_until"),
        pytest.param(
            {"__raw__": {"$rename": {"payload": "lock_fence"}}}, id="raw-rename-onto-fence"
        ),
    ],
)
def test_update_if_held_rejects_renaming_onto_lease_fields(job, update):
    # A $rename whose *target* is a lease field overwrites the lease as surely
    # as a $set does: locked_until becoming a string frees the lease on the
    # server (strings sort below dates), a string fence wedges later grants.
    assert job.lock(30) is True
    before = raw(job)
    with pytest.raises(ValueError, match="lease"):
        job.update_if_held(**update)
    assert raw(job) == before


def test_update_if_held_rejects_raw_set_of_lease_fields(job):
    assert job.lock(30) is True
    before = raw(job)
    with pytest.raises(ValueError, match="lease"):
        job.update_if_held(__raw__={"$set": {"locked_by": "someone else"}})
    assert raw(job) == before


def test_update_if_held_needs_an_update(job):
    assert job.lock(30) is True
    with pytest.raises(TypeError):
        job.update_if_held()


def test_update_if_held_unknown_field(job):
    assert job.lock(30) is True
    before = raw(job)
    with pytest.raises(TypeError):
        job.update_if_held(set__no_such_field=1)
    assert raw(job) == before


# -- force ---------------------------------------------------------------------


def test_force_takes_a_held_lease(job):
    assert job.lock(30, owner="old") is True
    thief = fresh(job)
    assert thief.lock(30, owner="new", force=True) is True
    assert thief.locked_by == "new"
    assert thief.lock_fence == 2
    with pytest.raises(LockNotOwnedError):
        job.release()
    stored = raw(job)
    assert stored["locked_by"] == "new"
    assert stored["locked_until"] > utcnow()
    thief.release()
    assert raw(job)["locked_until"] is None


def test_force_on_free_document(job):
    assert job.lock(30, force=True) is True
    assert job.lock_fence == 1
    assert job.is_locked() is True


def test_force_false_is_the_default(job):
    assert job.lock(30) is True
    assert fresh(job).lock(30, force=False) is False


# -- is_locked -----------------------------------------------------------------


def test_is_locked_follows_the_stored_state(job):
    other = fresh(job)
    assert other.is_locked() is False
    assert job.lock(30) is True
    assert other.is_locked() is True  # reads the database, not the instance
    job.release()
    assert other.is_locked() is False


def test_is_locked_false_after_expiry(job):
    assert job.lock(SHORT) is True
    assert job.is_locked() is True
    time.sleep(PAST_SHORT)
    assert job.is_locked() is False


# -- legacy, unsaved and deleted documents ----------------------------------------


def test_legacy_document_without_lease_fields_is_unlocked_and_lockable():
    _id = ObjectId()
    Job._get_collection().insert_one({"_id": _id, "payload": "old", "status": "pending"})
    doc = Job.objects.get(pk=_id)
    assert doc.is_locked() is False
    assert [d.pk for d in Job.objects.unlocked()] == [_id]
    assert Job.objects.locked().count() == 0
    assert doc.lock(30) is True
    assert doc.lock_fence == 1
    assert doc.payload == "old"
    stored = Job._get_collection().find_one({"_id": _id})
    assert stored["lock_fence"] == 1
    assert stored["locked_by"] == doc.locked_by
    doc.release()
    assert Job._get_collection().find_one({"_id": _id})["locked_until"] is None


def test_legacy_document_with_null_lease_fields_is_lockable():
    # Stored by another tool with the lease fields present but null: as free,
    # and with a fence of 0, as a document without them.
    _id = ObjectId()
    coll = Job._get_collection()
    coll.insert_one(
        {"_id": _id, "payload": "old", "locked_until": None, "locked_by": None, "lock_fence": None}
    )
    doc = Job.objects.get(pk=_id)
    assert doc.is_locked() is False
    assert Job.objects.unlocked().count() == 1
    assert doc.lock(30, owner="new") is True
    assert doc.lock_fence == 1
    stored = coll.find_one({"_id": _id})
    assert stored["lock_fence"] == 1
    assert stored["locked_by"] == "new"


def test_legacy_null_fence_claim():
    coll = Job._get_collection()
    _id = coll.insert_one({"payload": "old", "status": "pending", "lock_fence": None}).inserted_id
    claimed = Job.objects(status="pending").claim(30)
    assert claimed is not None and claimed.pk == _id
    assert claimed.lock_fence == 1


def test_unsaved_document_raises():
    doc = Job(payload="never saved")
    with pytest.raises(UnsavedDocumentError) as info:
        doc.lock(30)
    assert isinstance(info.value, LockError)
    with pytest.raises(UnsavedDocumentError):
        doc.is_locked()
    with pytest.raises(UnsavedDocumentError):
        with doc.locked(30):
            pass  # pragma: no cover
    assert Job.objects.count() == 0


def test_deleted_document_raises_does_not_exist(job):
    Job.objects(pk=job.pk).delete()
    with pytest.raises(Job.DoesNotExist):
        job.lock(30)
    with pytest.raises(Job.DoesNotExist):
        job.is_locked()
    with pytest.raises(Job.DoesNotExist):
        job.lock(30, force=True)
    assert Job.objects.count() == 0


def test_deleted_document_does_not_wait(job):
    Job.objects(pk=job.pk).delete()
    start = time.monotonic()
    with pytest.raises(Job.DoesNotExist):
        job.lock(30, wait=30)
    assert time.monotonic() - start < 20


def test_deleted_while_held_release_raises(job):
    assert job.lock(30) is True
    Job.objects(pk=job.pk).delete()
    with pytest.raises(LockNotOwnedError):
        job.release()
    assert Job.objects.count() == 0


# -- waiting -------------------------------------------------------------------


def test_wait_while_held_returns_false_after_the_wait(job):
    assert job.lock(30) is True
    other = fresh(job)
    start = time.monotonic()
    assert other.lock(30, wait=0.3) is False
    assert time.monotonic() - start >= 0.29
    assert raw(job)["lock_fence"] == 1


def test_wait_succeeds_when_holder_releases_meanwhile(job):
    assert job.lock(30, owner="holder") is True
    errors = []

    def release_later():
        try:
            time.sleep(0.3)
            job.release()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=release_later)
    waiter = fresh(job)
    thread.start()
    try:
        assert waiter.lock(30, wait=10, owner="waiter") is True
    finally:
        thread.join(10)
    assert errors == []
    assert waiter.locked_by == "waiter"
    assert waiter.lock_fence == 2
    assert raw(job)["locked_by"] == "waiter"


def test_wait_none_succeeds_when_lease_expires(job):
    assert job.lock(SHORT) is True
    other = fresh(job)
    assert other.lock(30, wait=None) is True
    assert other.lock_fence == 2


def test_wait_with_timedelta(job):
    assert job.lock(30) is True
    start = time.monotonic()
    assert fresh(job).lock(30, wait=timedelta(milliseconds=200)) is False
    assert time.monotonic() - start >= 0.19


def test_concurrent_lock_has_one_winner(job):
    n = 8
    barrier = threading.Barrier(n)
    results = []
    results_lock = threading.Lock()

    def contend(i):
        doc = Job.objects.get(pk=job.pk)
        barrier.wait(10)
        got = doc.lock(30, owner=f"thread-{i}")
        with results_lock:
            results.append((i, got))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == n
    winners = [i for i, got in results if got]
    assert len(winners) == 1
    stored = raw(job)
    assert stored["locked_by"] == f"thread-{winners[0]}"
    assert stored["lock_fence"] == 1


# -- locked() --------------------------------------------------------------------


def test_locked_holds_during_the_block_and_releases(job):
    with job.locked(30) as inside:
        assert inside is job
        assert job.is_locked() is True
        assert job.lock_fence == 1
        assert fresh(job).lock(30) is False
    assert job.is_locked() is False
    assert raw(job)["locked_until"] is None


def test_locked_with_owner(job):
    with job.locked(30, owner="ctx"):
        assert raw(job)["locked_by"] == "ctx"
    assert raw(job)["locked_until"] is None


def test_locked_releases_when_the_block_raises(job):
    with pytest.raises(RuntimeError, match="boom"):
        with job.locked(30):
            raise RuntimeError("boom")
    assert raw(job)["locked_until"] is None


def test_locked_raises_unavailable_when_held(job):
    assert job.lock(30, owner="holder") is True
    before = raw(job)
    other = fresh(job)
    ran = False
    with pytest.raises(LockUnavailableError) as info:
        with other.locked(30):
            ran = True  # pragma: no cover
    assert ran is False
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, LockError)
    assert info.value.owner == "holder"
    assert info.value.target == job.pk
    assert raw(job) == before


def test_locked_waits(job):
    assert job.lock(30) is True
    start = time.monotonic()
    with pytest.raises(LockUnavailableError):
        with fresh(job).locked(30, wait=0.3):
            pass  # pragma: no cover
    assert time.monotonic() - start >= 0.29


def test_locked_lost_lease_raises_on_exit(job):
    with pytest.raises(LockNotOwnedError):
        with job.locked(30):
            assert fresh(job).lock(30, owner="thief", force=True) is True
    assert raw(job)["locked_by"] == "thief"
    assert raw(job)["locked_until"] > utcnow()  # the thief's lease is untouched


def test_locked_expired_lease_raises_on_exit(job):
    with pytest.raises(LockNotOwnedError):
        with job.locked(SHORT):
            time.sleep(PAST_SHORT)
    assert raw(job)["locked_until"] is None  # cleared: nobody took it since


def test_locked_lost_lease_chained_to_block_exception(job):
    with pytest.raises(LockNotOwnedError) as info:
        with job.locked(30):
            assert fresh(job).lock(30, force=True) is True
            raise KeyError("from the block")
    context = info.value.__context__
    assert isinstance(context, KeyError)
    assert context.args == ("from the block",)


# -- inheritance and custom querysets -----------------------------------------------


def test_allow_inheritance_subclass_shares_collection_and_locks():
    assert EmailTask._get_collection_name() == Task._get_collection_name() == "test_tasks"
    email = EmailTask(payload="e", address="a@example.com").save()
    plain = Task(payload="t").save()
    assert email.lock(30) is True
    assert email.lock_fence == 1
    assert email.address == "a@example.com"
    assert isinstance(Task.objects.get(pk=email.pk), EmailTask)
    assert Task.objects.get(pk=email.pk).is_locked() is True
    assert plain.is_locked() is False
    stored = Task._get_collection().find_one({"_id": email.pk})
    assert stored["_cls"] == "Task.EmailTask"
    assert stored["lock_fence"] == 1
    email.release()
    assert Task._get_collection().find_one({"_id": email.pk})["locked_until"] is None


def test_allow_inheritance_claims():
    Task(payload="t", status="pending").save()
    email = EmailTask(payload="e", address="a@example.com", status="pending").save()
    claimed = EmailTask.objects.claim(30)
    assert isinstance(claimed, EmailTask)
    assert claimed.pk == email.pk
    assert EmailTask.objects.claim(30) is None  # the base's document is not an EmailTask
    other = Task.objects.claim(30)
    assert type(other) is Task
    assert Task.objects.claim(30) is None


def test_custom_queryset_class():
    assert isinstance(CustomQSJob.objects, PendingQuerySet)
    CustomQSJob(payload="done", status="done").save()
    pending = CustomQSJob(payload="todo", status="pending").save()
    claimed = CustomQSJob.objects.pending().claim(30)
    assert claimed is not None and claimed.pk == pending.pk
    assert CustomQSJob.objects.pending().claim(30) is None
    assert CustomQSJob.objects.pending().unlocked().count() == 0
    assert CustomQSJob.objects.locked().count() == 1
    claimed.release()
    doc = CustomQSJob.objects.get(pk=pending.pk)
    assert doc.lock(30) is True
    assert doc.lock_fence == 2


def test_custom_primary_key():
    doc = KeyedJob(key="job-1", payload="k").save()
    KeyedJob(key="job-2", payload="other").save()
    assert doc.lock(30) is True
    assert doc.lock_fence == 1
    assert doc.is_locked() is True
    assert KeyedJob.objects.get(pk="job-2").is_locked() is False
    doc.update_if_held(set__payload="done")
    doc.release()
    stored = KeyedJob._get_collection().find_one({"_id": "job-1"})
    assert stored["payload"] == "done"
    assert stored["locked_until"] is None
    assert KeyedJob.objects(pk="job-1").claim(30).pk == "job-1"


def test_shard_key_document():
    doc = TenantJob(tenant="t1", payload="a").save()
    other = TenantJob(tenant="t2", payload="b").save()
    assert doc.lock(30) is True
    assert doc.is_locked() is True
    assert other.is_locked() is False
    doc.renew(60)
    doc.update_if_held(set__status="done")
    doc.release()
    stored = raw(doc)
    assert stored["status"] == "done"
    assert stored["locked_until"] is None
    assert stored["lock_fence"] == 1
    assert raw(other).get("lock_fence", 0) == 0
    claimed = TenantJob.objects(tenant="t2").claim(30)
    assert claimed.pk == other.pk


def test_lock_write_concern_class_works(job):
    doc = W1Job(payload="w1").save()
    assert doc.lock(30) is True
    assert doc.lock_fence == 1
    doc.renew(60)
    doc.release()
    assert W1Job._get_collection().find_one({"_id": doc.pk})["locked_until"] is None


# -- signals -------------------------------------------------------------------


class _Seconds:
    """Equal to any non-negative number of seconds."""

    def __eq__(self, other):
        return isinstance(other, float) and other >= 0

    def __repr__(self):
        return "<seconds>"


ANY_SECONDS = _Seconds()


class Received:
    def __init__(self):
        self.calls = []

    def __call__(self, sender, **kwargs):
        self.calls.append((sender, kwargs))


def test_signals_fire_with_sender_owner_fence_document(job):
    acquired, renewed, released = Received(), Received(), Received()
    with lock_acquired.connected_to(acquired, sender=Job), lock_renewed.connected_to(
        renewed, sender=Job
    ), lock_released.connected_to(released, sender=Job):
        assert job.lock(30, owner="sig") is True
        job.renew(60)
        job.release()
    assert acquired.calls == [
        (Job, {"document": job, "owner": "sig", "fence": 1, "waited": ANY_SECONDS})
    ]
    assert renewed.calls == [(Job, {"document": job, "owner": "sig", "fence": 1})]
    assert released.calls == [
        (Job, {"document": job, "owner": "sig", "fence": 1, "held_for": ANY_SECONDS})
    ]


def test_signals_not_sent_on_failure(job):
    assert fresh(job).lock(30, owner="holder") is True
    acquired, renewed, released = Received(), Received(), Received()
    with lock_acquired.connected_to(acquired), lock_renewed.connected_to(
        renewed
    ), lock_released.connected_to(released):
        assert job.lock(30) is False
        with pytest.raises(LockNotOwnedError):
            job.renew(30, owner="nobody")
        with pytest.raises(LockNotOwnedError):
            job.release(owner="nobody")
    assert acquired.calls == renewed.calls == released.calls == []


def test_signal_on_claim_and_subclass_sender():
    acquired = Received()
    email = EmailTask(payload="e").save()
    with lock_acquired.connected_to(acquired):
        claimed = EmailTask.objects.claim(30, owner="claimer")
    assert claimed.pk == email.pk
    assert acquired.calls == [
        (EmailTask, {"document": claimed, "owner": "claimer", "fence": 1, "waited": ANY_SECONDS})
    ]


def test_signal_default_owner_is_the_stored_token(job):
    acquired = Received()
    with lock_acquired.connected_to(acquired, sender=Job):
        assert job.lock(30) is True
    [(sender, kwargs)] = acquired.calls
    assert sender is Job
    assert kwargs["owner"] == raw(job)["locked_by"]
    assert kwargs["fence"] == 1
