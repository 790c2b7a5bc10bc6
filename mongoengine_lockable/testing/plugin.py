"""pytest plugin: fixtures for tests against a real ``mongod`` and mongomock.

Registered through the ``pytest11`` entry point, so installing the package is
enough. Fixtures:

``lockable_mongod_uri`` (session)
    The URI of a real server: ``MONGODB_URI`` if set (it must not name a
    database), else a single-node replica set started for the session. With no
    ``mongod`` to be found the tests that need it are skipped, or fail when
    ``LOCKABLE_REQUIRE_MONGOD=1`` (as in CI).
``lockable_real_db`` / ``lockable_mongomock_db`` (function)
    MongoEngine's ``default`` alias connected to a fresh database for this
    test, dropped afterwards; yields a :class:`~mongoengine_lockable.testing.LockableDB`.
``lockable_db`` (function, parametrized ``mongomock`` / ``mongod``)
    One of the two: a test that takes it runs on both backends.

Tests that use the real server are marked ``mongod``, so ``-m "not mongod"``
runs the mongomock half alone.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator
from typing import Any, Literal, cast

import pytest

from mongoengine_lockable.testing import (
    LockableDB,
    MongodNotFoundError,
    MongodReplicaSet,
    find_mongod,
)

__all__ = [
    "lockable_db",
    "lockable_mongod_uri",
    "lockable_mongomock_db",
    "lockable_real_db",
]

URI_ENV = "MONGODB_URI"
REQUIRE_ENV = "LOCKABLE_REQUIRE_MONGOD"
ALIAS = "default"
_BACKEND_FIXTURES = {"mongomock": "lockable_mongomock_db", "mongod": "lockable_real_db"}


def pytest_configure(config: pytest.Config) -> None:
    """Declare the marker this plugin sets, for ``--strict-markers`` users."""
    config.addinivalue_line("markers", "mongod: the test runs against a real MongoDB server")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``mongod`` every test that will talk to the real server."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        callspec = getattr(item, "callspec", None)
        param = callspec.params.get("lockable_db") if callspec is not None else None
        if "lockable_mongod_uri" in fixtures or param == "mongod":
            item.add_marker(pytest.mark.mongod)


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _uri_database(uri: str) -> str | None:
    """Return the database a MongoDB URI names in its path, if any.

    Parsed by hand: pymongo's parser resolves ``mongodb+srv`` names over DNS.
    """
    rest = uri.split("://", 1)[-1].split("?", 1)[0]
    path = rest.rsplit("@", 1)[-1].partition("/")[2]
    return path or None


@pytest.fixture(scope="session")
def lockable_mongod_uri() -> Iterator[str]:
    """The URI of a real MongoDB replica set for this test session.

    :return: ``MONGODB_URI`` when set, else the URI of a single-node replica
        set started now and stopped at the end of the session.
    """
    configured = os.environ.get(URI_ENV)
    if configured:
        database = _uri_database(configured)
        if database is not None:
            pytest.fail(
                f"{URI_ENV} names the database {database!r}; the fixtures create (and "
                "drop) one database per test, so leave it out (use ?authSource= to "
                "authenticate against it)",
                pytrace=False,
            )
        yield configured
        return
    replica_set = start_replica_set_or_skip(1)
    try:
        yield replica_set.uri
    finally:
        replica_set.stop()


def start_replica_set_or_skip(members: int) -> MongodReplicaSet:
    """Start a temporary replica set of ``members`` for a test or fixture.

    Without a ``mongod`` binary (or mirakuru), skips the test with the reason,
    or fails it when ``LOCKABLE_REQUIRE_MONGOD`` is set.

    :return: the started set; the caller stops it.
    """
    problem: str | None = None
    try:
        binary = find_mongod()
    except MongodNotFoundError as exc:
        problem = str(exc)
    if problem is None and importlib.util.find_spec("mirakuru") is None:
        problem = "mirakuru is not installed (pip install 'mongoengine-lockable[test]')"
    if problem is not None:
        reason = (
            f"no MongoDB server for the tests: {problem}. Or set {URI_ENV} to use a running one."
        )
        if _required():
            pytest.fail(
                f"{reason} ({REQUIRE_ENV} is set: a real server is required)", pytrace=False
            )
        pytest.skip(reason)
    return MongodReplicaSet(members, binary=binary).start()


def _connected(
    backend: Literal["mongod", "mongomock"], uri: str | None, **settings: Any
) -> Iterator[LockableDB]:
    """Connect MongoEngine's default alias to a new database; drop it afterwards."""
    import mongoengine
    from mongoengine.connection import ConnectionFailure

    db_name = f"lockable_test_{uuid.uuid4().hex[:12]}"
    # A connection left under the alias would make connect() fail (other
    # settings) or be reused (same settings, other database).
    mongoengine.disconnect(ALIAS)
    mongoengine.connect(db=db_name, alias=ALIAS, uuidRepresentation="standard", **settings)
    try:
        yield LockableDB(backend=backend, uri=uri, db_name=db_name, alias=ALIAS)
    finally:
        try:
            mongoengine.get_connection(ALIAS).drop_database(db_name)
        except ConnectionFailure:
            pass  # the test disconnected the alias itself
        finally:
            # Also forgets the collections cached on Document classes, so the
            # next test's connection is the one they use.
            mongoengine.disconnect(ALIAS)


@pytest.fixture
def lockable_real_db(lockable_mongod_uri: str) -> Iterator[LockableDB]:
    """MongoEngine connected to a new database on the real server.

    :return: a :class:`LockableDB` with ``backend="mongod"``.
    """
    yield from _connected("mongod", lockable_mongod_uri, host=lockable_mongod_uri)


@pytest.fixture
def lockable_mongomock_db() -> Iterator[LockableDB]:
    """MongoEngine connected to a new mongomock database.

    :return: a :class:`LockableDB` with ``backend="mongomock"`` and ``uri=None``.
    """
    mongomock = pytest.importorskip("mongomock")
    yield from _connected(
        "mongomock", None, host="mongodb://localhost", mongo_client_class=mongomock.MongoClient
    )


@pytest.fixture(params=list(_BACKEND_FIXTURES), ids=list(_BACKEND_FIXTURES))
def lockable_db(request: pytest.FixtureRequest) -> LockableDB:
    """The test runs twice: on mongomock and on the real server.

    :return: the :class:`LockableDB` of :func:`lockable_mongomock_db` or
        :func:`lockable_real_db`.
    """
    backend: str = request.param
    return cast(LockableDB, request.getfixturevalue(_BACKEND_FIXTURES[backend]))
