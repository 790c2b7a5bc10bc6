"""Waiting for a lease: retry an attempt until it succeeds or the deadline passes.

A waiter wakes for two reasons: the lease's record changed (a release, a
takeover), or the holder's lease runs out without any write (a crashed
holder). On a replica set the first is heard through a change stream on that
one record, so a hand-off costs about one majority commit instead of a polling
interval; the second is known in advance from the holder's time left, measured
on the server's clock. Without change streams (mongomock, a standalone server)
the waiter polls with a capped, jittered, exponentially growing delay.

Deadlines are on the monotonic clock, so a wall-clock step cannot shorten or
stretch a wait. Sleep, clock and randomness are parameters so that tests need
not sleep for real.
"""

from __future__ import annotations

import logging
import random
import time
from types import TracebackType
from typing import Any, Callable, Generic, Optional, Protocol, TypeVar

from pymongo.errors import PyMongoError

T = TypeVar("T")

log = logging.getLogger("mongoengine_lockable.waiting")

#: First polling delay and its cap, in seconds.
BASE_DELAY = 0.005
MAX_DELAY = 0.25

#: Longest single pause when the holder's time left is unknown.
MAX_WAIT_SLICE = 5.0

#: Longest a change-stream read blocks before the waiter checks its clocks:
#: the most a waiter can be late for a silent expiry or for its deadline.
STREAM_AWAIT_MS = 100


def backoff(
    attempt: int,
    *,
    base: float = BASE_DELAY,
    cap: float = MAX_DELAY,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to sleep before retry number ``attempt`` (0 for the first).

    The delay doubles per attempt up to ``cap``; jitter draws it from the upper
    half of that range so that waiters released together do not retry in step.
    """
    ceiling: float = min(cap, base * 2.0 ** min(attempt, 32))
    return ceiling * (0.5 + rand() / 2)


class Waker(Protocol):
    """Blocks until the awaited lease may have been released, or ``timeout``."""

    def pause(self, timeout: float) -> bool:
        """``True`` if a release was seen, ``False`` on timeout (or unknown)."""

    def close(self) -> None: ...


class PollingWaker:
    """Sleeps the backoff delay (never past ``timeout``)."""

    def __init__(
        self,
        sleep: Callable[[float], None] = time.sleep,
        delay: Callable[[int], float] = backoff,
    ) -> None:
        self._sleep = sleep
        self._delay = delay
        self._tries = 0

    def pause(self, timeout: float) -> bool:
        self._sleep(min(self._delay(self._tries), timeout))
        self._tries += 1
        return False

    def close(self) -> None:
        pass


class ChangeStreamWaker:
    """Wakes on the change events that ``events`` (a ``$match`` filter) selects.

    The stream is opened before the attempt it guards is retried, so a change
    made between a failed attempt and the wait is not missed. If the stream
    breaks, the rest of the wait polls.
    """

    def __init__(
        self,
        collection: Any,
        events: dict[str, Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._fallback: PollingWaker | None = None
        self._stream = collection.watch([{"$match": events}], max_await_time_ms=STREAM_AWAIT_MS)

    def pause(self, timeout: float) -> bool:
        if self._fallback is not None:
            return self._fallback.pause(timeout)
        end = self._clock() + timeout
        try:
            while True:
                left = end - self._clock()
                if left <= 0:
                    return False
                if left * 1000 < STREAM_AWAIT_MS:
                    # A blocking read could overshoot the deadline: nap instead;
                    # a change meanwhile is still read at the next pause.
                    time.sleep(left)
                    return False
                event = self._stream.try_next()
                if event is not None:
                    # A delete (or the collection's end) is not a release: the
                    # waiter must look at the record again.
                    return bool(event.get("operationType") in ("update", "replace"))
        except PyMongoError as exc:
            log.warning("change stream failed (%s); polling for the rest of this wait", exc)
            self.close()
            self._fallback = PollingWaker()
            return False

    def close(self) -> None:
        try:
            self._stream.close()
        except PyMongoError:  # pragma: no cover - closing a dead cursor
            pass


def open_waker(collection: Any, events: dict[str, Any], use_stream: bool) -> Waker:
    """A change-stream waker on ``events`` where the server supports one, else
    polling."""
    if use_stream:
        try:
            return ChangeStreamWaker(collection, events)
        except PyMongoError as exc:
            # A standalone server has no change streams.
            log.debug("no change stream on %s (%s): polling", collection.full_name, exc)
    return PollingWaker()


class _Closing(Generic[T]):
    def __init__(self, value: T | None) -> None:
        self.value = value

    def __enter__(self) -> T | None:
        return self.value

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.value is not None:
            self.value.close()  # type: ignore[attr-defined]


Attempt = Callable[[bool], tuple[Optional[T], Optional[float]]]


def retry_until(
    attempt: Attempt[T],
    wait: float | None,
    waker: Callable[[], Waker],
    *,
    clock: Callable[[], float] = time.monotonic,
) -> T | None:
    """Call ``attempt`` until it returns a result.

    :param attempt: one try, returning ``(result, None)`` on success, else
        ``(None, seconds until the holder's lease runs out, if known)``. Its
        argument says whether that time is worth a read: not on the first try
        when the waker opens next (the retry right after it reads), which
        saves a round trip per contended call. After a release another waiter
        won, it is read: the new lease may be shorter than the waiter's own.
    :param wait: seconds to keep trying (0: try once), ``None`` for no limit.
    :param waker: opens what the waiter blocks on between attempts; called
        only if the first attempt fails.
    :return: the first result, or ``None`` once ``wait`` has passed (a last
        attempt is made at the deadline).
    """
    result, expires_in = attempt(wait == 0)
    if result is not None or wait == 0:
        return result
    deadline = None if wait is None else clock() + wait
    with _Closing(waker()) as pauser:
        assert pauser is not None
        while True:
            # Retried first thing after the waker opened: a release made
            # before the stream existed is seen now.
            result, expires_in = attempt(True)
            if result is not None:
                return result
            now = clock()
            if deadline is not None and now >= deadline:
                return None
            timeout = MAX_WAIT_SLICE if expires_in is None else max(expires_in, 0.001)
            if deadline is not None:
                timeout = min(timeout, deadline - now)
            pauser.pause(timeout)

