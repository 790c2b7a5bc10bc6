"""The Prometheus recipe: lease signals counted by prometheus-client, for real."""

from __future__ import annotations

import gc
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

from mongoengine_lockable import NamedLock, signals
from mongoengine_lockable.contrib.prometheus import LockMetrics, instrument
from mongoengine_lockable.testing import LockableDB

from models import PromJob


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Iterator[LockMetrics]:
    with instrument(registry) as metrics:
        yield metrics


def value(registry: CollectorRegistry, name: str, kind: str) -> float:
    found = registry.get_sample_value(name, {"kind": kind})
    return 0.0 if found is None else found


def test_wait_and_hold_of_a_document_lease(
    lockable_db: LockableDB, registry: CollectorRegistry, metrics: LockMetrics
):
    job = PromJob(name="a").save()
    assert job.lock(30)
    time.sleep(0.2)
    job.release()
    assert value(registry, "mongoengine_lockable_wait_seconds_count", "PromJob") == 1
    assert value(registry, "mongoengine_lockable_hold_seconds_count", "PromJob") == 1
    held = value(registry, "mongoengine_lockable_hold_seconds_sum", "PromJob")
    assert 0.2 <= held < 5
    # An uncontended grant waited (next to) nothing.
    assert value(registry, "mongoengine_lockable_wait_seconds_sum", "PromJob") < 0.5


def test_a_wait_is_measured(lockable_db: LockableDB, registry: CollectorRegistry, metrics):
    job = PromJob(name="w").save()
    assert job.lock(0.3)  # expires by itself; the waiter gets it then
    other = PromJob.objects.get(pk=job.pk)
    assert other.lock(30, wait=10)
    other.release()
    assert value(registry, "mongoengine_lockable_wait_seconds_count", "PromJob") == 2
    waited = value(registry, "mongoengine_lockable_wait_seconds_sum", "PromJob")
    assert 0.1 <= waited < 10


def test_unavailable_is_counted_once_per_refusal(
    lockable_db: LockableDB, registry: CollectorRegistry, metrics: LockMetrics
):
    job = PromJob(name="u").save()
    assert job.lock(30)
    rival = PromJob.objects.get(pk=job.pk)
    assert not rival.lock(30)
    assert not rival.lock(30, wait=0.2)
    assert value(registry, "mongoengine_lockable_unavailable_total", "PromJob") == 2
    job.release()
    assert value(registry, "mongoengine_lockable_unavailable_total", "PromJob") == 2


def test_named_locks_are_labelled_by_their_class(
    lockable_db: LockableDB, registry: CollectorRegistry, metrics: LockMetrics
):
    lock = NamedLock("prom-report", duration=30)
    with lock:
        assert not NamedLock("prom-report", duration=30).acquire()
    assert value(registry, "mongoengine_lockable_wait_seconds_count", "NamedLock") == 1
    assert value(registry, "mongoengine_lockable_hold_seconds_count", "NamedLock") == 1
    assert value(registry, "mongoengine_lockable_unavailable_total", "NamedLock") == 1
    exposition = prometheus_client.generate_latest(registry).decode()
    assert 'mongoengine_lockable_hold_seconds_count{kind="NamedLock"} 1.0' in exposition
    # The lock's name is not a label: names may be many (templated names).
    assert "prom-report" not in exposition


def test_a_lost_lease_is_counted(
    lockable_mongomock_db: LockableDB, registry: CollectorRegistry, metrics: LockMetrics
):
    # lock_lost comes from a keepalive thread (tests/test_keepalive.py makes
    # it fire); here it is sent as that thread sends it.
    job = PromJob(name="l").save()
    signals.lock_lost.send(PromJob, document=job, owner="w1", fence=3)
    signals.lock_lost.send(NamedLock("prom-lost"), name="prom-lost", owner="w1", fence=4)
    assert value(registry, "mongoengine_lockable_lost_total", "PromJob") == 1
    assert value(registry, "mongoengine_lockable_lost_total", "NamedLock") == 1


def test_receivers_outlive_the_callers_reference(
    lockable_mongomock_db: LockableDB, registry: CollectorRegistry
):
    ref = weakref.ref(instrument(registry))
    gc.collect()
    metrics = ref()
    assert metrics is not None  # connected with weak=False: blinker keeps it
    try:
        job = PromJob(name="g").save()
        assert job.lock(30)
        job.release()
        assert value(registry, "mongoengine_lockable_wait_seconds_count", "PromJob") == 1
    finally:
        metrics.disconnect()


def test_disconnect_stops_counting_and_unregisters(
    lockable_mongomock_db: LockableDB, registry: CollectorRegistry
):
    metrics = instrument(registry)
    metrics.disconnect()
    metrics.disconnect()  # idempotent
    assert registry.get_sample_value(
        "mongoengine_lockable_wait_seconds_count", {"kind": "PromJob"}
    ) is None
    job = PromJob(name="d").save()
    assert job.lock(30)
    job.release()
    for signal in (signals.lock_acquired, signals.lock_released):
        assert metrics._on_acquired not in signal.receivers.values()
    # The same registry can be instrumented again.
    with instrument(registry):
        assert job.lock(30)
        job.release()
        assert value(registry, "mongoengine_lockable_wait_seconds_count", "PromJob") == 1


def test_a_second_instrument_on_one_registry_is_refused(
    registry: CollectorRegistry, metrics: LockMetrics
):
    with pytest.raises(ValueError):
        instrument(registry)


@pytest.mark.parametrize("bad", ["registry", 1, object()])
def test_bad_registry(bad: object):
    with pytest.raises(TypeError, match="CollectorRegistry"):
        instrument(bad)  # type: ignore[arg-type]


def test_default_registry(lockable_mongomock_db: LockableDB):
    with instrument() as metrics:
        assert metrics.registry is prometheus_client.REGISTRY
        job = PromJob(name="r").save()
        assert job.lock(30)
        job.release()
        assert value(prometheus_client.REGISTRY, "mongoengine_lockable_hold_seconds_count",
                     "PromJob") == 1
    assert prometheus_client.REGISTRY.get_sample_value(
        "mongoengine_lockable_hold_seconds_count", {"kind": "PromJob"}
    ) is None


def test_without_prometheus_client_the_import_says_what_to_install():
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "try:\n"
        "    import mongoengine_lockable.contrib.prometheus\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "import mongoengine_lockable\n"  # the core does not need it
        "print('core ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "needs prometheus-client: pip install prometheus-client" in result.stdout
    assert result.stdout.strip().endswith("core ok")
