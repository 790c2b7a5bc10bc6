"""Keeping a lease alive from a background thread.

The thread holds only a weak reference to the lease's owner object (a document
or a named lock), so a forgotten holder can still be garbage-collected; it
renews at a third of the lease's duration, so two renewals can fail (a
failover, a slow network) before the lease runs out. ``stop()`` is called by
``release()`` and joins the thread, so no thread outlives its lease.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Protocol

log = logging.getLogger("mongoengine_lockable.keepalive")

#: Renew when this fraction of the lease has passed.
RENEW_FRACTION = 1 / 3


class Renewable(Protocol):
    def _keepalive_renew(self) -> bool:
        """Renew once; ``False`` if the lease is lost (stop renewing)."""


class KeepAlive:
    """Renews ``target``'s lease every ``RENEW_FRACTION`` of ``ms``.

    :param target: the holder; its ``_keepalive_renew()`` is called from the thread.
    :param ms: the lease's duration in milliseconds.
    """

    def __init__(self, target: Renewable, ms: int) -> None:
        self.interval = ms / 1000 * RENEW_FRACTION
        self._target = weakref.ref(target)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lockable-keepalive-{id(target):x}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            target = self._target()
            if target is None:
                return
            try:
                alive = target._keepalive_renew()
            except Exception:
                log.warning(
                    "lease renewal failed; retrying in %.3f s", self.interval, exc_info=True
                )
                continue
            finally:
                del target
            if not alive:
                return

    def stop(self) -> None:
        """Stop renewing and wait for an in-flight renewal to finish."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()
