"""Clients whose clocks are hours wrong: expiry is decided by the server's clock.

Worker processes run under Debian's ``faketime`` (libfaketime, preloaded with
``LD_PRELOAD``) with their wall clock 2 hours ahead or behind; the test process
(normal clock) holds a document lease and a named lock. The skewed workers
(command ``clock_skew`` of ``tests/workers.py``) must not get them (``lock()`` ->
``False``, ``claim()`` -> ``None``, ``acquire()`` -> ``False``): a client clock
2 h ahead would otherwise see those 30 s leases long expired. Then each takes
leases of its own of 1 s; they must end 1 s after the grant by the server's
clock, so the normal process cannot take them right away but can about a
second later (neither 2 h later nor at once).

``faketime`` must be installed (``apt-get install -y faketime``). Without it the
test is skipped, or fails when ``LOCKABLE_REQUIRE_MONGOD=1`` or ``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from mongoengine_lockable import NamedLock

from _children import Child, Children
from models import SkewDoc
from workers import server_now as server_now_of

FAKETIME = "/usr/bin/faketime"
INSTALL = "apt-get install -y faketime"
SKEW = timedelta(hours=2)
HELD_LEASE = 30
OWN_LEASE = 1.0
#: Generous bounds (seconds): a worker's start-up, a wait that should last
#: about one lease.
LINE_TIMEOUT = 60.0
WAIT_LIMIT = 10.0


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


@pytest.fixture(scope="module")
def faketime() -> str:
    """The ``faketime`` binary; skip (or fail, where it is required) without it."""
    found = FAKETIME if os.access(FAKETIME, os.X_OK) else shutil.which("faketime")
    if found is None:
        reason = f"{FAKETIME} is missing: install Debian's faketime ({INSTALL})"
        if _flag("LOCKABLE_REQUIRE_MONGOD") or _flag("CI"):
            pytest.fail(f"{reason}; it is required here (LOCKABLE_REQUIRE_MONGOD or CI is set)",
                        pytrace=False)
        pytest.skip(reason)
    return found


@pytest.fixture
def spawn(tmp_path: Path, faketime: str) -> Iterator[Any]:
    """Start ``clock_skew`` workers under ``faketime -f OFFSET``; all are killed and
    reaped when the test ends."""
    with Children(tmp_path) as children:

        def start(name: str, offset: str, **args: Any) -> Child:
            return children.start(
                "clock_skew",
                args,
                name=name,
                prefix=(faketime, "-f", offset),
                # A wrong wall clock, a right monotonic one (as after a bad NTP
                # step); a monotonic clock hours behind boot would be negative.
                env={"DONT_FAKE_MONOTONIC": "1"},
            )

        yield start


def server_now() -> datetime:
    """The server's ``$$NOW`` (through any document of the collection)."""
    doc = SkewDoc._get_collection().find_one({}, {"_id": True})
    return server_now_of(SkewDoc._get_collection(), doc["_id"])


