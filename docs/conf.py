"""Sphinx configuration: the API reference from the docstrings, the guide
from README.rst, the benchmark page. Built by ``make docs`` (warnings are
errors, and it works offline: no intersphinx)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import mongoengine_lockable  # noqa: E402

project = "mongoengine-lockable"
author = "mongoengine-lockable contributors"
copyright = "mongoengine-lockable contributors"  # noqa: A001
release = mongoengine_lockable.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode"]
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}

# Types of other projects: without intersphinx (the docs build offline) they
# cannot be linked, which is not an error in our docstrings.
nitpick_ignore_regex = [
    (r"py:.*", r"(mongoengine|pymongo|bson|blinker|mongomock|prometheus_client|mirakuru)(\..*)?"),
    (r"py:.*", r"(datetime|subprocess|types|collections\.abc|typing|concurrent)\..*"),
    (r"py:class", r"(Document|QuerySet|Collection|Database|MongoClient|ClientSession)"),
    (r"py:class", r"(WriteConcern|ReadConcern|ReadPreference|CollectorRegistry|Signal)"),
    (r"py:class", r"(Popen|TracebackType|TCPExecutor|NoneType|Path|Any)"),
    (r"py:.*", r"(T|P|R|F|_T|_R)"),
    (r"py:.*", r"Literal\[.*"),
    # Private helpers named in signatures and bases, and MongoEngine's
    # per-class exceptions.
    (r"py:.*", r"(mongoengine_lockable\.)?_[a-z_]+\..*"),
    (r"py:.*", r"mongoengine_lockable\.[A-Za-z_.]*\._[A-Za-z_]+"),
    (r"py:class", r"mongoengine_lockable\._queryset\.LockableQuerySetNoCache"),
    (r"py:exc", r"DoesNotExist"),
    # The asyncio face, once it exists, documents itself.
    (r"py:.*", r"mongoengine_lockable\.aio(\..*)?"),
]

html_theme = "alabaster"
html_static_path: list[str] = []
html_show_sourcelink = False


def _list_optional_pages(app, docname, source):
    """Put the pages that may not exist yet (recipes) in the index's toctree.

    A ``:glob:`` entry that matches nothing is a warning, and warnings are
    errors here, so the index names them only when their files are there.
    """
    if docname != "index":
        return
    for page in ("recipes",):
        if os.path.exists(os.path.join(app.srcdir, page + ".rst")):
            source[0] = source[0].replace("   guide\n", f"   guide\n   {page}\n", 1)


def setup(app):
    app.connect("source-read", _list_optional_pages)
