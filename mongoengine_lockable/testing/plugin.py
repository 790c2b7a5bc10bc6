"""pytest plugin: fixtures for tests against a real ``mongod`` and mongomock.

Registered through the ``pytest11`` entry point, so installing the package is
enough. Fixtures:

``lockable_mongod_uri`` (session)
    The URI of a real server: the one ``LOCKABLE_TEST_MONGODB_URI`` names
    (pinged for 2 s at most; unreachable is an error), else a single-node
    replica set started for the session. With no ``mongod`` to be found the
    tests that need it are skipped, or fail when ``LOCKABLE_REQUIRE_MONGOD=1``
    (as in CI).
``lockable_real_db`` / ``lockable_mongomock_db`` (function)
    The MongoEngine alias connected to a fresh database for this test, dropped
    afterwards; yields a :class:`~mongoengine_lockable.testing.LockableDB`.
``lockable_db`` (function, parametrized ``mongomock`` / ``mongod``)
    One of the two: a test that takes it runs on both backends.
``lockable_alias`` (function)
    The MongoEngine alias the database fixtures connect: ``--lockable-alias``,
    else the ``lockable_alias`` ini option, else ``default``. Override the
    fixture (or parametrize it) for one module or test.

A connection the user registered under that alias before the test is set aside
for the test and put back afterwards, untouched (its client is not closed).

Tests that use the real server are marked ``mongod``, so ``-m "not mongod"``
runs the mongomock half alone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import uuid
from collections.abc import Iterator
from typing import Any, Literal, cast

import pytest

from mongoengine_lockable._uri import MAX_DATABASE_BYTES, split_uri_database
from mongoengine_lockable.testing import (
    LockableDB,
    MongodNotFoundError,
    MongodReplicaSet,
    find_mongod,
)

__all__ = [
    "lockable_alias",
    "lockable_db",
    "lockable_mongod_uri",
    "lockable_mongomock_db",
    "lockable_real_db",
]

#: The server the real-server fixtures use instead of starting one.
URI_ENV = "LOCKABLE_TEST_MONGODB_URI"
#: When true, a backend the tests ask for (mongod, mongomock) must be there.
REQUIRE_ENV = "LOCKABLE_REQUIRE_MONGOD"
ALIAS_OPTION = "lockable_alias"
DEFAULT_ALIAS = "default"
#: Per-test database names: ``<prefix>_<12 hex digits>``.
DEFAULT_DB_PREFIX = "lockable_test"
#: How long a configured server gets to answer the first ping.
PING_TIMEOUT_S = 2.0
_SUFFIX_BYTES = 13  # "_" and 12 hex digits
_BACKEND_FIXTURES = {"mongomock": "lockable_mongomock_db", "mongod": "lockable_real_db"}


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--lockable-alias`` and the ``lockable_alias`` ini option."""
    help_text = (
        "MongoEngine connection alias that the mongoengine-lockable database "
        f"fixtures connect (default: {DEFAULT_ALIAS!r})"
    )
    parser.addini(ALIAS_OPTION, help_text, default=None)
    parser.getgroup("mongoengine-lockable").addoption(
        "--lockable-alias", dest=ALIAS_OPTION, default=None, metavar="ALIAS", help=help_text
    )


def pytest_configure(config: pytest.Config) -> None:
    """Declare the marker this plugin sets and check the alias option."""
    config.addinivalue_line("markers", "mongod: the test runs against a real MongoDB server")
    try:
        _check_alias(_configured_alias(config))
    except (TypeError, ValueError) as exc:
        raise pytest.UsageError(f"mongoengine-lockable: {exc}") from None


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


def _configured_alias(config: pytest.Config) -> Any:
    option = config.getoption(ALIAS_OPTION, default=None)
    if option is not None:
        return option
    ini = config.getini(ALIAS_OPTION)
    return ini if ini else DEFAULT_ALIAS


def _check_alias(alias: Any) -> str:
    if not isinstance(alias, str):
        raise TypeError(f"the lockable alias must be a str, not {type(alias).__name__}")
    if not alias.strip():
        raise ValueError("the lockable alias must be a non-empty string")
    return alias


