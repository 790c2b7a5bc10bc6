"""The command line, driven as a user drives it.

Every test runs ``python -m mongoengine_lockable ...`` in a subprocess against
the real server of the ``lockable_mongod_uri`` fixture. Leases are seeded with
the library in this process (MongoEngine's default alias, connected to a fresh
database by ``lockable_real_db``), and the effects of ``release`` are checked
the same way.

No test asserts how long something takes; the only limits are generous
subprocess timeouts that turn a hang into a failure.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from typing import Any, Callable

import pymongo
import pytest
from bson import ObjectId

from mongoengine_lockable import LockNotOwnedError, NamedLock
from mongoengine_lockable._demo import JobsReport, _check_jobs
from mongoengine_lockable.testing import LockableDB

from models import CliIntJob, CliJob

PROG = "mongoengine-lockable"
UNREACHABLE = "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=500"
#: Seconds a command gets before the test calls it hung.
TIMEOUT = 120

ROW_KEYS = {
    "kind", "id", "state", "remaining", "owner", "host", "pid", "fence",
    "locked_until", "acquired_at", "waiters",
}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command line; ``MONGODB_URI`` is unset unless ``env`` sets it."""
    environ = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mongoengine_lockable", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=environ,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int = 2) -> str:
    """The command failed with ``status`` and said why in one line on stderr."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{PROG}: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def with_db(uri: str, db: str) -> str:
    """``uri`` with ``db`` as its database path."""
    base, _, query = uri.partition("?")
    return f"{base.rstrip('/')}/{db}" + (f"?{query}" if query else "")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


@pytest.fixture
def db(lockable_real_db: LockableDB) -> LockableDB:
    """A fresh database on the real server, MongoEngine connected to it."""
    return lockable_real_db


@pytest.fixture
def leases(db: LockableDB) -> dict[str, Any]:
    """Documents in every lease state: held, expired, released, never locked."""
    held = CliJob(name="held").save()
    assert held.lock(300)
    expired = CliJob(name="expired").save()
    assert expired.lock(0.1)
    released = CliJob(name="released").save()
    assert released.lock(300)
    released.release()
    never = CliJob(name="never").save()
    wait_until(lambda: not expired.is_locked(), "the short lease expired")
    return {"held": held, "expired": expired, "released": released, "never": never}


@pytest.fixture
def named(db: LockableDB) -> dict[str, NamedLock]:
    """Named locks: one held, one expired, one released."""
    held = NamedLock("cli-held", 300)
    assert held.acquire()
    expired = NamedLock("cli-expired", 0.1)
    assert expired.acquire()
    released = NamedLock("cli-released", 300)
    assert released.acquire()
    released.release()
    wait_until(lambda: NamedLock.is_free("cli-expired"), "the short named lock expired")
    return {"held": held, "expired": expired, "released": released}


def list_json(db: LockableDB, *extra: str) -> list[dict[str, Any]]:
    assert db.uri is not None
    result = run_cli("list", "--uri", db.uri, "--db", db.db_name, "--json", *extra)
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    for row in rows:
        assert set(row) == ROW_KEYS
    return rows


# -- list -----------------------------------------------------------------------------


def test_list_documents_table(db: LockableDB, leases: dict[str, Any]) -> None:
    assert db.uri is not None
    result = run_cli("list", "--uri", db.uri, "--db", db.db_name, "--collection", "cli_jobs")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[2:]}
    held, expired = str(leases["held"].pk), str(leases["expired"].pk)
    assert set(lines) == {held, expired}, result.stdout
    assert " held " in lines[held] and leases["held"].locked_by in lines[held]
    assert f" {os.getpid()} " in lines[held]
    assert " expired " in lines[expired]


def test_list_documents_json(db: LockableDB, leases: dict[str, Any]) -> None:
    rows = {row["id"]: row for row in list_json(db, "--collection", "cli_jobs")}
    held, expired = leases["held"], leases["expired"]
    assert set(rows) == {str(held.pk), str(expired.pk)}
    row = rows[str(held.pk)]
    assert row["kind"] == "document"
    assert row["state"] == "held"
    assert 0 < row["remaining"] <= 300
    assert row["owner"] == held.locked_by
    assert row["host"] == socket.gethostname()
    assert row["pid"] == os.getpid()
    assert row["fence"] == 1
    assert row["locked_until"].endswith("Z")
    row = rows[str(expired.pk)]
    assert row["state"] == "expired"
    assert row["remaining"] <= 0
    assert row["owner"] == expired.locked_by

    everything = {r["id"]: r for r in list_json(db, "--collection", "cli_jobs", "--all")}
    assert set(everything) == {str(held.pk), str(expired.pk), str(leases["released"].pk)}
    released = everything[str(leases["released"].pk)]
    assert released["state"] == "released"
    assert released["remaining"] is None
    assert released["fence"] == 1

    limited = list_json(db, "--collection", "cli_jobs", "--limit", "1")
    assert [r["id"] for r in limited] == [str(held.pk)]  # the latest-ending first


def test_list_named_locks(db: LockableDB, named: dict[str, NamedLock]) -> None:
    # Held and expired only, as for documents; --all adds the released lock.
    assert {row["id"] for row in list_json(db)} == {"cli-held", "cli-expired"}
    rows = {row["id"]: row for row in list_json(db, "--all")}
    assert set(rows) == {"cli-held", "cli-expired", "cli-released"}
    # The limit counts listed rows: the latest-ending first.
    assert [row["id"] for row in list_json(db, "--limit", "1")] == ["cli-held"]
    row = rows["cli-held"]
    assert row["kind"] == "lock"
    assert row["state"] == "held"
    assert 0 < row["remaining"] <= 300
    assert row["owner"] == named["held"].owner
    assert row["host"] == socket.gethostname()
    assert row["pid"] == os.getpid()
    assert row["fence"] == named["held"].fence
    assert row["acquired_at"] is not None
    assert rows["cli-expired"]["state"] == "expired"
    assert rows["cli-expired"]["remaining"] <= 0
    assert rows["cli-released"]["state"] == "released"
    assert rows["cli-released"]["fence"] == named["released"].fence

    assert db.uri is not None
    # The database named in the URI; a table, not JSON.
    result = run_cli("list", "--uri", with_db(db.uri, db.db_name))
    assert result.returncode == 0, result.stderr
    assert "cli-held" in result.stdout and "cli-expired" in result.stdout
    # Another lock collection is another set of locks: none here.
    assert list_json(db, "--lock-collection", "other_locks") == []


def test_list_unknown_collection(db: LockableDB) -> None:
    assert db.uri is not None
    result = run_cli("list", "--uri", db.uri, "--db", db.db_name, "--collection", "nope")
    assert "nope" in assert_one_line_error(result, 1)


def test_list_by_class_name_says_where_the_documents_are(db: LockableDB) -> None:
    """``--collection CliJob`` names a class, not its collection: the error says
    which collections exist and how MongoEngine names them."""
    assert db.uri is not None
    CliJob(name="x").save()
    result = run_cli("list", "--uri", db.uri, "--db", db.db_name, "--collection", "CliJob")
    message = assert_one_line_error(result, 1)
    assert "'cli_job'" in message and "meta['collection']" in message
    assert "'cli_jobs'" in message  # the close match that exists


def test_list_a_collection_without_leases_says_so(db: LockableDB) -> None:
    assert db.uri is not None
    db.database["plain"].insert_one({"name": "no lease fields here"})
    result = run_cli("list", "--uri", db.uri, "--db", db.db_name, "--collection", "plain")
    assert result.returncode == 0, result.stderr
    assert "none of its documents has a lease field" in result.stdout
    CliJob(name="free").save().lock(30)
    CliJob.objects.get(name="free").release(owner=CliJob.objects.get(name="free").locked_by)
    result = run_cli("list", "--uri", db.uri, "--db", db.db_name, "--collection", "cli_jobs")
    assert "no held or expired leases" in result.stdout and "--all" in result.stdout


def run_in_terminal(*args: str, columns: int = 80, term: str = "xterm") -> str:
    """Run the command line with its output on a terminal ``columns`` wide
    (rich draws tables there, plain text on ``TERM=dumb``); return what it drew."""
    import pty

    primary, secondary = pty.openpty()
    environ = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}
    environ.update(COLUMNS=str(columns), LINES="50", TERM=term)
    proc = subprocess.Popen([sys.executable, "-m", "mongoengine_lockable", *args],
                            stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary,
                            env=environ)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert proc.wait(TIMEOUT) == 0, b"".join(chunks)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())


@pytest.mark.parametrize("term", ["xterm", "dumb"])
def test_list_on_a_narrow_terminal_shows_whole_ids(db: LockableDB, term: str) -> None:
    """On an 80-column terminal the id column is never shortened: each row can
    be told apart and its id pasted into ``release``; another column gives way,
    with rich's table (``xterm``) and without (``dumb``, or rich not installed)."""
    assert db.uri is not None
    docs = [CliJob(name="n" * 40).save() for _ in range(3)]
    for doc in docs:
        assert doc.lock(300, owner="a-rather-long-owner-name-" + "x" * 30)
    drawn = run_in_terminal("list", "--uri", db.uri, "--db", db.db_name,
                            "--collection", "cli_jobs", term=term)
    for doc in docs:
        assert str(doc.pk) in drawn, drawn
    assert max(len(line) for line in drawn.splitlines()) <= 80, drawn


