"""Waiting policy: backoff delays and the bounds of one pause.

A waiter blocks on a change stream where the server has them (an executor
opens it, see :mod:`mongoengine_lockable._io`); without one it polls with the
capped, jittered, exponentially growing delay of :func:`backoff`. Deadlines are
on the monotonic clock, so a wall-clock step cannot shorten or stretch a wait.
"""

from __future__ import annotations

import random
from typing import Callable

__all__ = ["BASE_DELAY", "MAX_DELAY", "MAX_WAIT_SLICE", "backoff"]

#: First polling delay and its cap, in seconds.
BASE_DELAY = 0.005
MAX_DELAY = 0.25

#: Longest single pause when nothing tells the waiter when to look again.
MAX_WAIT_SLICE = 5.0


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