def _hosts(uri: str) -> str:
    """The hosts of a URI, without credentials or options (for messages)."""
    rest = uri.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0]
    return rest.rsplit("@", 1)[-1] or "?"


def _unavailable(reason: str) -> None:
    """Skip the test, or fail it when a real server is required."""
    if _required():
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set: this is an error)", pytrace=False)
    pytest.skip(reason)


def _ping(uri: str) -> None:
    """Fail at once when the configured server does not answer a ping."""
    from pymongo import MongoClient
    from pymongo.errors import ConfigurationError, PyMongoError

    millis = int(PING_TIMEOUT_S * 1000)
    try:
        client: MongoClient[dict[str, Any]] = MongoClient(
            uri, serverSelectionTimeoutMS=millis, connectTimeoutMS=millis, socketTimeoutMS=millis
        )
    except (ConfigurationError, ValueError, TypeError) as exc:
        pytest.fail(f"{URI_ENV} is not a usable MongoDB URI: {exc}", pytrace=False)
    try:
        client.admin.command("ping")
    except PyMongoError as exc:
        reason = " ".join(str(exc).split(", Timeout:", 1)[0].split())
        pytest.fail(
            f"{URI_ENV} names {_hosts(uri)}, which did not answer a ping within "
            f"{PING_TIMEOUT_S:g} s ({reason}). Start that server, correct the URI, or "
            f"unset {URI_ENV} to let the tests start a temporary mongod.",
            pytrace=False,
        )
    finally:
        client.close()


def _configured_server() -> tuple[str, str] | None:
    """``(server URI, database prefix)`` from :data:`URI_ENV`, if it is set."""
    configured = os.environ.get(URI_ENV, "").strip()
    if not configured:
        return None
    try:
        server, database = split_uri_database(configured)
    except ValueError as exc:
        pytest.fail(f"{URI_ENV}: {exc}", pytrace=False)
    prefix = database or DEFAULT_DB_PREFIX
    if len(prefix.encode("utf-8")) > MAX_DATABASE_BYTES - _SUFFIX_BYTES:
        pytest.fail(
            f"{URI_ENV} names the database {database!r}, the prefix of the per-test "
            f"databases: at most {MAX_DATABASE_BYTES - _SUFFIX_BYTES} bytes leave room "
            "for their suffix",
            pytrace=False,
        )
    return server, prefix


@pytest.fixture(scope="session")
def lockable_mongod_uri() -> Iterator[str]:
    """The URI of a real MongoDB server for this test session.

    :return: the server of ``LOCKABLE_TEST_MONGODB_URI`` (without the database
        it may name, see :func:`~mongoengine_lockable._uri.split_uri_database`)
        when set, else the URI of a single-node replica set started now and
        stopped at the end of the session.
    """
    configured = _configured_server()
    if configured is not None:
        _ping(configured[0])
        yield configured[0]
        return
    replica_set = start_replica_set_or_skip(1)
    try:
        yield replica_set.uri
    finally:
        replica_set.stop()


@pytest.fixture(scope="session")
def _lockable_db_prefix() -> str:
    configured = _configured_server()
    return DEFAULT_DB_PREFIX if configured is None else configured[1]


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
        _unavailable(
            f"no MongoDB server for the tests: {problem}. Or set {URI_ENV} to use a running one."
        )
    return MongodReplicaSet(members, binary=binary).start()


@contextlib.contextmanager
def _alias_set_aside(alias: str) -> Iterator[None]:
    """Set aside the user's connection under ``alias`` for the ``with`` body.

    MongoEngine keeps a connection in three registries (settings, client,
    database). :func:`mongoengine.disconnect` would close the user's client,
    so its entries are taken out as they are and put back afterwards; the
    collections cached on document classes are dropped both times, so that
    documents follow whichever connection is current.
    """
    from mongoengine import connection

    registries: list[dict[str, Any]] = [
        connection._connection_settings,
        connection._connections,
        connection._dbs,
    ]
    saved = [(registry, registry.pop(alias)) for registry in registries if alias in registry]
    _forget_collections(alias)
    try:
        yield
    finally:
        # Closes our client (unless another alias shares it) and forgets ours.
        connection.disconnect(alias)
        for registry, entry in saved:
            registry[alias] = entry
        _forget_collections(alias)


