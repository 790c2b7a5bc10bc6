"""Argument checks (``mongoengine_lockable._args``), value by value, without a
database: every public entry point checks its arguments with these functions
before any I/O (``test_bad_input.py`` and ``test_bad_input_table.py`` show, one
value per entry point and argument, that nothing is sent and nothing written).
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from decimal import Decimal
from typing import Any, Callable

import pytest

from mongoengine_lockable import _args

NAN, INF = math.nan, math.inf

# (id, value, exception)
BAD_DURATIONS = [
    ("True", True, TypeError),
    ("False", False, TypeError),
    ("None", None, TypeError),
    ("str", "30", TypeError),
    ("empty-str", "", TypeError),
    ("list", [30], TypeError),
    ("bytes", b"30", TypeError),
    ("Decimal", Decimal(30), TypeError),
    ("complex", 30j, TypeError),
    ("zero", 0, ValueError),
    ("zero-float", 0.0, ValueError),
    ("minus-zero", -0.0, ValueError),
    ("minus-one", -1, ValueError),
    ("minus-half", -0.5, ValueError),
    ("NaN", NAN, ValueError),
    ("inf", INF, ValueError),
    ("minus-inf", -INF, ValueError),
    ("1e300", 1e300, ValueError),
    ("10**400", 10**400, ValueError),
    ("10**12", 10**12, ValueError),
    ("timedelta-0", timedelta(0), ValueError),
    ("timedelta-negative", timedelta(seconds=-1), ValueError),
    ("timedelta-max", timedelta.max, ValueError),
    ("timedelta-min", timedelta.min, ValueError),
]

BAD_WAITS = [
    ("True", True, TypeError),
    ("False", False, TypeError),
    ("str", "1", TypeError),
    ("list", [1], TypeError),
    ("Decimal", Decimal(1), TypeError),
    ("minus-one", -1, ValueError),
    ("minus-tiny", -0.001, ValueError),
    ("NaN", NAN, ValueError),
    ("inf", INF, ValueError),
    ("minus-inf", -INF, ValueError),
    ("1e300", 1e300, ValueError),
    ("timedelta-negative", timedelta(seconds=-1), ValueError),
    ("timedelta-max", timedelta.max, ValueError),
]

BAD_STORED_TEXT = [
    ("empty", "", ValueError),
    ("int", 5, TypeError),
    ("True", True, TypeError),
    ("None", None, TypeError),
    ("bytes", b"me", TypeError),
    ("list", ["me"], TypeError),
    ("too-long", "x" * 1001, ValueError),
    ("lone-surrogate", "w\ud800", ValueError),
    ("lone-low-surrogate", "\udfff", ValueError),
]

BAD_FLAGS = [("one", 1, TypeError), ("zero", 0, TypeError), ("str", "yes", TypeError),
             ("None", None, TypeError)]

BAD_COUNTS = [
    ("True", True, TypeError),
    ("float", 2.0, TypeError),
    ("str", "2", TypeError),
    ("None", None, TypeError),
    ("zero", 0, ValueError),
    ("negative", -1, ValueError),
    ("2**63", 2**63, ValueError),
]

BAD_COLLECTIONS = [
    ("int", 5, TypeError),
    ("None", None, TypeError),
    ("empty", "", ValueError),
    ("dollar", "locks$x", ValueError),
    ("nul", "lo\0cks", ValueError),
    ("system", "system.locks", ValueError),
    ("leading-dot", ".locks", ValueError),
    ("trailing-dot", "locks.", ValueError),
    ("too-long", "c" * 300, ValueError),
    ("lone-surrogate", "lo\ud800", ValueError),
]

CHECKS: dict[str, tuple[Callable[[Any], Any], list[tuple[str, Any, type]], str]] = {
    "duration": (_args.duration_ms, BAD_DURATIONS, "duration"),
    "wait": (_args.wait_seconds, BAD_WAITS, "wait"),
    "owner": (_args.owner_name, BAD_STORED_TEXT, "owner"),
    "lock-name": (_args.lock_name, BAD_STORED_TEXT, "name"),
    "flag": (lambda v: _args.flag(v, "force"), BAD_FLAGS, "force"),
    "count": (lambda v: _args.count(v, "max_attempts"), BAD_COUNTS, "max_attempts"),
    "collection": (_args.collection_name, BAD_COLLECTIONS, "collection"),
    "min_hold": (lambda v: _args.seconds_at_least_zero(v, "min_hold"),
                 [c for c in BAD_WAITS if c[1] is not None], "min_hold"),
}


def _cases() -> list[Any]:
    return [pytest.param(check, value, exc, word, id=f"{name}={case_id}")
            for name, (check, table, word) in CHECKS.items()
            for case_id, value, exc in table]


@pytest.mark.parametrize(("check", "value", "exc", "word"), _cases())
def test_bad_values_are_refused_with_a_message_naming_the_argument(
    check: Callable[[Any], Any], value: Any, exc: type, word: str
) -> None:
    with pytest.raises(exc) as info:
        check(value)
    assert type(info.value) is exc
    assert re.search(rf"\b{re.escape(word)}\b", str(info.value)), str(info.value)


@pytest.mark.parametrize(("value", "ms"), [
    (10**9, 10**12), (1e9, 10**12), (timedelta(days=1), 86_400_000), (3600, 3_600_000),
    (2.5, 2500), (2.007, 2007), (0.001, 1), (0.0001, 1), (timedelta(microseconds=1), 1),
    (timedelta(microseconds=1001), 2),
])
def test_durations_in_whole_milliseconds_rounded_up(value: Any, ms: int) -> None:
    assert _args.duration_ms(value) == ms


@pytest.mark.parametrize(("value", "seconds"), [
    (None, None), (0, 0.0), (0.0, 0.0), (timedelta(0), 0.0), (5, 5.0), (10**9, 1e9),
])
def test_waits(value: Any, seconds: float | None) -> None:
    assert _args.wait_seconds(value) == seconds


@pytest.mark.parametrize("value", ["w", " ", "wörker/ünïcode", "$not.a.path", "x" * 1000])
def test_owners_and_names_accepted(value: str) -> None:
    assert _args.owner_name(value) == value == _args.lock_name(value)
    assert _args.owner_string(None) is None


@pytest.mark.parametrize("value", ["locks", "a.b", "x" * 200, "ünïcode"])
def test_collection_names_accepted(value: str) -> None:
    assert _args.collection_name(value) == value


def test_counts_accepted() -> None:
    assert _args.count(1, "n") == 1 and _args.count(2**63 - 1, "n") == 2**63 - 1


def test_the_tables_cover_every_kind_of_argument() -> None:
    ids = [p.id for p in _cases()]
    assert len(ids) == len(set(ids)) >= 80
