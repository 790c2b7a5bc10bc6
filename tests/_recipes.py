"""The code blocks of ``docs/recipes.rst``, for the tests that run them.

A recipe is a ``.. code-block:: python`` with a ``:name:`` option;
:func:`source` returns its code as written, and :func:`load` runs recipes in
one namespace, in order (later recipes use the names earlier ones define), as
a user pasting them into one module would. A traceback names the recipe:
``File "docs/recipes.rst[recipe-worker-loop]"``.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes.rst"

_BLOCK = re.compile(
    r"^\.\. code-block:: python\n"
    r"((?: +:[\w-]+:.*\n)*)"  # the directive's options
    r"\n"
    r"((?:(?: .*)?\n)+)",  # the indented body, blank lines included
    re.MULTILINE,
)


def blocks() -> dict[str, str]:
    """Every named Python block of the recipes, by name, dedented."""
    found: dict[str, str] = {}
    for match in _BLOCK.finditer(RECIPES.read_text(encoding="utf-8")):
        name = re.search(r":name: *(\S+)", match.group(1))
        if name is not None:
            found[name.group(1)] = textwrap.dedent(match.group(2)).rstrip() + "\n"
    return found


def source(name: str) -> str:
    """The code of the recipe ``name``, as written."""
    try:
        return blocks()[name]
    except KeyError:
        raise LookupError(f"no code block named {name!r} in {RECIPES}") from None


def load(*names: str, into: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the recipes ``names`` in order in the namespace ``into`` (a new one
    by default) and return it."""
    namespace: dict[str, Any] = {"__name__": "recipes"} if into is None else into
    for name in names:
        code = compile(source(name), f"docs/recipes.rst[{name}]", "exec")
        exec(code, namespace)
    return namespace