def test_release_of_a_free_lock_releases_nothing(db: LockableDB,
                                                 named: dict[str, NamedLock]) -> None:
    assert db.uri is not None
    lock = NamedLock("cli-free", 60)
    assert lock.acquire()
    lock.release()
    result = run_cli("release", "--force", "--yes", "cli-free", "--uri", db.uri,
                     "--db", db.db_name)
    assert result.returncode == 0, result.stderr
    assert "nothing to release" in result.stdout and "released by its last owner" in result.stdout
    assert "WARNING" not in result.stderr
    result = run_cli("release", "--force", "--yes", "cli-free", "--uri", db.uri,
                     "--db", db.db_name, "--json")
    assert json.loads(result.stdout)["action"] == "none"


def test_min_hold_shows_as_kept_not_held(db: LockableDB) -> None:
    """A finished run under ``min_hold`` is not someone's work in progress: list
    shows it as kept, and an acquisition refused by it says so."""
    assert db.uri is not None
    lock = NamedLock("cli-kept", 60, min_hold=30)
    assert lock.acquire()
    lock.release()
    result = run_cli("list", "--uri", db.uri, "--db", db.db_name, "--json")
    (row,) = [r for r in json.loads(result.stdout) if r["id"] == "cli-kept"]
    assert row["state"] == "kept" and 0 < row["remaining"] <= 30
    from mongoengine_lockable import LockUnavailableError

    with pytest.raises(LockUnavailableError, match="minimum hold of a finished run") as caught:
        with NamedLock("cli-kept", 60):
            pass
    assert caught.value.owner is None


