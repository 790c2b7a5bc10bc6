"""Prometheus metrics from the lease signals (needs ``prometheus-client``).

::

    from mongoengine_lockable.contrib.prometheus import instrument

    metrics = instrument()          # prometheus_client's default registry
    ...
    metrics.disconnect()            # stop counting, unregister the metrics

Metrics, each labelled ``kind``: the document class name for a document lease,
or the lock's class name (``NamedLock``...) for a named lock, so that the
number of series stays small whatever the lock names:

``mongoengine_lockable_wait_seconds`` (histogram)
    Time spent waiting before a lease was granted (``lock_acquired``'s
    ``waited``); its ``_count`` is the number of grants.
``mongoengine_lockable_hold_seconds`` (histogram)
    Time from grant to release (``lock_released``'s ``held_for``; releases by
    owner name of a lease taken elsewhere are not timed).
``mongoengine_lockable_lost_total`` (counter)
    Leases found lost by a keepalive (``lock_lost``).
``mongoengine_lockable_unavailable_total`` (counter)
    Acquisitions that gave up (``lock_unavailable``).

The receivers are connected with ``weak=False`` (blinker would otherwise drop
them) and run in the thread that sends the signal; each only updates a metric.
"""

from __future__ import annotations

from typing import Any

try:
    import prometheus_client
except ImportError as exc:  # pragma: no cover - exercised without the package
    raise ImportError(
        "mongoengine_lockable.contrib.prometheus needs prometheus-client: "
        "pip install prometheus-client"
    ) from exc

from mongoengine_lockable import signals

__all__ = ["LockMetrics", "instrument"]

PREFIX = "mongoengine_lockable"
#: Histogram buckets in seconds: from a round trip to a long hold.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


def _kind(sender: Any) -> str:
    """The ``kind`` label: the document class, or the lock's class."""
    cls = sender if isinstance(sender, type) else type(sender)
    return str(cls.__name__)


class LockMetrics:
    """The metrics and receivers made by :func:`instrument`.

    :ivar wait_seconds: histogram of ``lock_acquired``'s ``waited``.
    :ivar hold_seconds: histogram of ``lock_released``'s ``held_for``.
    :ivar lost: counter of ``lock_lost``.
    :ivar unavailable: counter of ``lock_unavailable``.
    """

    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        self.registry = registry

        def histogram(name: str, text: str) -> Any:
            return prometheus_client.Histogram(f"{PREFIX}_{name}", text, ["kind"],
                                               buckets=BUCKETS, registry=registry)

        def counter(name: str, text: str) -> Any:
            return prometheus_client.Counter(f"{PREFIX}_{name}", text, ["kind"],
                                             registry=registry)

        self.wait_seconds = histogram("wait_seconds",
                                      "Seconds spent waiting before a lease was granted.")
        self.hold_seconds = histogram("hold_seconds",
                                      "Seconds from a lease's grant to its release.")
        self.lost = counter("lost", "Leases found lost by a keepalive.")
        self.unavailable = counter(
            "unavailable", "Acquisitions that gave up because another holder kept the lease.")
        self._connected = False

    # The receivers: blinker calls them with the sender and keyword arguments.

    def _on_acquired(self, sender: Any, **kwargs: Any) -> None:
        waited = kwargs.get("waited")
        self.wait_seconds.labels(_kind(sender)).observe(float(waited or 0.0))

    def _on_released(self, sender: Any, **kwargs: Any) -> None:
        held_for = kwargs.get("held_for")
        if held_for is not None:
            self.hold_seconds.labels(_kind(sender)).observe(float(held_for))

    def _on_lost(self, sender: Any, **kwargs: Any) -> None:
        self.lost.labels(_kind(sender)).inc()

    def _on_unavailable(self, sender: Any, **kwargs: Any) -> None:
        self.unavailable.labels(_kind(sender)).inc()

    def _pairs(self) -> list[tuple[Any, Any]]:
        return [
            (signals.lock_acquired, self._on_acquired),
            (signals.lock_released, self._on_released),
            (signals.lock_lost, self._on_lost),
            (signals.lock_unavailable, self._on_unavailable),
        ]

    def connect(self) -> None:
        """Connect the receivers (done by :func:`instrument`)."""
        if not self._connected:
            for signal, receiver in self._pairs():
                signal.connect(receiver, weak=False)
            self._connected = True

    def disconnect(self) -> None:
        """Disconnect the receivers and unregister the metrics. Idempotent."""
        if not self._connected:
            return
        for signal, receiver in self._pairs():
            signal.disconnect(receiver)
        for metric in (self.wait_seconds, self.hold_seconds, self.lost, self.unavailable):
            self.registry.unregister(metric)
        self._connected = False

    def __enter__(self) -> LockMetrics:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()


def instrument(registry: prometheus_client.CollectorRegistry | None = None) -> LockMetrics:
    """Count lease signals as Prometheus metrics.

    :param registry: where to register the metrics; default:
        ``prometheus_client.REGISTRY`` (what ``start_http_server`` serves).
    :return: a :class:`LockMetrics`; its :meth:`~LockMetrics.disconnect` (or
        leaving it as a context manager) stops counting and unregisters them.
    :raises TypeError: when ``registry`` is not a ``CollectorRegistry``.
    :raises ValueError: when the registry already has these metrics (call
        :meth:`~LockMetrics.disconnect` on the earlier instance first).
    """
    if registry is None:
        registry = prometheus_client.REGISTRY
    if not isinstance(registry, prometheus_client.CollectorRegistry):
        raise TypeError(
            f"registry must be a prometheus_client.CollectorRegistry, not {type(registry).__name__}"
        )
    metrics = LockMetrics(registry)
    metrics.connect()
    return metrics
