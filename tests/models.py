"""The document classes of the tests, and the helpers they use to look at the
database behind the library's back.

Every document class of the test suite is here, for the tests and for the
worker processes they start (``tests/workers.py``) alike: first those several
test modules share, then those of one test module each, under its name. The
exceptions are classes whose creation a test is about (a definition that must
raise, a framework's document in ``test_frameworks.py``) and those of the
inner sessions that ``test_testing_harness.py`` runs: they are defined where
they are tested.

Every class has its own collection, so that tests of one never see another's
documents (each test gets a fresh database from the ``lockable_db`` fixture).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mongoengine
from mongoengine import Document, IntField, StringField
from pymongo import monitoring
from pymongo.write_concern import WriteConcern

from mongoengine_lockable import LockableMixin, LockableQuerySet


class Job(LockableMixin, Document):
    """The plain case: mixing in is all it takes."""

    payload = StringField()
    status = StringField(default="pending")
    tries = IntField(default=0)
    priority = IntField(default=0)

    meta = {"collection": "test_jobs"}


class OrderedJob(LockableMixin, Document):
    """``meta['ordering']``: claims take the highest priority first."""

    payload = StringField()
    priority = IntField(default=0)

    meta = {"collection": "test_ordered_jobs", "ordering": ["-priority"]}


class Task(LockableMixin, Document):
    """An ``allow_inheritance`` base: subclasses share its collection."""

    payload = StringField()
    status = StringField(default="pending")

    meta = {"collection": "test_tasks", "allow_inheritance": True}


class EmailTask(Task):
    """A subclass stored in :class:`Task`'s collection (with ``_cls``)."""

    address = StringField()


class PendingQuerySet(LockableQuerySet):
    """A user's own queryset class, as the docs tell them to write it."""

    def pending(self) -> PendingQuerySet:
        return self.filter(status="pending")  # type: ignore[no-any-return]


class CustomQSJob(LockableMixin, Document):
    """A document with its own ``queryset_class`` (a ``LockableQuerySet``)."""

    payload = StringField()
    status = StringField(default="pending")

    meta = {"collection": "test_custom_qs_jobs", "queryset_class": PendingQuerySet}


class W1Job(LockableMixin, Document):
    """Lease changes acknowledged by the primary alone."""

    payload = StringField()

    lock_write_concern = WriteConcern(w=1)

    meta = {"collection": "test_w1_jobs"}


class StatusJob(LockableMixin, Document):
    """A queue with the compound index a ``status`` filter needs for its claims."""

    payload = StringField()
    status = StringField(default="pending")

    meta = {"collection": "test_status_jobs", "indexes": [("status", "locked_until")]}


class KeyedJob(LockableMixin, Document):
    """A document whose primary key is a string of its own, not an ObjectId."""

    key = StringField(primary_key=True)
    payload = StringField()

    meta = {"collection": "test_keyed_jobs"}


class TenantJob(LockableMixin, Document):
    """A document declaring a shard key: lease filters must name it too."""

    tenant = StringField(required=True)
    payload = StringField()
    status = StringField(default="pending")

    meta = {"collection": "test_tenant_jobs", "shard_key": ("tenant",)}


#: The connection alias of :class:`AliasedJob`, which the tests using it
#: connect themselves (see :func:`recorded_alias`).
OWN_ALIAS = "lockable-own-alias"


class AliasedJob(LockableMixin, Document):
    """A :class:`Job` on a connection alias of its own, for tests that manage
    their connection (and its command listener) themselves."""

    payload = StringField()
    status = StringField(default="pending")

    meta = {"collection": "test_aliased_jobs", "db_alias": OWN_ALIAS}


ALL_MODELS = (
    Job,
    OrderedJob,
    Task,
    EmailTask,
    CustomQSJob,
    W1Job,
    StatusJob,
    KeyedJob,
    TenantJob,
    AliasedJob,
)


# -- the models of one test module each -----------------------------------------
#
# Each has a collection of its own too. The ones that worker processes
# (``tests/workers.py``) share with their test are here for both sides.

# test_ambiguous.py


class Ticket(LockableMixin, Document):
    n = IntField()
    meta = {"collection": "ambiguous_tickets"}


# test_bad_input_table.py


class Item(LockableMixin, Document):
    name = StringField()
    status = StringField(default="new")
    tries = IntField(default=0)

    meta = {"collection": "test_bad_input_table_items"}


class UnacknowledgedItem(LockableMixin, Document):
    """Lease writes with ``w=0``: the server sends no reply, so a grant cannot
    be told from a refusal."""

    name = StringField()

    lock_write_concern = WriteConcern(w=0)

    meta = {"collection": "test_bad_input_table_w0_items"}


