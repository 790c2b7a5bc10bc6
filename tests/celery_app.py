"""The Celery app of ``tests/test_celery.py``: the recipes of ``docs/recipes.rst``
(the job model, the worker loop, the Celery tasks), run as written, on a
MongoDB broker.

A test starts a worker as a ``celery_worker`` worker of ``tests/workers.py``::

    python tests/workers.py celery_worker '{"broker": "mongodb://.../DB?...", ...}'

which replaces itself (same pid) with the ``celery`` command line, as a user
would run it::

    python -m celery -A celery_app worker --pool=prefork --concurrency=N ...

with ``LOCKABLE_CELERY_BROKER`` naming the broker, result backend and
MongoEngine database (one test database holds them all). The worker follows
the line protocol of ``tests/_children.py``: it prints ``READY`` once it
consumes tasks, and exits at once (status 3) when its stdin closes, i.e. when
the test process is gone; its pool processes die with it (Celery sets their
parent-death signal). It logs to stderr, which the test keeps and quotes.

What the recipes leave to the user is defined here (``process_job``) and in
``tests/models.py`` (``Account``): ``Account.sync`` and ``process_job`` record
what ran, by which process, in collections of the test database, and
``Account.sync`` holds its lock until the test opens the account's gate, so
that the test decides when a run ends.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import mongoengine
from celery.signals import worker_ready

import _children
import _recipes
from models import Account
from workers import CELERY_BROKER_ENV

#: The collection of the test database written by :func:`process_job`.
HANDLED = "celery_handled"
#: Longest a worker lives.
WATCHDOG = 600.0


def process_job(job: Any) -> str:
    """The recipe's job handler: record the handling (a separate collection,
    so that a second handling cannot hide the first), then work for the job's
    ``work`` seconds."""
    mongoengine.get_db()[HANDLED].insert_one(
        {"job": job.pk, "fence": job.lock_fence, "owner": job.locked_by, "pid": os.getpid()}
    )
    time.sleep(job.payload.get("work", 0))
    return "ok"


def build(broker_url: str) -> dict[str, Any]:
    """The namespace of the recipes on ``broker_url``; ``app`` is the Celery app."""
    namespace: dict[str, Any] = {
        "__name__": "tasks",  # the recipe's module: task names are tasks.<function>
        "BROKER_URL": broker_url,
        "Account": Account,
        "process_job": process_job,
    }
    _recipes.load("recipe-model", "recipe-worker-loop", "recipe-celery", into=namespace)
    app = namespace["app"]
    # Test plumbing, not recipe: print() reaches the test (READY), and a
    # worker reserves only the tasks it can start (two workers share four
    # long drain tasks two and two).
    app.conf.worker_redirect_stdouts = False
    app.conf.worker_prefetch_multiplier = 1
    app.conf.task_acks_late = True
    return namespace


if os.environ.get(CELERY_BROKER_ENV):
    # Imported by ``celery -A celery_app``.
    _namespace = build(os.environ[CELERY_BROKER_ENV])
    app = _namespace["app"]

    @worker_ready.connect
    def _announce(**kwargs: Any) -> None:
        _children.start_watchdog(WATCHDOG)
        _children.say("READY")
        threading.Thread(target=_watch_stdin, name="stdin-watch", daemon=True).start()

    def _watch_stdin() -> None:
        while True:
            _children.hear()  # at the end of stdin (the test is gone) it exits

