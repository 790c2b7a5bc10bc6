"""``unlocked()``, ``locked()`` and ``claim()`` on querysets, and (on a real
server) the index a claim's findAndModify uses."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from mongoengine.queryset.visitor import Q

from mongoengine_lockable import LockNotOwnedError

from models import Job, OrderedJob, StatusJob, raw, recorded_alias

SHORT = 0.2
PAST_SHORT = 0.35


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def pks(queryset) -> set:
    return {doc.pk for doc in queryset}


# -- unlocked() / locked() ---------------------------------------------------------


@pytest.mark.usefixtures("lockable_db")
def test_unlocked_and_locked_split_the_collection():
    free = Job(payload="free").save()
    held = Job(payload="held").save()
    released = Job(payload="released").save()
    expired = Job(payload="expired").save()
    assert held.lock(30) is True
    assert released.lock(30) is True
    released.release()
    assert expired.lock(SHORT) is True
    time.sleep(PAST_SHORT)
    assert pks(Job.objects.unlocked()) == {free.pk, released.pk, expired.pk}
    assert pks(Job.objects.locked()) == {held.pk}
    assert Job.objects.unlocked().count() == 3
    assert Job.objects.locked().count() == 1


@pytest.mark.usefixtures("lockable_db")
def test_unlocked_and_locked_chain_with_filters():
    a_free = Job(payload="a", status="ready").save()
    a_held = Job(payload="a", status="ready").save()
    b_free = Job(payload="b", status="done").save()
    b_held = Job(payload="b", status="done").save()
    assert a_held.lock(30) is True
    assert b_held.lock(30) is True
    assert pks(Job.objects(status="ready").unlocked()) == {a_free.pk}
    assert pks(Job.objects.filter(status="ready").locked()) == {a_held.pk}
    assert pks(Job.objects.unlocked().filter(status="done")) == {b_free.pk}
    assert pks(Job.objects.locked()(status="done")) == {b_held.pk}
    assert pks(Job.objects(status="nothing").unlocked()) == set()
    # unlocked() and locked() together select nothing
    assert Job.objects.unlocked().locked().count() == 0


@pytest.mark.usefixtures("lockable_db")
def test_unlocked_and_locked_chain_with_or_filters():
    a = Job(payload="a", status="x").save()
    b = Job(payload="b", priority=5).save()
    Job(payload="c").save()
    assert a.lock(30) is True
    either = Job.objects(Q(status="x") | Q(priority=5))
    assert pks(either.unlocked()) == {b.pk}
    assert pks(either.locked()) == {a.pk}
    assert either.unlocked().claim(30).pk == b.pk
    assert either.claim(30) is None


@pytest.mark.usefixtures("lockable_db")
def test_claim_from_unlocked_queryset():
    a = Job(payload="a").save()
    assert Job.objects.unlocked().unlocked().count() == 1
    assert Job.objects.unlocked().claim(30).pk == a.pk
    assert Job.objects.unlocked().claim(30) is None
    assert Job.objects.locked().claim(30) is None  # held documents are never claimed


@pytest.mark.usefixtures("lockable_db")
def test_unlocked_with_order_by_and_first():
    Job(payload="low", priority=1).save()
    high = Job(payload="high", priority=9).save()
    mid = Job(payload="mid", priority=5).save()
    assert high.lock(30) is True
    assert Job.objects.unlocked().order_by("-priority").first().pk == mid.pk


# -- claim() -----------------------------------------------------------------------


@pytest.mark.usefixtures("lockable_db")
def test_claim_returns_the_full_document_with_the_lease():
    job = Job(payload="work", status="pending", tries=3, priority=2).save()
    before = utcnow()
    claimed = Job.objects.claim(30, owner="claimer")
    assert isinstance(claimed, Job)
    assert claimed.pk == job.pk
    assert claimed.payload == "work"
    assert claimed.status == "pending"
    assert claimed.tries == 3
    assert claimed.priority == 2
    assert claimed.locked_by == "claimer"
    assert claimed.lock_fence == 1
    assert before + timedelta(seconds=25) < claimed.locked_until < utcnow() + timedelta(seconds=35)
    stored = raw(job)
    assert stored["locked_by"] == "claimer"
    assert stored["lock_fence"] == 1
    assert stored["locked_until"] == claimed.locked_until
    assert job.is_locked() is True


@pytest.mark.usefixtures("lockable_db")
def test_claim_default_owner_is_a_fresh_token():
    Job(payload="a").save()
    Job(payload="b").save()
    first = Job.objects.claim(30)
    second = Job.objects.claim(30)
    assert first.pk != second.pk
    assert first.locked_by and second.locked_by
    assert first.locked_by != second.locked_by


@pytest.mark.usefixtures("lockable_db")
def test_claim_accepts_timedelta():
    Job(payload="a").save()
    claimed = Job.objects.claim(timedelta(hours=1))
    assert claimed.locked_until > utcnow() + timedelta(minutes=55)


@pytest.mark.usefixtures("lockable_db")
def test_claim_honours_the_filter():
    Job(payload="x", status="done").save()
    wanted = Job(payload="y", status="pending").save()
    Job(payload="z", status="failed").save()
    claimed = Job.objects(status="pending").claim(30)
    assert claimed.pk == wanted.pk
    assert Job.objects(status="pending").claim(30) is None
    assert Job.objects.locked().count() == 1


@pytest.mark.usefixtures("lockable_db")
def test_claim_honours_filter_with_operators_and_q():
    Job(payload="a", priority=1).save()
    b = Job(payload="b", priority=5).save()
    c = Job(payload="c", priority=7, status="x").save()
    assert Job.objects(priority__gte=5, status="pending").claim(30).pk == b.pk
    assert Job.objects(Q(status="x") | Q(priority=99)).claim(30).pk == c.pk
    assert Job.objects(priority__gte=5).claim(30) is None


@pytest.mark.usefixtures("lockable_db")
def test_claim_honours_order_by():
    for p in (3, 1, 4, 1.5, 9, 2):
        Job(payload=str(p), priority=int(p * 2)).save()
    ascending = [Job.objects.order_by("priority").claim(30).priority for _ in range(3)]
    assert ascending == [2, 3, 4]
    descending = [Job.objects.order_by("-priority").claim(30).priority for _ in range(3)]
    assert descending == [18, 8, 6]
    assert Job.objects.order_by("priority").claim(30) is None


@pytest.mark.usefixtures("lockable_db")
def test_claim_honours_meta_ordering():
    for p in (2, 7, 5):
        OrderedJob(payload=str(p), priority=p).save()
    claimed = [OrderedJob.objects.claim(30).priority for _ in range(3)]
    assert claimed == [7, 5, 2]  # meta ordering is "-priority"
    assert OrderedJob.objects.claim(30) is None


@pytest.mark.usefixtures("lockable_db")
def test_claim_order_by_overrides_meta_ordering():
    for p in (2, 7, 5):
        OrderedJob(payload=str(p), priority=p).save()
    assert OrderedJob.objects.order_by("priority").claim(30).priority == 2


@pytest.mark.usefixtures("lockable_db")
def test_claim_skips_held_documents():
    first = Job(payload="1", priority=1).save()
    second = Job(payload="2", priority=2).save()
    third = Job(payload="3", priority=3).save()
    assert first.lock(30, owner="other") is True
    assert third.lock(30, owner="other") is True
    before = {d.pk: raw(d) for d in (first, third)}
    claimed = Job.objects.order_by("priority").claim(30, owner="me")
    assert claimed.pk == second.pk
    assert {d.pk: raw(d) for d in (first, third)} == before
    assert Job.objects.claim(30) is None


@pytest.mark.usefixtures("lockable_db")
def test_claim_takes_expired_and_released_leases():
    expired = Job(payload="e", priority=1).save()
    released = Job(payload="r", priority=2).save()
    assert expired.lock(SHORT, owner="gone") is True
    assert released.lock(30) is True
    released.release()
    time.sleep(PAST_SHORT)
    first = Job.objects.order_by("priority").claim(30, owner="me")
    assert first.pk == expired.pk
    assert first.lock_fence == 2
    assert first.locked_by == "me"
    second = Job.objects.order_by("priority").claim(30, owner="me")
    assert second.pk == released.pk
    assert second.lock_fence == 2
    with pytest.raises(LockNotOwnedError):
        expired.release()  # the old holder lost it


@pytest.mark.usefixtures("lockable_db")
def test_claim_returns_none_when_nothing_is_free():
    assert Job.objects.claim(30) is None  # empty collection
    job = Job(payload="only").save()
    assert job.lock(30) is True
    before = raw(job)
    assert Job.objects.claim(30) is None
    assert raw(job) == before


@pytest.mark.usefixtures("lockable_db")
def test_claimed_document_can_be_released_renewed_and_updated():
    job = Job(payload="w").save()
    claimed = Job.objects.claim(30)
    claimed.renew(3600)
    assert raw(job)["locked_until"] > utcnow() + timedelta(seconds=3500)
    claimed.update_if_held(set__status="running", inc__tries=1)
    assert raw(job)["status"] == "running"
    assert claimed.tries == 1
    claimed.release()
    stored = raw(job)
    assert stored["locked_until"] is None
    assert stored["lock_fence"] == 1
    assert Job.objects.claim(30).pk == job.pk


@pytest.mark.usefixtures("lockable_db")
def test_claim_a_legacy_document():
    coll = Job._get_collection()
    _id = coll.insert_one({"payload": "old", "status": "pending"}).inserted_id
    claimed = Job.objects(status="pending").claim(30)
    assert claimed.pk == _id
    assert claimed.lock_fence == 1
    assert coll.find_one({"_id": _id})["lock_fence"] == 1


@pytest.mark.usefixtures("lockable_db")
def test_claim_with_limit_still_honours_the_filter():
    Job(payload="a", status="pending").save()
    b = Job(payload="b", status="other").save()
    claimed = Job.objects(status="other").limit(1).claim(30)
    assert claimed.pk == b.pk


@pytest.mark.usefixtures("lockable_db")
def test_concurrent_claims_never_share_a_document():
    docs = [Job(payload=str(i)).save() for i in range(12)]
    n = 6
    barrier = threading.Barrier(n)
    claimed = []
    guard = threading.Lock()
    errors = []

    def worker(i):
        try:
            barrier.wait(10)
            while True:
                doc = Job.objects.claim(30, owner=f"w{i}")
                if doc is None:
                    return
                with guard:
                    claimed.append((doc.pk, doc.locked_by))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(pk for pk, _ in claimed) == sorted(d.pk for d in docs)
    for pk, owner in claimed:
        stored = Job._get_collection().find_one({"_id": pk})
        assert stored["locked_by"] == owner
        assert stored["lock_fence"] == 1


# -- the index a claim uses (real server) ------------------------------------------

_FAM_KEYS = ("findAndModify", "query", "sort", "update", "new", "fields", "upsert")


def _stages(plan):
    """Every stage of an explain plan tree."""
    if isinstance(plan, dict):
        if "stage" in plan:
            yield plan
        for value in plan.values():
            yield from _stages(value)
    elif isinstance(plan, list):
        for value in plan:
            yield from _stages(value)


def _ixscans(plan):
    return [s for s in _stages(plan) if s["stage"] == "IXSCAN"]


def _claim_and_explain(real_db, model, make_queryset):
    from mongoengine.context_managers import switch_db

    alias = "lockable-explain"
    with recorded_alias(real_db.uri, real_db.db_name, alias) as recorder:
        with switch_db(model, alias) as switched:
            switched.ensure_indexes()
            recorder.clear()
            claimed = make_queryset(switched).claim(30)
        sent = [c for c in recorder.commands if next(iter(c)) == "findAndModify"]
    assert claimed is not None
    assert len(sent) == 1
    command = {k: sent[0][k] for k in _FAM_KEYS if k in sent[0]}
    db = model._get_db()
    explained = db.command("explain", command, verbosity="queryPlanner")
    return command, explained["queryPlanner"]["winningPlan"]


def _lease_scans(plan):
    """The IXSCAN stages of ``plan`` on an index whose key includes
    ``locked_until``, with a range that stops at "now" (not ``MaxKey``)."""
    scans = []
    for scan in _ixscans(plan):
        bounds = scan.get("indexBounds", {}).get("locked_until")
        if bounds is not None:
            assert all("MaxKey" not in b for b in bounds), scan
            scans.append(scan)
    return scans


def test_claim_uses_the_locked_until_index(lockable_real_db):
    for i in range(20):
        Job(payload=str(i)).save()
    for job in Job.objects[:15]:
        assert job.lock(300) is True
    command, plan = _claim_and_explain(lockable_real_db, Job, lambda m: m.objects)
    assert command["findAndModify"] == "test_jobs"
    assert not any(s["stage"] == "COLLSCAN" for s in _stages(plan)), plan
    scans = _lease_scans(plan)
    assert [s["keyPattern"] for s in scans] == [{"locked_until": 1}], plan


def test_claim_with_status_filter_uses_compound_index(lockable_real_db):
    for i in range(30):
        StatusJob(payload=str(i), status="pending" if i % 3 else "done").save()
    for job in StatusJob.objects(status="pending")[:5]:
        assert job.lock(300) is True
    command, plan = _claim_and_explain(
        lockable_real_db, StatusJob, lambda m: m.objects(status="pending")
    )
    assert command["findAndModify"] == "test_status_jobs"
    assert "pending" in repr(command["query"])  # the queryset's filter is sent
    assert not any(s["stage"] == "COLLSCAN" for s in _stages(plan)), plan
    scans = _lease_scans(plan)
    assert [s["keyPattern"] for s in scans] == [{"status": 1, "locked_until": 1}], plan
    assert scans[0]["indexBounds"]["status"] == ['["pending", "pending"]'], plan


@pytest.mark.usefixtures("lockable_db")
def test_no_cache_and_back_keep_the_lease_methods():
    held, free = Job(payload="held").save(), Job(payload="free").save()
    assert held.lock(30)
    quiet = Job.objects(payload__in=["held", "free"]).no_cache()
    assert [j.pk for j in quiet.unlocked()] == [free.pk]
    assert [j.pk for j in quiet.locked()] == [held.pk]
    assert [j.pk for j in quiet.cache().unlocked()] == [free.pk]
    claimed = quiet.claim(30)
    assert claimed is not None and claimed.pk == free.pk
    assert quiet.claim(30) is None


# -- claim() honours everything that narrows or orders the queryset ----------------------


@pytest.mark.usefixtures("lockable_db")
def test_claim_on_none_claims_nothing():
    job = Job(payload="x").save()
    assert Job.objects.none().claim(30) is None
    assert Job.objects(payload="x").none().claim(30, wait=0.2) is None
    assert Job.objects.none().claim_many(5, 30) == []
    assert raw(job).get("locked_until") is None


def test_claim_honours_where(lockable_real_db):
    low = Job(payload="low", priority=1).save()
    high = Job(payload="high", priority=9).save()
    claimed = Job.objects.where("this.priority > 5").claim(30)
    assert claimed is not None and claimed.pk == high.pk
    assert Job.objects.where("this.priority > 5").claim(30) is None
    assert raw(low).get("locked_until") is None


@pytest.mark.usefixtures("lockable_db")
@pytest.mark.parametrize("window", ["skip", "slice", "limit", "skip-limit"])
def test_claim_takes_only_documents_inside_the_window(window):
    jobs = [Job(payload=f"{n:02}", priority=n).save() for n in range(8)]
    ordered = Job.objects.order_by("priority")
    queryset = {
        "skip": ordered.skip(5),
        "slice": ordered[5:],
        "limit": ordered.limit(3),
        "skip-limit": ordered[2:4],
    }[window]
    inside = {
        "skip": [5, 6, 7], "slice": [5, 6, 7], "limit": [0, 1, 2], "skip-limit": [2, 3],
    }[window]
    claimed = []
    while (doc := queryset.claim(30)) is not None:
        claimed.append(doc.priority)
    assert claimed == inside
    assert queryset.claim_many(10, 30) == []
    # Nothing outside the window was touched.
    for job in jobs:
        assert (raw(job).get("locked_until") is not None) == (job.priority in inside)


@pytest.mark.usefixtures("lockable_db")
def test_claim_in_a_window_skips_held_documents_of_the_window():
    jobs = [Job(payload=str(n), priority=n).save() for n in range(4)]
    assert jobs[1].lock(30)
    window = Job.objects.order_by("priority")[1:3]
    assert window.claim(30).priority == 2  # 1 is held; 0 and 3 are outside
    assert window.claim(30) is None


@pytest.mark.usefixtures("lockable_db")
def test_claim_many_in_a_window_and_its_order():
    for n in range(6):
        Job(payload=str(n), priority=n).save()
    got = Job.objects.order_by("-priority")[1:5].claim_many(10, 30, owner="w")
    assert [d.priority for d in got] == [4, 3, 2, 1]
    assert all(d.locked_by == "w" and d.owns_lock() for d in got)


def test_claim_honours_collation(lockable_real_db):
    Job(payload="apple", status="READY").save()
    upper = Job.objects(status="ready").collation({"locale": "en", "strength": 2})
    claimed = upper.claim(30)
    assert claimed is not None and claimed.status == "READY"
    assert Job.objects(status="ready").claim(30) is None  # case matters without it


def test_claim_honours_hint(lockable_real_db, monkeypatch):
    from mongoengine_lockable._document import executor_of

    Job.ensure_indexes()
    Job(payload="x", status="pending").save()
    io = executor_of(Job)
    sent = []
    real = io.collection

    class Recording:
        def find_one_and_update(self, *args, **kwargs):
            sent.append(kwargs)
            return real.find_one_and_update(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(io, "collection", Recording())
    claimed = Job.objects(status="pending").hint([("locked_until", 1)]).claim(30)
    assert claimed is not None
    assert sent[-1]["hint"] == [("locked_until", 1)]
    with pytest.raises(Exception, match="hint"):  # the server honours it: a bad one fails
        Job.objects(status="pending").hint([("no_such_index", 1)]).claim(30)


def test_claim_honours_search_text(lockable_real_db):
    Job._get_collection().create_index([("payload", "text")])
    Job(payload="invoice for march").save()
    Job(payload="receipt").save()
    claimed = Job.objects.search_text("invoice").claim(30)
    assert claimed is not None and claimed.payload == "invoice for march"
    assert Job.objects.search_text("invoice").claim(30) is None