def _forget_collections(alias: str) -> None:
    """Drop the collection cached on every document class of ``alias``.

    Every subclass of ``Document`` is visited, not MongoEngine's registry of
    classes by name: two classes with one name (a test's ``Job`` and an
    example's) would leave one of them pointing at an old database.
    """
    from mongoengine import Document
    from mongoengine.connection import DEFAULT_CONNECTION_NAME

    seen: set[type] = set()
    stack: list[type] = [Document]
    while stack:
        subclass: type
        for subclass in stack.pop().__subclasses__():
            if subclass in seen:
                continue
            seen.add(subclass)
            stack.append(subclass)
            doc_cls: Any = subclass
            meta = getattr(doc_cls, "_meta", None) or {}
            if meta.get("db_alias", DEFAULT_CONNECTION_NAME) == alias:
                doc_cls._collection = None  # as Document._disconnect() does


def _connected(
    backend: Literal["mongod", "mongomock"],
    uri: str | None,
    alias: str,
    prefix: str,
    **settings: Any,
) -> Iterator[LockableDB]:
    """Connect ``alias`` to a new database; drop it and restore the alias afterwards."""
    import mongoengine
    from mongoengine.connection import ConnectionFailure

    alias = _check_alias(alias)
    db_name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with _alias_set_aside(alias):
        mongoengine.connect(db=db_name, alias=alias, uuidRepresentation="standard", **settings)
        try:
            yield LockableDB(backend=backend, uri=uri, db_name=db_name, alias=alias)
        finally:
            with contextlib.suppress(ConnectionFailure):  # the test disconnected it
                mongoengine.get_connection(alias).drop_database(db_name)


@pytest.fixture
def lockable_alias(request: pytest.FixtureRequest) -> str:
    """The MongoEngine alias that the database fixtures connect.

    ``--lockable-alias``, else the ``lockable_alias`` ini option, else
    ``"default"``. Override this fixture in a ``conftest.py`` or parametrize
    it (``@pytest.mark.parametrize("lockable_alias", ["reports"])``) to use
    another alias for some tests.
    """
    return _check_alias(_configured_alias(request.config))


@pytest.fixture
def lockable_real_db(
    lockable_mongod_uri: str, lockable_alias: str, _lockable_db_prefix: str
) -> Iterator[LockableDB]:
    """MongoEngine connected to a new database on the real server.

    :return: a :class:`LockableDB` with ``backend="mongod"``.
    """
    yield from _connected(
        "mongod", lockable_mongod_uri, lockable_alias, _lockable_db_prefix, host=lockable_mongod_uri
    )


@pytest.fixture
def lockable_mongomock_db(lockable_alias: str) -> Iterator[LockableDB]:
    """MongoEngine connected to a new mongomock database.

    A missing mongomock skips the test, or fails it when
    ``LOCKABLE_REQUIRE_MONGOD`` is set.

    :return: a :class:`LockableDB` with ``backend="mongomock"`` and ``uri=None``.
    """
    try:
        import mongomock
    except ImportError as exc:
        _unavailable(
            f"mongomock cannot be imported ({exc}): pip install 'mongoengine-lockable[test]'"
        )
    yield from _connected(
        "mongomock",
        None,
        lockable_alias,
        DEFAULT_DB_PREFIX,
        host="mongodb://localhost",
        mongo_client_class=mongomock.MongoClient,
    )


@pytest.fixture(params=list(_BACKEND_FIXTURES), ids=list(_BACKEND_FIXTURES))
def lockable_db(request: pytest.FixtureRequest) -> LockableDB:
    """The test runs twice: on mongomock and on the real server.

    :return: the :class:`LockableDB` of :func:`lockable_mongomock_db` or
        :func:`lockable_real_db`.
    """
    backend: str = request.param
    return cast(LockableDB, request.getfixturevalue(_BACKEND_FIXTURES[backend]))
