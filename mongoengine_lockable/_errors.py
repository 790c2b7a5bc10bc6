"""Exceptions raised by mongoengine_lockable.

The tree::

    LockError                       base of everything raised about a lease
    ├── LockUnavailableError        (also a TimeoutError) another holder kept the
    │                               lease for the whole wait
    ├── LockNotOwnedError           the caller does not hold an unexpired lease
    └── UnsavedDocumentError        a document without a primary key cannot be locked

Argument errors are plain :class:`TypeError` / :class:`ValueError`, raised before
anything is sent to the database.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LockError",
    "LockNotOwnedError",
    "LockUnavailableError",
    "UnsavedDocumentError",
]


class LockError(Exception):
    """Base class of every lease error.

    :ivar target: the document's primary key, or the lock's name.
    :ivar owner: the owner the error is about (the caller's, or the current
        holder's for :class:`LockUnavailableError`), when known.
    """

    def __init__(self, message: str, *, target: Any = None, owner: str | None = None) -> None:
        super().__init__(message)
        self.target = target
        self.owner = owner


class LockUnavailableError(LockError, TimeoutError):
    """Another holder's lease stayed unexpired for the whole wait.

    ``owner`` is the holder seen at the last attempt, when it could be read.
    """


class LockNotOwnedError(LockError):
    """The caller does not hold an unexpired lease (never held, released,
    expired, or taken over)."""


class UnsavedDocumentError(LockError):
    """The document has no primary key yet: save it before locking it."""


def held_by(holder: str | None) -> str:
    """How an unavailable lease's holder reads in an error message."""
    if holder is None:
        return "was held (it is free now: try again)"
    return f"is held by {holder!r}"