# test_celery.py (its tasks, in ``tests/celery_app.py``, run in Celery workers)

#: Collections of the test database written by :meth:`Account.sync`.
ACCOUNT_RUNS = "celery_runs"
ACCOUNT_GATES = "celery_gates"
#: Longest a sync waits for its gate.
ACCOUNT_GATE_TIMEOUT = 120.0


class Account(Document):
    """What the recipe's ``sync_account`` task syncs."""

    id = IntField(primary_key=True)

    meta = {"collection": "celery_accounts"}

    def sync(self) -> None:
        """Record the start, wait until the test opens this account's gate,
        record the end."""
        db = mongoengine.get_db()
        db[ACCOUNT_RUNS].insert_one({"account": self.pk, "event": "start", "pid": os.getpid()})
        deadline = time.monotonic() + ACCOUNT_GATE_TIMEOUT
        while db[ACCOUNT_GATES].find_one({"_id": self.pk}) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gate of account {self.pk} stayed closed")
            time.sleep(0.02)
        db[ACCOUNT_RUNS].insert_one({"account": self.pk, "event": "end", "pid": os.getpid()})


# test_cli.py


class CliJob(LockableMixin, Document):
    """Documents whose leases the tests list and release."""

    name = StringField()
    meta = {"collection": "cli_jobs"}


class CliIntJob(LockableMixin, Document):
    """A collection with integer ids, for ``release`` of a numeric ID."""

    id = IntField(primary_key=True)
    meta = {"collection": "cli_int_jobs"}


# test_clock_skew.py (and its ``clock_skew`` workers)


class SkewDoc(LockableMixin, Document):
    """Documents leased by processes whose clocks are wrong."""

    group = StringField(required=True)

    meta = {"collection": "skew_docs", "indexes": [("group", "locked_until")]}


# test_failover.py (its ``failover`` workers)


class FailoverDoc(LockableMixin, Document):
    """The document whose lease the fail-over workers pass around."""

    name = StringField()

    meta = {"collection": "failover_docs"}


# test_fairness.py (and its ``fair_waiter`` workers)


class FairJob(LockableMixin, Document):
    n = IntField(default=0)
    meta = {"collection": "test_fair_jobs"}


# test_holding.py


class HoldJob(LockableMixin, Document):
    payload = StringField()
    meta = {"collection": "test_hold_jobs"}


class ShardedByIdJob(LockableMixin, Document):
    """A shard key that includes the primary key."""

    tenant = StringField(required=True)
    meta = {"collection": "test_sharded_by_id_jobs", "shard_key": ("tenant", "id")}


class ShardedOnIdJob(LockableMixin, Document):
    tenant = StringField()
    meta = {"collection": "test_sharded_on_id_jobs", "shard_key": ("id",)}


# test_keepalive.py (and its ``keepalive_probe`` workers)


class KeepJob(LockableMixin, Document):
    payload = StringField()

    meta = {"collection": "test_keepalive_jobs"}


#: The connection alias of :class:`FrozenJob`, which the test using it
#: connects to a replica set of its own.
FROZEN_ALIAS = "lockable-frozen"


class FrozenJob(LockableMixin, Document):
    """A document on a server that the test freezes (``SIGSTOP``)."""

    meta = {"collection": "frozen_jobs", "db_alias": FROZEN_ALIAS}


# test_processes.py (and its ``proc_*`` workers)


class ProcCounter(LockableMixin, Document):
    """One counter that many processes increment under its lease."""

    value = IntField(default=0)

    meta = {"collection": "proc_counters"}


class ProcTask(LockableMixin, Document):
    """A unit of work that exactly one worker must handle."""

    n = IntField(required=True)
    handled_by = StringField(default=None)

    # What a user draining a queue this way would declare: equality on
    # ``handled_by``, then the lease's range on ``locked_until``.
    meta = {"collection": "proc_tasks", "indexes": [("handled_by", "locked_until")]}


# test_prometheus.py


class PromJob(LockableMixin, Document):
    name = StringField()


# test_state_machine.py


class Counter(LockableMixin, Document):
    """The one document every client of a run works on."""

    name = StringField()
    counter = IntField(default=0)

    meta = {"collection": "test_state_machine"}


# test_testing_harness.py


class HarnessDoc(Document):
    name = StringField()


#: The connection alias of :class:`AliasDoc`: a user's own connection, which
#: the test connects itself.
HARNESS_USER_ALIAS = "harness_user"


