"""Bad durations, waits, owners and flags are rejected before any database call.

One value of each exception per entry point and argument (every value is
checked without a database in ``test_args.py``). Each case checks the exact
exception type, that its message names the argument,
that the stored document is unchanged, and that nothing reached the database:
on a real server the documents go through a client whose command listener must
see no command at all; on mongomock every collection method fails the test if
called.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, NamedTuple

import mongoengine
import mongomock
import pytest

from models import OWN_ALIAS, AliasedJob, CommandRecorder, raw, recorded_alias

NAN = math.nan
INF = math.inf


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


# -- the entry points ------------------------------------------------------------


def _enter(cm):
    with cm:
        pass  # pragma: no cover - entering must fail


class Entry(NamedTuple):
    """How to call one entry point with one argument set to ``value``."""

    call: Callable[[AliasedJob, Any], Any]
    held: bool  # the instance must hold the lease first (renew, release)


ENTRIES = {
    "lock": {
        "duration": Entry(lambda doc, v: doc.lock(v), False),
        "wait": Entry(lambda doc, v: doc.lock(30, wait=v), False),
        "owner": Entry(lambda doc, v: doc.lock(30, owner=v), False),
        "force": Entry(lambda doc, v: doc.lock(30, force=v), False),
    },
    "locked": {
        "duration": Entry(lambda doc, v: _enter(doc.locked(v)), False),
        "wait": Entry(lambda doc, v: _enter(doc.locked(30, wait=v)), False),
        "owner": Entry(lambda doc, v: _enter(doc.locked(30, owner=v)), False),
    },
    "renew": {
        "duration": Entry(lambda doc, v: doc.renew(v), True),
        "owner": Entry(lambda doc, v: doc.renew(30, owner=v), True),
    },
    "release": {
        "owner": Entry(lambda doc, v: doc.release(owner=v), True),
    },
    "claim": {
        "duration": Entry(lambda doc, v: type(doc).objects.claim(v), False),
        "owner": Entry(lambda doc, v: type(doc).objects.claim(30, owner=v), False),
    },
}

# -- the bad values ----------------------------------------------------------------

# One value of each exception per argument: ``test_args.py`` checks every value
# of the tables against the argument checks themselves, without a database.
BAD_VALUES = {
    "duration": [("str", "30", TypeError), ("NaN", NAN, ValueError),
                 ("timedelta-max", timedelta.max, ValueError), ("None", None, TypeError)],
    "wait": [("str", "1", TypeError), ("minus-one", -1, ValueError)],
    "owner": [("int", 5, TypeError), ("empty", "", ValueError),
              ("lone-surrogate", "w\ud800", ValueError)],
    "force": [("one", 1, TypeError)],
}


def _cases():
    for method, arguments in ENTRIES.items():
        for argument, entry in arguments.items():
            for case_id, value, exc in BAD_VALUES[argument]:
                if method == "renew" and argument == "duration" and value is None:
                    continue  # renew(None) means "the acquired duration"
                yield pytest.param(
                    entry, argument, value, exc, id=f"{method}-{argument}={case_id}"
                )


# -- nothing may reach the database -------------------------------------------------

_MOCK_METHODS = (
    "find",
    "find_one",
    "find_one_and_update",
    "find_one_and_replace",
    "find_one_and_delete",
    "update_one",
    "update_many",
    "replace_one",
    "insert_one",
    "insert_many",
    "delete_one",
    "delete_many",
    "count_documents",
    "estimated_document_count",
    "aggregate",
    "bulk_write",
    "distinct",
    "create_index",
    "create_indexes",
)


@pytest.fixture(
    scope="module",
    params=[pytest.param("mongomock"), pytest.param("mongod", marks=pytest.mark.mongod)],
)
def table_db(request) -> Iterator[CommandRecorder | None]:
    """:class:`AliasedJob`'s alias connected to a database for this module, on
    mongomock (yields ``None``) or on the real server (yields the recorder of
    every command its client sends).

    The table below has a few hundred cases: a fresh database for each (as the
    ``lockable_db`` fixture makes) would cost a collection and index build and a
    ``dropDatabase`` per case. Each case saves a document of its own instead.
    """
    db_name = f"lockable_bad_input_{uuid.uuid4().hex[:12]}"
    if request.param == "mongomock":
        mongoengine.connect(
            db=db_name,
            alias=OWN_ALIAS,
            host="mongodb://localhost",
            mongo_client_class=mongomock.MongoClient,
            uuidRepresentation="standard",
        )
        try:
            AliasedJob.ensure_indexes()
            yield None
        finally:
            mongoengine.get_connection(OWN_ALIAS).drop_database(db_name)
            mongoengine.disconnect(OWN_ALIAS)
        return
    uri = request.getfixturevalue("lockable_mongod_uri")
    with recorded_alias(uri, db_name, OWN_ALIAS) as recorder:
        try:
            AliasedJob.ensure_indexes()
            yield recorder
        finally:
            mongoengine.get_connection(OWN_ALIAS).drop_database(db_name)


@contextmanager
def nothing_sent(recorder, monkeypatch):
    """Fail if the database is called inside the block: on the real server the
    client's command listener must see no command; on mongomock every
    collection method refuses to run."""
    if recorder is not None:
        recorder.clear()
        yield
        assert recorder.commands == []
        return
    calls = []

    def forbid(name):
        def refuse(self, *args, **kwargs):
            calls.append(name)
            raise AssertionError(f"database call during argument checks: {name}")

        return refuse

    with monkeypatch.context() as patch:
        for name in _MOCK_METHODS:
            patch.setattr(mongomock.collection.Collection, name, forbid(name))
        yield
    assert calls == []


@pytest.fixture
def doc(table_db) -> Iterator[AliasedJob]:
    """A free document, the only one in its collection during the test."""
    assert AliasedJob.objects.count() == 0
    yield AliasedJob(payload="p").save()
    AliasedJob.objects.delete()


@pytest.mark.parametrize(("entry", "argument", "value", "exc"), list(_cases()))
def test_bad_argument_is_rejected_before_any_database_call(
    table_db, doc, monkeypatch, entry, argument, value, exc
):
    if entry.held:
        assert doc.lock(30, owner="holder") is True
    before = raw(doc)
    with nothing_sent(table_db, monkeypatch):
        with pytest.raises(exc) as info:
            entry.call(doc, value)
    assert type(info.value) is exc
    assert re.search(rf"\b{argument}\b", str(info.value)), str(info.value)
    assert raw(doc) == before


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda doc: doc.is_locked(), id="is_locked"),
        pytest.param(lambda doc: doc.lock(30), id="lock"),
        pytest.param(lambda doc: AliasedJob.objects.claim(30), id="claim"),
    ],
)
def test_nothing_sent_notices_database_calls(table_db, doc, monkeypatch, call):
    # The guard of the table above must be able to fail.
    with pytest.raises(AssertionError):
        with nothing_sent(table_db, monkeypatch):
            call(doc)


def test_case_table_covers_every_entry_point():
    ids = [p.id for p in _cases()]
    assert len(ids) == len(set(ids))
    for method in ("lock", "locked", "renew", "release", "claim"):
        assert any(i.startswith(f"{method}-owner=") for i in ids)
    for method in ("lock", "locked", "renew", "claim"):
        assert f"{method}-duration=NaN" in ids
    assert "lock-force=one" in ids
    assert "locked-wait=str" in ids
    assert "renew-duration=None" not in ids
    for method, arguments in ENTRIES.items():  # one TypeError and one ValueError each
        for argument in arguments:
            kinds = {p.values[3] for p in _cases() if p.id.startswith(f"{method}-{argument}=")}
            assert kinds == ({TypeError} if argument == "force" else {TypeError, ValueError})


# -- what must be accepted ---------------------------------------------------------

GOOD_DURATIONS = [
    pytest.param(10**9, 10**9, id="10**9"),
    pytest.param(1e9, 10**9, id="1e9-float"),
    pytest.param(timedelta(days=1), 86400, id="timedelta-1-day"),
    pytest.param(3600, 3600, id="int"),
    pytest.param(2.5, 2.5, id="float"),
]


def _assert_lease_length(doc, seconds):
    left = (raw(doc)["locked_until"] - utcnow()).total_seconds()
    assert seconds - 60 < left <= seconds + 60, (left, seconds)


@pytest.mark.parametrize(("duration", "seconds"), GOOD_DURATIONS)
def test_lock_and_renew_accept_durations(doc, duration, seconds):
    assert doc.lock(duration) is True
    if seconds > 60:
        _assert_lease_length(doc, seconds)
    doc.release()
    assert doc.lock(1) is True
    doc.renew(duration)
    if seconds > 60:
        _assert_lease_length(doc, seconds)
    assert doc.locked_until == raw(doc)["locked_until"]
    doc.release()


@pytest.mark.parametrize(("duration", "seconds"), GOOD_DURATIONS)
def test_claim_and_locked_accept_durations(doc, duration, seconds):
    claimed = AliasedJob.objects.claim(duration)
    assert claimed is not None and claimed.pk == doc.pk
    if seconds > 60:
        _assert_lease_length(doc, seconds)
    claimed.release()
    with doc.locked(duration):
        if seconds > 60:
            _assert_lease_length(doc, seconds)
    assert raw(doc)["locked_until"] is None


def test_tiny_duration_is_accepted(doc):
    assert doc.lock(0.001) is True
    assert doc.lock_fence == 1
    time.sleep(0.05)  # long past the end of that lease
    claimed = AliasedJob.objects.claim(0.001)
    assert claimed is not None and claimed.lock_fence == 2
    time.sleep(0.05)
    again = AliasedJob.objects.get(pk=doc.pk)
    assert again.lock(30) is True
    assert again.lock_fence == 3
    again.renew(0.001)
    assert raw(doc)["lock_fence"] == 3


@pytest.mark.parametrize(
    "wait",
    [
        pytest.param(0, id="0"),
        pytest.param(0.0, id="0.0"),
        pytest.param(None, id="None"),
        pytest.param(timedelta(0), id="timedelta-0"),
        pytest.param(5, id="5"),
        pytest.param(10**9, id="10**9"),
    ],
)
def test_wait_values_accepted_on_a_free_document(doc, wait):
    assert doc.lock(30, wait=wait) is True
    doc.release()
    with doc.locked(30, wait=wait):
        assert doc.is_locked() is True


@pytest.mark.parametrize(
    "owner",
    [
        pytest.param("w", id="one-char"),
        pytest.param(" ", id="space"),
        pytest.param("wörker/ünïcode", id="unicode"),
        pytest.param("$not.a.path", id="dollar"),
        pytest.param("x" * 1000, id="long"),
    ],
)
def test_owner_values_accepted(doc, owner):
    assert doc.lock(30, owner=owner) is True
    assert raw(doc)["locked_by"] == owner
    doc.renew(60, owner=owner)
    doc.release(owner=owner)
    claimed = AliasedJob.objects.claim(30, owner=owner)
    assert claimed.locked_by == owner
    claimed.release(owner=owner)
    assert raw(doc)["locked_until"] is None


@pytest.mark.parametrize("force", [True, False])
def test_force_accepts_bools(doc, force):
    assert doc.lock(30, force=force) is True
    assert doc.lock_fence == 1