@pytest.mark.parametrize("offset", ["+2h", "-2h"])
def test_skewed_clients_obey_server_clock(
    faketime: str, lockable_real_db: Any, spawn: Any, offset: str
) -> None:
    db = lockable_real_db
    sign = 1 if offset.startswith("+") else -1
    held = SkewDoc(group="held").save()
    held_for_claim = [SkewDoc(group="held-claim").save() for _ in range(3)]
    own = SkewDoc(group="own").save()
    held_name, own_name = f"skew-held{offset}", f"skew-own{offset}"
    assert held.lock(HELD_LEASE)
    for doc in held_for_claim:
        assert doc.lock(HELD_LEASE)
    held_lock = NamedLock(held_name, HELD_LEASE)
    assert held_lock.acquire()

    worker = spawn(
        f"skew{offset}",
        offset,
        uri=db.uri,
        db=db.db_name,
        lease=OWN_LEASE,
        held_doc=str(held.pk),
        held_name=held_name,
        own_doc=str(own.pk),
        own_name=own_name,
    )
    first = worker.expect("REPORT", LINE_TIMEOUT)
    skew = first["time"] - time.time()
    utc_skew = datetime.fromisoformat(first["utcnow"]) - datetime.now(timezone.utc).replace(
        tzinfo=None
    )
    print(f"\n{offset}: worker clock off by {skew / 3600:+.3f} h (time.time()), "
          f"{utc_skew.total_seconds() / 3600:+.3f} h (datetime.now(utc)); "
          f"on the held leases: lock={first['lock']} claim={first['claim']} "
          f"acquire={first['acquire']}")
    # libfaketime must really act on the venv's interpreter, or this proves nothing.
    assert abs(skew - sign * SKEW.total_seconds()) < 120, (
        f"faketime {offset} did not skew the worker's clock: off by {skew:.0f} s"
    )
    assert abs(utc_skew.total_seconds() - sign * SKEW.total_seconds()) < 120
    assert first["lock"] is False, "a skewed client took a held document lease"
    assert first["claim"] is None, "a skewed client claimed a held document"
    assert first["acquire"] is False, "a skewed client took a held named lock"
    worker.send("GO")

    second = worker.expect("REPORT", LINE_TIMEOUT)
    # Right after the worker's grants (well within their 1 s), the normal
    # process tries: both are held.
    t_reported = time.monotonic()
    doc_again = own.lock(OWN_LEASE)
    named_again = NamedLock(own_name, OWN_LEASE).acquire()
    attempt_s = time.monotonic() - t_reported
    after_attempts = server_now()
    # About a second later they are free (not 2 hours later).
    started = time.monotonic()
    doc_later = own.lock(OWN_LEASE, wait=WAIT_LIMIT)
    doc_wait = time.monotonic() - started
    named = NamedLock(own_name, OWN_LEASE)
    named_later = named.acquire(wait=WAIT_LIMIT)
    named_wait = time.monotonic() - started
    worker.send("GO")
    assert worker.join(LINE_TIMEOUT) == 0, worker.describe()

    assert second["doc_ok"] is True and second["named_ok"] is True, second
    t = {k: datetime.fromisoformat(v) for k, v in second.items() if isinstance(v, str)}
    lease = timedelta(seconds=OWN_LEASE)
    doc_grant = t["doc_locked_until"] - lease
    print(f"{offset}: document lease: locked_until - {OWN_LEASE} s lies "
          f"{(doc_grant - t['doc_before']).total_seconds() * 1000:.0f} ms after the server's "
          f"$$NOW read before the grant and "
          f"{(t['doc_after'] - doc_grant).total_seconds() * 1000:.0f} ms before the one after; "
          f"named lock: locked_until - acquired_at = "
          f"{(t['named_locked_until'] - t['named_acquired_at']).total_seconds():.3f} s, "
          f"acquired_at {(t['named_acquired_at'] - t['named_before']).total_seconds() * 1000:.0f}"
          f" ms after the read before")
    # The leases end 1 s after the grant by the server's clock (bracketed by
    # two $$NOW reads), not 1 s after the worker's idea of now, 2 h off.
    assert t["doc_before"] <= doc_grant <= t["doc_after"], second
    assert t["named_locked_until"] - t["named_acquired_at"] == lease, second
    assert t["named_before"] <= t["named_acquired_at"] <= t["named_after"], second

    print(f"{offset}: the normal process's attempts right after the report "
          f"({attempt_s * 1000:.0f} ms): lock={doc_again} acquire={named_again}")
    # Decided while both leases were unexpired (unless this machine stalled
    # for a whole second, when there is nothing to conclude).
    if after_attempts < min(t["doc_locked_until"], t["named_locked_until"]):
        assert doc_again is False, "the skewed worker's 1 s lease was free at once"
        assert named_again is False, "the skewed worker's 1 s named lock was free at once"
    else:
        print(f"{offset}: the attempts came after the leases ended; not checked")

    assert doc_later, f"the document lease was not free within {WAIT_LIMIT} s"
    assert named_later, f"the named lock was not free within {WAIT_LIMIT} s"
    print(f"{offset}: taken by the normal process after waiting {doc_wait:.2f} s (document) "
          f"and {named_wait:.2f} s (both)")
    assert own.lock_fence == second["doc_fence"] + 1
    assert named.fence is not None and named.fence > second["named_fence"]
    # Granted by the server once the skewed leases had ended, not before.
    assert own.locked_until - lease >= t["doc_locked_until"]
    taken = SkewDoc._get_db()["lockable_named_locks"].find_one({"_id": own_name})
    assert taken["acquired_at"] >= t["named_locked_until"]

    # And the leases the normal process held all along are still its own.
    held.release()
    for doc in held_for_claim:
        doc.release()
    held_lock.release()
    own.release()
    named.release()