def test_forced_release_passes_the_lease_to_the_next_waiter(db: LockableDB) -> None:
    assert db.uri is not None
    import threading

    holder = NamedLock("cli-queue", 60)
    assert holder.acquire()
    waiter = NamedLock("cli-queue", 60)
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire(wait=60)))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not db.database["lockable_named_locks"].find_one(
                {"_id": "cli-queue", "waiters.0": {"$exists": True}}):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = run_cli("release", "--force", "--yes", "cli-queue", "--uri", db.uri,
                         "--db", db.db_name)
        assert result.returncode == 0, result.stderr
        assert f"passed to the next waiter {waiter.owner}" in result.stdout
    finally:
        thread.join(60)
    assert got == [True]
    assert NamedLock.owner_of("cli-queue") == waiter.owner


# -- release --------------------------------------------------------------------------


def test_release_document_needs_yes(db: LockableDB, leases: dict[str, Any]) -> None:
    assert db.uri is not None
    held = leases["held"]
    result = run_cli("release", "--force", str(held.pk), "--uri", db.uri, "--db", db.db_name,
                     "--collection", "cli_jobs")
    message = assert_one_line_error(result, 2)
    assert "--yes" in message and held.locked_by in message
    stored = CliJob.objects.get(pk=held.pk)
    assert stored.is_locked()
    assert (stored.locked_by, stored.lock_fence) == (held.locked_by, 1)
    # Without --force, not even that.
    result = run_cli("release", "--yes", str(held.pk), "--uri", db.uri, "--db", db.db_name,
                     "--collection", "cli_jobs")
    assert "--force" in assert_one_line_error(result, 2)
    assert CliJob.objects.get(pk=held.pk).is_locked()


def test_release_document(db: LockableDB, leases: dict[str, Any]) -> None:
    assert db.uri is not None
    held = leases["held"]
    result = run_cli("release", "--force", "--yes", str(held.pk), "--uri", db.uri,
                     "--db", db.db_name, "--collection", "cli_jobs")
    assert result.returncode == 0, result.stderr
    assert "released" in result.stdout and held.locked_by in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and held.locked_by in warnings[0], result.stderr
    assert "mongoengine_lockable.cli" in warnings[0]

    stored = CliJob.objects.get(pk=held.pk)
    assert stored.locked_until is None
    assert stored.lock_fence == 1  # kept
    assert not stored.is_locked()
    # The old holder's guarded writes fail; the next holder gets the next fence.
    with pytest.raises(LockNotOwnedError):
        held.update_if_held(set__name="late")
    assert CliJob.objects.get(pk=held.pk).name == "held"
    again = CliJob.objects(pk=held.pk).claim(60)
    assert again is not None and again.lock_fence == 2

    # The others were not touched.
    expired = CliJob.objects.get(pk=leases["expired"].pk)
    assert expired.locked_until is not None


