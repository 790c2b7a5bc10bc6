"""The database-name rule shared by the command line and the pytest plugin."""

from __future__ import annotations

import doctest

import pytest
from pymongo.uri_parser import parse_uri

import mongoengine_lockable._uri as uri_module
from mongoengine_lockable._uri import UriDatabase, split_uri_database


@pytest.mark.parametrize(
    ("uri", "server", "database"),
    [
        ("mongodb://h", "mongodb://h", None),
        ("mongodb://h:27017/", "mongodb://h:27017/", None),
        ("mongodb://h/?replicaSet=rs0", "mongodb://h/?replicaSet=rs0", None),
        ("mongodb://h1,h2/shop?replicaSet=rs0", "mongodb://h1,h2/?replicaSet=rs0", "shop"),
        ("mongodb://h/shop", "mongodb://h/", "shop"),
        # MongoDB authenticates against the path database when authSource is absent.
        ("mongodb://u:p@h/shop", "mongodb://u:p@h/?authSource=shop", "shop"),
        (
            "mongodb://u:p@h/shop?authSource=admin&w=1",
            "mongodb://u:p@h/?authSource=admin&w=1",
            "shop",
        ),
        ("mongodb+srv://u:p@cluster.example.net/", "mongodb+srv://u:p@cluster.example.net/", None),
        (
            "mongodb+srv://u:p@cluster.example.net/app?retryWrites=true",
            "mongodb+srv://u:p@cluster.example.net/?retryWrites=true&authSource=app",
            "app",
        ),
        ("MONGODB://h/x", "MONGODB://h/", "x"),
        ("mongodb://h/caf%C3%A9", "mongodb://h/", "café"),
        ("mongodb://h/?", "mongodb://h/?", None),
    ],
)
def test_split(uri: str, server: str, database: str | None):
    assert split_uri_database(uri) == UriDatabase(server, database)
    assert split_uri_database(uri).server == server


@pytest.mark.parametrize(
    "uri",
    [
        "mongodb://u:p@h1:1,h2:2/shop?replicaSet=rs0",
        "mongodb://h/shop?authSource=admin",
        "mongodb://u:p@h/shop",
        "mongodb://h/",
    ],
)
def test_agrees_with_pymongo(uri: str):
    parsed = parse_uri(uri)
    server, database = split_uri_database(uri)
    assert database == parsed["database"]
    parsed_server = parse_uri(server)
    assert parsed_server["database"] is None
    assert parsed_server["nodelist"] == parsed["nodelist"]
    assert parsed_server["username"] == parsed["username"]
    # Authentication is unchanged by taking the database out.
    source = lambda p: p["options"].get("authSource", p["database"])  # noqa: E731
    if parsed["username"]:
        assert source(parsed_server) == source(parsed)


@pytest.mark.parametrize(
    ("uri", "error", "message"),
    [
        (None, TypeError, "must be a str, not NoneType"),
        (b"mongodb://h", TypeError, "must be a str, not bytes"),
        ("", ValueError, "not a MongoDB URI"),
        ("http://h/db", ValueError, "not a MongoDB URI"),
        ("localhost:27017", ValueError, "not a MongoDB URI"),
        ("mongodb://", ValueError, "names no host"),
        ("mongodb://u:p@/db", ValueError, "names no host"),
        ("mongodb://h/a.b", ValueError, "does not allow"),
        ("mongodb://h/a%20b", ValueError, "does not allow"),
        ("mongodb://h/a$b", ValueError, "does not allow"),
        ("mongodb://h/a%2Fb", ValueError, "does not allow"),
        ("mongodb://h/" + "d" * 64, ValueError, "longer than 63 bytes"),
    ],
)
def test_bad_uris(uri: object, error: type[Exception], message: str):
    with pytest.raises(error, match=message):
        split_uri_database(uri)  # type: ignore[arg-type]


def test_the_longest_database_name():
    assert split_uri_database("mongodb://h/" + "d" * 63).database == "d" * 63


def test_docstring_examples():
    result = doctest.testmod(uri_module)
    assert result.attempted >= 3
    assert result.failed == 0
