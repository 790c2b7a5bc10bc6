"""Leases for MongoEngine documents and named locks, claimed atomically in MongoDB.

::

    class Job(LockableMixin, Document):
        payload = StringField()

    if job.lock(30):
        try:
            ...  # only this caller handles the job
        finally:
            job.release()

    job = Job.objects(status="pending").claim(60)   # SKIP LOCKED for MongoDB
"""

from . import signals
from ._errors import LockError, LockNotOwnedError, LockUnavailableError, UnsavedDocumentError
from ._exclusive import exclusive
from ._mixin import LockableMixin
from ._named import NamedLock
from ._queryset import LockableQuerySet
from ._shared import NamedSemaphore, ReadWriteLock
from ._version import __version__

__all__ = [
    "LockError",
    "LockNotOwnedError",
    "LockUnavailableError",
    "LockableMixin",
    "LockableQuerySet",
    "NamedLock",
    "NamedSemaphore",
    "ReadWriteLock",
    "UnsavedDocumentError",
    "__version__",
    "exclusive",
    "signals",
]