class AliasDoc(Document):
    meta = {"db_alias": HARNESS_USER_ALIAS, "collection": "alias_doc"}


# test_waiting.py (and its ``lease_*`` workers)


class WaitJob(LockableMixin, Document):
    """The document the processes of test_waiting.py wait for."""

    value = IntField(default=0)

    meta = {"collection": "test_wait_jobs"}


# test_waker_events.py


class Watched(LockableMixin, Document):
    n = IntField(default=0)
    meta = {"collection": "waker_events"}


# test_worker_claims.py (and its ``claim_*`` workers)


class ClaimTask(LockableMixin, Document):
    """A queue entry: pending until one worker has handled it."""

    n = IntField(required=True)
    status = StringField(default="pending")
    handled_by = StringField()

    meta = {"collection": "claim_tasks", "indexes": [("status", "locked_until")]}


#: The connection alias of :class:`ArgTask`, connected by the test's
#: ``silent_db`` fixture through a client of its own.
CLAIM_ARGS_ALIAS = "lockable-claim-args"


class ArgTask(LockableMixin, Document):
    n = IntField()
    status = StringField(default="pending")

    meta = {"collection": "claim_arg_tasks", "db_alias": CLAIM_ARGS_ALIAS}


# -- looking at the database directly -------------------------------------------


def raw(doc: Any) -> dict | None:
    """The document as stored, read with the driver (not the library)."""
    found: dict | None = type(doc)._get_collection().find_one({"_id": doc.pk})
    return found


# -- counting the commands a client sends --------------------------------------

#: Commands a client sends on its own (connection handshake, server
#: monitoring, session cleanup): not the library's doing.
HOUSEKEEPING = frozenset(
    {"hello", "ismaster", "isMaster", "endSessions", "saslStart", "saslContinue", "ping"}
)


class PlainFields(LockableMixin, Document):
    """Scalar fields only: a grant loads them field by field."""

    name = mongoengine.StringField(default="unnamed")
    count = mongoengine.IntField(default=lambda: 3)
    ratio = mongoengine.FloatField(null=True)
    price = mongoengine.DecimalField(precision=2)
    when = mongoengine.DateTimeField()
    flag = mongoengine.BooleanField(default=True)
    ref = mongoengine.ObjectIdField()

    meta = {"collection": "test_plain_fields"}


class MixedFields(LockableMixin, Document):
    """A list and an embedded document: a grant builds the document as
    ``reload()`` does."""

    name = mongoengine.StringField(default="unnamed")
    tags = mongoengine.ListField(mongoengine.StringField())
    extra = mongoengine.DictField()

    meta = {"collection": "test_mixed_fields"}


class CommandRecorder(monitoring.CommandListener):
    """Records the commands started on a client (a pymongo ``CommandListener``).

    The reads of change streams (``getMore`` on a stream's cursor) are left
    out: the process's stream of a collection reads on its own thread while
    it is open, whoever waits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[monitoring.CommandStartedEvent] = []
        self._opening: set[int] = set()  # request ids of change-stream aggregates
        self._streams: set[int] = set()  # their cursor ids

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        with self._lock:
            if event.command_name == "aggregate" and "$changeStream" in repr(
                    event.command.get("pipeline")):
                self._opening.add(event.request_id)
            if event.command_name == "getMore" and event.command["getMore"] in self._streams:
                return
            self._events.append(event)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        with self._lock:
            if event.request_id in self._opening:
                self._opening.discard(event.request_id)
                self._streams.add(event.reply["cursor"]["id"])

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def clear(self) -> None:
        with self._lock:
            self._events.clear()

    @property
    def commands(self) -> list[dict]:
        """The command documents sent since the last :meth:`clear`, minus
        housekeeping."""
        with self._lock:
            events = list(self._events)
        return [e.command for e in events if e.command_name not in HOUSEKEEPING]

    @property
    def names(self) -> list[str]:
        """The names of :attr:`commands`, in order."""
        return [next(iter(cmd)) for cmd in self.commands]


@contextmanager
def recorded_alias(uri: str, db_name: str, alias: str) -> Iterator[CommandRecorder]:
    """Connect MongoEngine alias ``alias`` to database ``db_name`` of the server
    at ``uri`` through a client of its own that records its commands."""
    recorder = CommandRecorder()
    mongoengine.connect(
        db=db_name, alias=alias, host=uri, uuidRepresentation="standard", event_listeners=[recorder]
    )
    try:
        # A database named in the URI would win over db=: make sure it did not.
        assert mongoengine.get_db(alias).name == db_name
        yield recorder
    finally:
        mongoengine.disconnect(alias)
