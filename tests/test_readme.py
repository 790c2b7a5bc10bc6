"""The Python examples of ``README.rst``, run as written, so that the README
cannot drift from the code.

Every ``.. code-block:: python`` of the README is a complete example: it runs
here in a namespace of its own, against a fresh mongomock database (the
plugin's ``lockable_mongomock_db``, connected as MongoEngine's default
alias). A block with the option ``:class: fragment`` shows part of a program
(it uses names it does not define, or needs a framework or a server of its
own) and is only compiled. Tracebacks and test ids give README line numbers.
"""

from __future__ import annotations

import re
import textwrap
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymongo
import pytest
from mongoengine.base import common

from mongoengine_lockable import signals

README = Path(__file__).resolve().parents[1] / "README.rst"

_BLOCK = re.compile(
    r"^(?P<indent> *)\.\. code-block:: python\n"
    r"(?P<options>(?:(?P=indent) +:[\w-]+:.*\n)*)"  # the directive's options
    r"\n"
    r"(?P<body>(?:(?:(?P=indent) +\S.*)?\n)+)",  # the indented body, blank lines included
    re.MULTILINE,
)
_CLASS = re.compile(r":class: *(.+)")


@dataclass(frozen=True)
class Block:
    """A Python block of the README: the line of its directive, the line its
    code starts on, its code, and whether it is a fragment."""

    line: int
    first: int
    code: str
    fragment: bool

    @property
    def where(self) -> str:
        return f"README.rst:{self.line}"

    def compiled(self) -> Any:
        """The code, compiled with the README's line numbers."""
        return compile("\n" * (self.first - 1) + self.code, "README.rst", "exec")


def blocks() -> list[Block]:
    """Every Python block of the README, in order."""
    text = README.read_text(encoding="utf-8")
    found = []
    for match in _BLOCK.finditer(text):
        classes = _CLASS.search(match.group("options"))
        fragment = classes is not None and "fragment" in classes.group(1).split()
        body = match.group("body")
        skipped = len(body) - len(body.lstrip("\n"))  # blank lines before the code
        found.append(Block(
            line=text.count("\n", 0, match.start()) + 1,
            first=text.count("\n", 0, match.start("body")) + 1 + skipped,
            code=textwrap.dedent(body).strip("\n") + "\n",
            fragment=fragment,
        ))
    return found


BLOCKS = blocks()
EXAMPLES = [block for block in BLOCKS if not block.fragment]


def test_the_readme_has_examples_to_run() -> None:
    # A change of markup that hid every block from this test must not pass.
    assert EXAMPLES, f"no runnable '.. code-block:: python' found in {README}"
    assert any(block.fragment for block in BLOCKS)


def test_the_block_pattern_sees_every_python_block() -> None:
    text = README.read_text(encoding="utf-8")
    directives = re.findall(r"^ *\.\. code-block:: python *$", text, re.MULTILINE)
    assert len(BLOCKS) == len(directives)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.fragment], ids=lambda b: b.where)
def test_fragment_compiles(block: Block) -> None:
    block.compiled()


@contextmanager
def _left_as_found() -> Iterator[None]:
    """Undo what an example leaves behind in the process: the receivers it
    connected (an example connects with ``weak=False``, as it should) and the
    document classes it registered by name with MongoEngine."""
    receivers = {name: set(getattr(signals, name).receivers) for name in signals.__all__}
    registry = dict(common._document_registry)
    try:
        yield
    finally:
        for name, before in receivers.items():
            signal = getattr(signals, name)
            for key in set(signal.receivers) - before:
                receiver = signal.receivers[key]
                if isinstance(receiver, weakref.ref):  # connected weakly
                    receiver = receiver()
                if receiver is not None:
                    signal.disconnect(receiver)
        common._document_registry.clear()
        common._document_registry.update(registry)


#: The asyncio examples need pymongo's asyncio API (``mongoengine_lockable.aio``
#: declares the version); on an older pymongo they must fail to import, saying so.
ASYNC_PYMONGO = tuple(int(p) for p in pymongo.version_tuple[:3]) >= (4, 13, 2)


@pytest.mark.parametrize("block", EXAMPLES, ids=lambda b: b.where)
def test_example_runs(block: Block, lockable_mongomock_db: Any) -> None:
    code = block.compiled()
    with _left_as_found():
        if "mongoengine_lockable.aio" in block.code and not ASYNC_PYMONGO:
            with pytest.raises(ImportError, match=r"needs pymongo>=4\.13\.2"):
                exec(code, {"__name__": "readme_example"})
            return
        exec(code, {"__name__": "readme_example"})