def test_release_document_json_and_int_id(db: LockableDB) -> None:
    assert db.uri is not None
    job = CliIntJob(id=7).save()
    assert job.lock(300)
    result = run_cli("release", "--force", "--yes", "7", "--uri", db.uri, "--db", db.db_name,
                     "--collection", "cli_int_jobs", "--json")
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    assert done["action"] == "released"
    assert done["id"] == 7 and done["kind"] == "document" and done["fence"] == 1
    assert done["previous"]["state"] == "held" and done["previous"]["owner"] == job.locked_by
    assert not CliIntJob.objects.get(pk=7).is_locked()

    unknown = run_cli("release", "--force", "--yes", "8", "--uri", db.uri, "--db", db.db_name,
                      "--collection", "cli_int_jobs")
    assert "8" in assert_one_line_error(unknown, 1)
    missing = run_cli("release", "--force", "--yes", str(ObjectId()), "--uri", db.uri,
                      "--db", db.db_name, "--collection", "cli_int_jobs")
    assert_one_line_error(missing, 1)


def test_release_named_lock(db: LockableDB, named: dict[str, NamedLock]) -> None:
    assert db.uri is not None
    lock = named["held"]
    fence = lock.fence
    assert fence is not None
    refused = run_cli("release", "--force", "cli-held", "--uri", db.uri, "--db", db.db_name)
    assert "--yes" in assert_one_line_error(refused, 2)
    assert NamedLock.owner_of("cli-held") == lock.owner

    result = run_cli("release", "--force", "--yes", "cli-held", "--uri", db.uri,
                     "--db", db.db_name, "--json")
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    assert (done["id"], done["kind"], done["fence"]) == ("cli-held", "lock", fence)
    assert done["previous"]["state"] == "held" and done["previous"]["owner"] == lock.owner
    assert lock.owner in result.stderr and "WARNING" in result.stderr

    assert NamedLock.is_free("cli-held")
    record = db.database["lockable_named_locks"].find_one({"_id": "cli-held"})
    assert record is not None and record["fence"] == fence  # kept
    with pytest.raises(LockNotOwnedError):
        lock.release()
    successor = NamedLock("cli-held", 60)
    assert successor.acquire()
    assert successor.fence is not None and successor.fence > fence

    unknown = run_cli("release", "--force", "--yes", "no-such-lock", "--uri", db.uri,
                      "--db", db.db_name)
    assert "no-such-lock" in assert_one_line_error(unknown, 1)


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["frobnicate"],
        [],
        ["demo", "--jobs", "-5"],
        ["demo", "--workers", "0"],
        ["demo", "--crash-rate", "2"],
        ["demo", "--crash-rate", "-1"],
        ["demo", "--lease", "1", "--work-ms", "900"],
        ["list"],
        ["release", "--force", "--yes"],
    ],
    ids=lambda args: " ".join(args) or "no-command",
)
def test_bad_arguments(args: list[str]) -> None:
    assert_one_line_error(run_cli(*args), 2)


def test_no_database(lockable_mongod_uri: str) -> None:
    message = assert_one_line_error(run_cli("list", "--uri", lockable_mongod_uri), 2)
    assert "--db" in message


@pytest.mark.parametrize(
    "args",
    [
        ["list", "--uri", UNREACHABLE, "--db", "x"],
        ["list", "--db", "x", "--collection", "jobs"],  # the URI from $MONGODB_URI
        ["release", "--force", "--yes", "x", "--uri", UNREACHABLE, "--db", "x"],
        ["demo", "--uri", UNREACHABLE, "--jobs", "10"],
    ],
    ids=["list", "list-env", "release", "demo"],
)
def test_unreachable_server(args: list[str]) -> None:
    result = run_cli(*args, env={"MONGODB_URI": UNREACHABLE})
    assert "cannot reach" in assert_one_line_error(result, 2)


def test_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("demo", "list", "release"):
        assert command in result.stdout
    result = run_cli("demo", "--help")
    assert result.returncode == 0 and "--crash-rate" in result.stdout


