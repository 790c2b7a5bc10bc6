"""One conditional find-and-modify per state change, counted on the wire.

The documents are used through a MongoEngine alias whose client records every
command it sends (a pymongo ``CommandListener``), connected to the test's
database on the real server. Real server only: mongomock sends no commands.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime

import pytest
from mongoengine.context_managers import switch_db

from mongoengine_lockable import LockUnavailableError, _engine, _io

from models import CommandRecorder, Job, TenantJob, W1Job, recorded_alias

ALIAS = "lockable-recorded"


@pytest.fixture
def recorder(lockable_real_db) -> Iterator[CommandRecorder]:
    with recorded_alias(lockable_real_db.uri, lockable_real_db.db_name, ALIAS) as rec:
        yield rec


@pytest.fixture
def RJob(recorder) -> Iterator[type[Job]]:
    """:class:`Job` switched to the recording alias, its collection and
    indexes already created (so that no ``createIndexes`` is counted)."""
    with switch_db(Job, ALIAS) as switched:
        switched.ensure_indexes()
        recorder.clear()
        yield switched


def saved(model, recorder, **fields):
    """Save a document, then forget the commands that took."""
    doc = model(**fields).save()
    recorder.clear()
    return doc


def only_find_and_modify(recorder) -> dict:
    """The one command sent since the last clear, which must be a findAndModify."""
    assert recorder.names == ["findAndModify"], recorder.commands
    return recorder.commands[0]


def assert_majority(command):
    assert command["writeConcern"] == {"w": "majority"}, command


def _values(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _values(v)
    elif isinstance(value, list):
        for v in value:
            yield from _values(v)
    else:
        yield value


def assert_server_clock(command, *parts):
    """The lease decision in ``command`` is made by ``$$NOW``: no client time
    is sent in the named parts (filter, update, projection)."""
    sent = [command[p] for p in parts if p in command]
    assert "$$NOW" in repr(sent), command
    assert not any(isinstance(v, datetime) for v in _values(sent)), command


def test_lock_is_one_find_and_modify(RJob, recorder):
    job = saved(RJob, recorder, payload="x")
    assert job.lock(30) is True
    command = only_find_and_modify(recorder)
    assert command["findAndModify"] == "test_jobs"
    assert command["query"]["_id"] == job.pk
    assert command["new"] is True
    assert not command.get("upsert")
    assert_majority(command)
    assert_server_clock(command, "query", "update")


def test_forced_lock_is_one_find_and_modify(RJob, recorder):
    job = saved(RJob, recorder, payload="x")
    assert RJob.objects.get(pk=job.pk).lock(30) is True
    recorder.clear()
    assert job.lock(30, force=True) is True
    assert_majority(only_find_and_modify(recorder))


def test_lock_with_wait_on_a_free_document_is_one_find_and_modify(RJob, recorder):
    job = saved(RJob, recorder, payload="x")
    assert job.lock(30, wait=5) is True
    only_find_and_modify(recorder)


def test_release_is_one_find_and_modify(RJob, recorder):
    job = saved(RJob, recorder, payload="x")
    assert job.lock(30) is True
    recorder.clear()
    job.release()
    command = only_find_and_modify(recorder)
    assert command["query"]["_id"] == job.pk
    assert_majority(command)
    assert_server_clock(command, "query")


def test_renew_is_one_find_and_modify(RJob, recorder):
    job = saved(RJob, recorder, payload="x")
    assert job.lock(30) is True
    recorder.clear()
    job.renew(60)
    command = only_find_and_modify(recorder)
    assert_majority(command)
    assert_server_clock(command, "query", "update")
    recorder.clear()
    job.renew()  # the default duration too
    only_find_and_modify(recorder)


def test_update_if_held_is_one_find_and_modify(RJob, recorder):
    job = saved(RJob, recorder, payload="x")
    assert job.lock(30) is True
    recorder.clear()
    job.update_if_held(set__status="done", inc__tries=1)
    command = only_find_and_modify(recorder)
    # The caller's update, stamped so that an ambiguous outcome can be read back.
    stamp = command["update"]["$set"].pop("lock_stamp")
    assert isinstance(stamp, str) and len(stamp) >= 16
    assert command["update"] == {"$set": {"status": "done"}, "$inc": {"tries": 1}}
    assert_majority(command)
    assert_server_clock(command, "query")
    assert job.status == "done"


def test_claim_is_one_find_and_modify(RJob, recorder):
    for p in (3, 1, 2):
        saved(RJob, recorder, payload=str(p), priority=p)
    claimed = RJob.objects(status="pending").order_by("priority").claim(30)
    assert claimed.priority == 1
    command = only_find_and_modify(recorder)
    assert command["sort"] == {"priority": 1}
    assert command["query"]["status"] == "pending"
    assert_majority(command)
    assert_server_clock(command, "query", "update")


def test_claim_with_nothing_free_is_one_find_and_modify(RJob, recorder):
    assert RJob.objects.claim(30) is None
    only_find_and_modify(recorder)


def test_locked_block_is_two_find_and_modifies(RJob, recorder):
    job = saved(RJob, recorder, payload="x")
    with job.locked(30):
        only_find_and_modify(recorder)
        recorder.clear()
    only_find_and_modify(recorder)


def test_is_locked_is_one_read_of_the_primary(RJob, recorder):
    job = saved(RJob, recorder, payload="x")
    assert job.is_locked() is False
    assert recorder.names == ["find"], recorder.commands
    command = recorder.commands[0]
    assert command.get("$readPreference", {"mode": "primary"})["mode"] == "primary"
    # The server's own time comes back with the record.
    assert_server_clock(command, "projection")


def test_unlocked_and_locked_querysets_use_the_server_clock(RJob, recorder):
    saved(RJob, recorder, payload="x")
    assert RJob.objects.unlocked().count() == 1
    assert RJob.objects.locked().count() == 0
    commands = recorder.commands
    assert len(commands) == 2, commands
    for command in commands:
        assert_server_clock(command, "query", "filter", "pipeline")


def test_failed_lock_writes_nothing_else(RJob, recorder):
    job = saved(RJob, recorder, payload="x")
    holder = RJob.objects.get(pk=job.pk)
    assert holder.lock(30) is True
    recorder.clear()
    assert job.lock(30) is False
    # The refused write, then one read of the record with the server's time
    # (a grant carries that time in itself, a refusal does not).
    assert recorder.names == ["findAndModify", "find"], recorder.commands
    assert_server_clock(recorder.commands[1], "projection")
    with pytest.raises(LockUnavailableError, match=repr(holder.locked_by)):
        with job.locked(30):
            pass


def test_release_with_a_waiter_queued_meanwhile_hands_over(RJob, recorder, monkeypatch):
    """A release whose grant saw nobody queued tries the small update first;
    a waiter queued since makes it match nothing, and the full release
    hands the lease over."""
    job = saved(RJob, recorder, payload="x")
    assert job.lock(30) is True
    waiter = RJob.objects.get(pk=job.pk)
    assert waiter.lock(30, wait=0.05) is False  # queued, then left at its timeout
    recorder.clear()
    job.release()
    # (The waiter's change stream may be closed meanwhile: killCursors.)
    writes = [c for c in recorder.commands if "findAndModify" in c]
    assert len(writes) == 1, recorder.commands
    quiet = writes[0]
    assert quiet["query"]["lock_waiters"] == {"$exists": False}
    assert "$replaceWith" not in repr(quiet["update"])
    assert job.lock(30) is True
    RJob._get_collection().update_one({"_id": job.pk}, {"$set": {"lock_waiters": [
        {"t": "w" * 24, "o": "someone", "ms": 30000, "a": datetime(2100, 1, 1)}]}})
    recorder.clear()
    job.release()
    writes = [c for c in recorder.commands if "findAndModify" in c]
    assert len(writes) == 2, recorder.commands
    assert "$replaceWith" in repr(writes[1]["update"])
    assert RJob.objects.get(pk=job.pk).locked_by == "someone"
    # Found contended: for CONTENDED_SECONDS its releases hand over at once.
    assert job.lock(30, force=True) is True
    RJob._get_collection().update_one({"_id": job.pk}, {"$set": {"lock_waiters": [
        {"t": "v" * 24, "o": "another", "ms": 30000, "a": datetime(2100, 1, 1)}]}})
    recorder.clear()
    job.release()
    writes = [c for c in recorder.commands if "findAndModify" in c]
    assert len(writes) == 1 and "$replaceWith" in repr(writes[0]["update"]), writes
    assert RJob.objects.get(pk=job.pk).locked_by == "another"
    monkeypatch.setattr(_engine, "CONTENDED_SECONDS", 0.0)  # ...and then quietly again
    assert job.lock(30, force=True) is True
    recorder.clear()
    job.release()
    writes = [c for c in recorder.commands if "findAndModify" in c]
    assert len(writes) == 1 and "$replaceWith" not in repr(writes[0]["update"]), writes


def test_lock_write_concern_of_the_class(recorder):
    with switch_db(W1Job, ALIAS) as RW1Job:
        RW1Job.ensure_indexes()
        doc = saved(RW1Job, recorder, payload="w1")
        assert doc.lock(30) is True
        assert only_find_and_modify(recorder)["writeConcern"] == {"w": 1}
        recorder.clear()
        doc.release()
        assert only_find_and_modify(recorder)["writeConcern"] == {"w": 1}


def test_lease_filter_names_the_shard_key(recorder):
    with switch_db(TenantJob, ALIAS) as RTenantJob:
        RTenantJob.ensure_indexes()
        doc = saved(RTenantJob, recorder, tenant="t1", payload="x")
        assert doc.lock(30) is True
        command = only_find_and_modify(recorder)
        assert command["query"]["_id"] == doc.pk
        assert command["query"]["tenant"] == "t1"
        recorder.clear()
        doc.release()
        assert only_find_and_modify(recorder)["query"]["tenant"] == "t1"


def _stream_opens(recorder) -> int:
    return sum(1 for c in recorder.commands
               if c.get("aggregate") and "$changeStream" in repr(c.get("pipeline")))


def _hubs_of(model) -> list[_io.Hub]:
    """The open stream hubs of ``model``'s client."""
    client = id(model._get_collection().database.client)
    return [h for h in list(_io._HUBS._hubs.values()) if h.alive() and h.key[2] == client]


