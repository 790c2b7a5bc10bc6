"""Validation of public arguments, done before any database call."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Union

Duration = Union[int, float, timedelta]

# Leases are stored as dates, which Python can read back only up to year 9999;
# 10**11 seconds (about 3,170 years) keeps every lease far inside that range.
MAX_SECONDS = 10**11
MAX_NAME_LENGTH = 1000
#: Integers are stored as 64-bit: counts compared with stored ones must fit.
MAX_STORED_INT = 2**63


def _seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, timedelta)):
        raise TypeError(
            f"{what} must be a number of seconds or a datetime.timedelta, "
            f"not {type(value).__name__}"
        )
    if isinstance(value, timedelta):
        try:
            seconds = value.total_seconds()
        except OverflowError:  # pragma: no cover - total_seconds() is float
            raise ValueError(f"{what} is too large: {value!r}") from None
    else:
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"{what} is too large: {value!r}") from None
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{what} must be finite, not {value!r}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{what} is too large to store: {value!r} (at most {MAX_SECONDS} seconds)")
    return seconds


def duration_ms(value: object, what: str = "duration") -> int:
    """Check a lease duration and return it in whole milliseconds (at least 1).

    :raises TypeError: not an int, float or timedelta (``bool`` included).
    :raises ValueError: zero, negative, NaN, infinite or too large.
    """
    if type(value) is int and 0 < value <= MAX_SECONDS:
        return value * 1000  # the most frequent form, checked in one step
    seconds = _seconds(value, what)
    if seconds <= 0:
        raise ValueError(f"{what} must be positive, not {value!r}")
    # MongoDB dates have millisecond precision; round up so that a tiny positive
    # duration still grants a lease, exactly (seconds * 1000 in floating point
    # would turn 2.007 s into 2008 ms).
    if isinstance(value, timedelta):
        ms = -(-(value // timedelta(microseconds=1)) // 1000)
    elif isinstance(value, int):
        ms = value * 1000
    else:
        ms = math.ceil(round(seconds * 1000, 6))
    return max(1, ms)


def wait_seconds(value: object, what: str = "wait") -> float | None:
    """Check a ``wait`` argument: ``None`` (no limit) or seconds >= 0.

    :raises TypeError: not ``None``, an int, float or timedelta.
    :raises ValueError: negative, NaN, infinite or too large.
    """
    if value is None:
        return None
    if type(value) is int and 0 <= value <= MAX_SECONDS:
        return float(value)
    seconds = _seconds(value, what)
    if seconds < 0:
        raise ValueError(f"{what} must be >= 0 or None, not {value!r}")
    return seconds


def text(value: object, what: str) -> str:
    """Check a non-empty ``str`` argument."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    return value


def stored_text(value: object, what: str) -> str:
    """Check a non-empty ``str`` that is stored in a record: at most 1000
    characters, encodable as UTF-8 (BSON strings are; a lone surrogate is not).
    """
    value = text(value, what)
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(
            f"{what} is {len(value)} characters long, at most {MAX_NAME_LENGTH} are allowed"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} cannot be stored: it is not valid Unicode ({exc.reason} "
                         f"at position {exc.start})") from None
    return value


def seconds_at_least_zero(value: object, what: str) -> float:
    """Check a number of seconds (or timedelta) that may be 0.

    :raises TypeError: not an int, float or timedelta (``None`` included).
    :raises ValueError: negative, NaN, infinite or too large.
    """
    seconds = _seconds(value, what)
    if seconds < 0:
        raise ValueError(f"{what} must be >= 0, not {value!r}")
    return seconds


def owner_name(value: object, what: str = "owner") -> str:
    """Check an owner: a non-empty ``str`` of at most 1000 characters that
    encodes as UTF-8."""
    return stored_text(value, what)


def owner_string(value: object, what: str = "owner") -> str | None:
    """Check an optional ``owner`` argument: ``None`` or :func:`owner_name`."""
    return None if value is None else owner_name(value, what)


def lock_name(value: object) -> str:
    """Check a named lock's name: a non-empty ``str`` of at most 1000
    characters that encodes as UTF-8."""
    return stored_text(value, "lock name")


def count(value: object, what: str) -> int:
    """Check a count: an ``int`` >= 1 (``bool`` is a ``TypeError``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{what} must be at least 1, not {value}")
    if value >= MAX_STORED_INT:
        raise ValueError(f"{what} is too large to store: {value} (at most {MAX_STORED_INT - 1})")
    return value


#: MongoDB's limit on a namespace (``database.collection``), in bytes.
MAX_NAMESPACE_BYTES = 255


def collection_name(value: object, what: str = "collection") -> str:
    """Check a collection name as MongoDB would, before it is used: a
    non-empty ``str`` without ``$`` or NUL, not starting with ``system.`` or a
    dot, and not longer than a namespace may be.
    """
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not a usable collection name: {value!r}") from None
    if (not value or "$" in value or "\0" in value or value.startswith(("system.", "."))
            or value.endswith(".") or size >= MAX_NAMESPACE_BYTES):
        raise ValueError(f"{what} is not a usable collection name: {value!r}")
    return value


def flag(value: object, what: str) -> bool:
    """Check a boolean keyword argument."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be a bool, not {type(value).__name__}")
    return value