# -- demo -----------------------------------------------------------------------------


def _summary_value(stdout: str, label: str) -> int:
    found = re.search(rf"^\s*{re.escape(label)}\s+(\d+)\b", stdout, re.MULTILINE)
    assert found, f"no {label!r} in the summary:\n{stdout}"
    return int(found.group(1))


def test_demo_jobs(lockable_mongod_uri: str) -> None:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(lockable_mongod_uri)
    try:
        before = set(client.list_database_names())
        result = run_cli("demo", "--uri", lockable_mongod_uri, "--jobs", "200", "--workers",
                         "3", "--crash-rate", "0.05", "--seed", "1")
        after = set(client.list_database_names())
    finally:
        client.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "197 of 197 jobs handled exactly once, 3 poison jobs set aside" in result.stdout
    assert _summary_value(result.stdout, "completed exactly once") == 197
    assert _summary_value(result.stdout, "completed more than once") == 0
    assert _summary_value(result.stdout, "set aside") == 3
    crashes = _summary_value(result.stdout, "worker crashes (SIGKILL)")
    # 200 jobs at 5 %: no crash at all has probability 0.95**200 < 1e-4.
    assert crashes > 0
    # Every crash left at least the job in hand held, which had to be taken over.
    assert _summary_value(result.stdout, "claimed again") >= crashes
    # Says where it writes, what worker names mean, and how the workers ended.
    assert re.search(r"^database: lockable_demo_[0-9a-f]+ \(dropped", result.stdout, re.M)
    assert "w1.2, w1.3" in result.stdout
    assert "all 3 workers finished" in result.stdout
    assert "0/3 workers" not in result.stdout
    assert not [name for name in after - before if name.startswith("lockable_demo_")]