def _handed_over(job, waiter) -> None:
    """``job`` is locked and released 0.3 s later; ``waiter`` waits for it."""
    assert job.lock(30) is True
    releasing = threading.Timer(0.3, job.release)
    releasing.start()
    assert waiter.lock(30, wait=10) is True  # handed over by the release
    releasing.join()
    waiter.release()


def test_the_waits_of_a_process_share_one_change_stream(RJob, recorder, monkeypatch):
    """Every wait of the process on the collection, by one instance again
    and again or by several at once, is woken through one change stream
    (one ``aggregate``); unused for KEEP_STREAM_SECONDS, it is closed
    (``killCursors``), and the next wait opens a new one."""
    monkeypatch.setattr(_io, "KEEP_STREAM_SECONDS", 0.4)
    job, other = saved(RJob, recorder, payload="x"), saved(RJob, recorder, payload="y")
    waiter = RJob.objects.get(pk=job.pk)
    for _ in range(3):
        _handed_over(job, waiter)
    both = [threading.Thread(target=_handed_over, args=(job, waiter)),
            threading.Thread(target=_handed_over, args=(other, RJob.objects.get(pk=other.pk)))]
    for thread in both:
        thread.start()
    for thread in both:
        thread.join(timeout=30)
    assert _stream_opens(recorder) == 1, recorder.names
    deadline = time.monotonic() + 10
    while "killCursors" not in recorder.names and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "killCursors" in recorder.names  # closed once unused
    assert _hubs_of(RJob) == []
    _handed_over(job, waiter)
    assert _stream_opens(recorder) == 2, recorder.names


def test_a_failed_stream_is_replaced_by_the_next_wait(RJob, recorder):
    """When the process's stream fails (here: closed under its reader), its
    waiters poll for the rest of their waits and the next wait opens a new
    stream."""
    job = saved(RJob, recorder, payload="x")
    waiter = RJob.objects.get(pk=job.pk)
    _handed_over(job, waiter)
    (hub,) = _hubs_of(RJob)
    hub.stream.close()
    deadline = time.monotonic() + 10
    while hub.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not hub.alive()
    _handed_over(job, waiter)
    assert _stream_opens(recorder) == 2, recorder.names
