"""The framework recipes of the README, with the real framework packages.

flask-mongoengine and django-mongoengine give documents their own queryset
class; a lockable document combines it with ``LockableQuerySet``. Installed by
``requirements/frameworks.txt`` (see there why not by the ``test`` extra).
"""

from __future__ import annotations

import importlib
import os
import textwrap
from typing import Any

import mongoengine
import pytest

from mongoengine_lockable import LockableMixin, LockableQuerySet
from mongoengine_lockable.testing import LockableDB, plugin


def _framework(module: str) -> Any:
    """Import a framework package; missing is an error where backends are required."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        reason = (
            f"{module} cannot be imported ({exc}): pip install --build-constraint "
            "requirements/build-constraints.txt -r requirements/frameworks.txt"
        )
        if os.environ.get(plugin.REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
            pytest.fail(f"{reason} ({plugin.REQUIRE_ENV} is set)", pytrace=False)
        pytest.skip(reason)


# -- flask-mongoengine ----------------------------------------------------------


@pytest.fixture(scope="module")
def flask_models() -> Any:
    flask_mongoengine = _framework("flask_mongoengine")
    try:  # flask-mongoengine-3
        from flask_mongoengine.documents import BaseQuerySet as FlaskQuerySet
    except ImportError:  # flask-mongoengine 1.0
        FlaskQuerySet = flask_mongoengine.BaseQuerySet

    db = flask_mongoengine.MongoEngine()

    # The recipe.
    class JobQuerySet(LockableQuerySet, FlaskQuerySet):
        pass

    class FlaskJob(LockableMixin, db.Document):
        status = db.StringField(default="pending")
        n = db.IntField()
        meta = {"queryset_class": JobQuerySet, "ordering": ["n"]}

    class Models:
        pass

    Models.db, Models.Job, Models.QuerySet = db, FlaskJob, JobQuerySet
    return Models


def test_flask_document_without_the_combined_queryset_is_refused(flask_models: Any):
    # The framework's Document first: its BaseQuerySet would win.
    with pytest.raises(TypeError,
                       match=r"class PlainQuerySet\(LockableQuerySet, [\w.]*BaseQuerySet\)"):

        class Plain(flask_models.db.Document, LockableMixin):
            pass

    # The mixin first: LockableQuerySet would win, and paginate() vanish.
    with pytest.raises(TypeError, match=r"losing the methods of [\w.]*BaseQuerySet"):

        class MixinFirst(LockableMixin, flask_models.db.Document):
            pass


def test_flask_queryset_keeps_both_sets_of_methods(lockable_db: LockableDB, flask_models: Any):
    from werkzeug.exceptions import NotFound

    Job = flask_models.Job
    for n in range(5):
        Job(n=n).save()
    queryset = Job.objects(status="pending")
    assert isinstance(queryset, flask_models.QuerySet)
    # flask-mongoengine's
    page = queryset.paginate(page=1, per_page=2)
    assert [job.n for job in page.items] == [0, 1]
    assert page.pages == 3
    assert queryset.first_or_404().n == 0
    with pytest.raises(NotFound):
        Job.objects(status="nope").first_or_404()
    with pytest.raises(NotFound):
        Job.objects.get_or_404(n=99)
    # ours
    first = queryset.claim(30)
    assert first is not None and first.n == 0
    second = Job.objects(status="pending").claim(30)
    assert second is not None and second.n == 1
    assert [job.n for job in Job.objects.locked()] == [0, 1]
    assert Job.objects.unlocked().paginate(page=1, per_page=10).total == 3
    first.update_if_held(set__status="done")
    first.release()
    second.release()
    assert Job.objects(status="done").count() == 1


def test_flask_route_claims_a_job(lockable_db: LockableDB, flask_models: Any):
    import flask

    Job = flask_models.Job
    app = flask.Flask(__name__)

    @app.post("/jobs/next")
    def next_job() -> Any:
        job = Job.objects(status="pending").claim(30)
        if job is None:
            return {"job": None}, 204
        job.update_if_held(set__status="running")
        return {"job": job.n, "fence": job.lock_fence}

    @app.get("/jobs/<int:n>")
    def show(n: int) -> Any:
        return {"job": Job.objects.get_or_404(n=n).n}

    Job(n=7).save()
    client = app.test_client()
    reply = client.post("/jobs/next")
    assert reply.status_code == 200
    assert reply.get_json() == {"job": 7, "fence": 1}
    assert client.post("/jobs/next").status_code == 204
    assert client.get("/jobs/7").get_json() == {"job": 7}
    assert client.get("/jobs/8").status_code == 404


# -- django-mongoengine ---------------------------------------------------------
# django_mongoengine patches MongoEngine when imported (the ObjectIdField of
# every later document class) and needs Django settings: it runs in a pytest
# of its own, so that the rest of the suite sees MongoEngine unchanged.

DJANGO_TESTS = """
    import django
    from django.conf import settings

    settings.configure(
        INSTALLED_APPS=["django_mongoengine"],
        # The application's own connection: the plugin sets it aside for each
        # test and puts it back afterwards.
        MONGODB_DATABASES={"default": {"name": "django_app", "host": "127.0.0.1"}},
    )
    django.setup()

    import mongoengine
    import pytest
    from django_mongoengine import Document, fields
    from django_mongoengine.queryset import QuerySet as DjangoQuerySet

    from mongoengine_lockable import LockableMixin, LockableQuerySet

    # The recipe.
    class TicketQuerySet(LockableQuerySet, DjangoQuerySet):
        pass

    class Ticket(LockableMixin, Document):
        title = fields.StringField()
        n = fields.IntField()
        meta = {"queryset_class": TicketQuerySet}

    def test_both_sets_of_methods(lockable_db):
        assert not Ticket.objects.exists()
        ticket, created = Ticket.objects.get_or_create(title="a", defaults={"n": 1})
        assert created
        Ticket.objects.get_or_create(title="b", defaults={"n": 2})
        assert Ticket.objects.latest("n").title == "b"
        assert Ticket.objects.earliest("n").title == "a"
        assert isinstance(Ticket.objects(title="a"), TicketQuerySet)
        claimed = Ticket.objects(title="a").claim(30)
        assert claimed is not None and claimed.pk == ticket.pk
        assert Ticket.objects(title="a").claim(30) is None
        assert Ticket.objects.locked().exists()
        assert Ticket.objects.unlocked().latest("n").title == "b"
        claimed.update_if_held(set__n=10)
        claimed.release()
        assert Ticket.objects.latest("n").title == "a"

    def test_the_application_connection_is_back():
        assert mongoengine.connection._connection_settings["default"]["name"] == "django_app"

    def test_without_the_combined_queryset_it_is_refused():
        # django-mongoengine's manager supplies its queryset class: mixing in
        # alone would silently replace it.
        with pytest.raises(TypeError, match=r"losing the methods of django_mongoengine"):
            class Bare(LockableMixin, Document):
                title = fields.StringField()
"""


def test_django_recipe(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, lockable_mongod_uri: str
):
    _framework("django_mongoengine")
    pytester.makepyfile(textwrap.dedent(DJANGO_TESTS))
    monkeypatch.setenv(plugin.URI_ENV, lockable_mongod_uri)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    # test_both_sets_of_methods on mongomock and on the real server, then the checks.
    result.assert_outcomes(passed=4)


def test_plain_mongoengine_queryset_class_is_refused():
    class OwnQuerySet(mongoengine.QuerySet):
        pass

    with pytest.raises(TypeError,
                       match=r"class SomeDocQuerySet\(LockableQuerySet, [\w.<>]*OwnQuerySet\)"):

        class SomeDoc(LockableMixin, mongoengine.Document):
            meta = {"queryset_class": OwnQuerySet}