def test_demo_cron(lockable_mongod_uri: str) -> None:
    # A database in the URI is not where the demo writes: it makes a fresh one.
    named = "lockable_cli_not_the_demo_db"
    result = run_cli("demo", "--cron", "--uri", with_db(lockable_mongod_uri, named),
                     "--seconds", "4", "--workers", "3", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(lockable_mongod_uri)
    try:
        assert named not in client.list_database_names()
    finally:
        client.close()
    summary = json.loads(result.stdout)
    assert summary["ok"] is True and summary["violations"] == []
    assert len(summary["ticks"]) == 4
    for tick in summary["ticks"]:
        assert len(tick["ran_by"]) == 1
        assert len(tick["fired"]) == 3  # every worker fired; the others skipped


def test_demo_check_finds_violations(db: LockableDB) -> None:
    """The demo's verdict is not vacuous: fabricated records of a job completed
    twice, a job never completed, a repeat without a crash, a take-over before
    the crashed holder's lease ended (server clock), a poison job completed and
    one granted too few times are each caught."""
    from datetime import datetime, timedelta

    jobs, handlings = db.database["demo_jobs"], db.database["demo_handlings"]
    base = datetime(2030, 1, 1)

    def attempt(job: int, worker: str, fence: int, completed: bool, *, granted: float = 0,
                **more: Any) -> dict[str, Any]:
        # Grants 10 s apart by default, each a 1 s lease: no overlap.
        at = base + timedelta(seconds=granted or 10 * fence)
        return {"job": job, "n": job, "worker": worker, "pid": 1, "fence": fence,
                "completed": completed, "started_at": at, "lease_ms": 1000,
                "until": at + timedelta(seconds=1), **more}

    jobs.insert_many([
        {"_id": 1, "n": 1, "status": "done", "handled_by": ["w1"], "lock_fence": 2},
        {"_id": 2, "n": 2, "status": "done", "handled_by": ["w1", "w2"], "lock_fence": 2},
        {"_id": 3, "n": 3, "status": "pending", "handled_by": [], "lock_fence": 1},
        {"_id": 4, "n": 4, "status": "done", "handled_by": ["w2"], "lock_fence": 2},
        {"_id": 5, "n": 5, "status": "done", "handled_by": ["w2"], "lock_fence": 2},
        {"_id": 6, "n": 6, "status": "pending", "poison": True, "lock_fence": 2},
        {"_id": 7, "n": 7, "status": "done", "poison": True, "handled_by": ["w1"],
         "lock_fence": 2},
        {"_id": 8, "n": 8, "status": "pending", "poison": True, "lock_fence": 1},
    ])
    handlings.insert_many([
        attempt(1, "w9", 1, False), attempt(1, "w1", 2, True),   # after a crash: fine
        attempt(2, "w1", 1, True), attempt(2, "w2", 2, True),    # completed twice
        attempt(3, "w1", 1, False),                              # never completed
        attempt(4, "w3", 1, False), attempt(4, "w2", 2, True),   # repeat, no crash
        attempt(5, "w9", 1, False, granted=100),                 # crashed holder's lease
        attempt(5, "w2", 2, True, granted=100.5),                # taken 0.5 s too early
        attempt(6, "w1", 1, False, outcome="failed"),            # poison, set aside: fine
        attempt(6, "w2", 2, False, outcome="failed"),
        attempt(7, "w1", 1, False, outcome="failed"),            # poison completed
        attempt(7, "w1", 2, True),
        attempt(8, "w1", 1, False, outcome="failed"),            # poison granted once only
    ])
    report = JobsReport(jobs=8, workers=2, lease=1, work_ms=1, crash_rate=0, seed=0,
                        poison=3, max_attempts=2)
    _check_jobs(report, db.database, crashed={"w9"}, max_examples=5)
    counts = report.counts
    assert (counts["completed_once"], counts["completed_more"], counts["never_completed"]) == (
        3, 1, 1)
    assert (counts["repeats_after_crash"], counts["repeats_other"]) == (2, 2)
    assert report.set_aside == [6]
    assert len(report.violations) == 7, report.violations
    early = [v for v in report.violations if "before the lease of fence 1 ended" in v]
    assert [v.split()[1] for v in early] == ["5"]
    assert not report.ok
    assert [(t.n, t.crashed_worker, t.worker) for t in report.examples] == [
        (1, "w9", "w1"), (5, "w9", "w2")]


def test_list_and_release_semaphore_and_read_write_holders(db: LockableDB) -> None:
    """Each holder of a semaphore or a read/write lock is a row; release
    --force evicts one holder, picked with --owner when there are several."""
    from mongoengine_lockable import NamedSemaphore, ReadWriteLock

    assert db.uri is not None
    holders = [NamedSemaphore("cli-sem", 3, 60, owner=f"worker-{i}") for i in range(2)]
    for holder in holders:
        assert holder.acquire()
    catalog = ReadWriteLock("cli-rw", 60)
    reader = catalog.reader()
    assert reader.acquire()
    result = run_cli("list", "--uri", db.uri, "--db", db.db_name, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    sem_rows = [r for r in rows if r["id"] == "cli-sem"]
    assert sorted(r["owner"] for r in sem_rows) == ["worker-0", "worker-1"]
    assert {r["kind"] for r in sem_rows} == {"semaphore"}
    assert all(r["state"] == "held" and 0 < r["remaining"] <= 60 for r in sem_rows)
    (rw_row,) = [r for r in rows if r["id"] == "cli-rw"]
    assert (rw_row["kind"], rw_row["mode"], rw_row["owner"]) == ("rwlock", "reader", reader.owner)
    table = run_cli("list", "--uri", db.uri, "--db", db.db_name)
    assert "worker-0 (1 of 3)" in table.stdout and f"{reader.owner} (reader)" in table.stdout

    several = run_cli("release", "--force", "--yes", "cli-sem", "--uri", db.uri,
                      "--db", db.db_name)
    message = assert_one_line_error(several, 2)
    assert "--owner" in message and "worker-0" in message and "worker-1" in message
    result = run_cli("release", "--force", "--yes", "cli-sem", "--owner", "worker-1",
                     "--uri", db.uri, "--db", db.db_name)
    assert result.returncode == 0, result.stderr
    assert NamedSemaphore.holders("cli-sem") == ["worker-0"]
    with pytest.raises(LockNotOwnedError):
        holders[1].release()
    holders[0].release()
    result = run_cli("release", "--force", "--yes", "cli-rw", "--uri", db.uri,
                     "--db", db.db_name)
    assert result.returncode == 0, result.stderr
    assert not reader.owned()
    # Nobody holds either now: listed with --all only, the semaphore as free.
    listed = run_cli("list", "--uri", db.uri, "--db", db.db_name, "--json")
    assert {r["id"] for r in json.loads(listed.stdout)} & {"cli-sem", "cli-rw"} == set()
    listed = run_cli("list", "--uri", db.uri, "--db", db.db_name, "--json", "--all")
    assert [r["state"] for r in json.loads(listed.stdout) if r["id"] == "cli-sem"] == ["free"]
