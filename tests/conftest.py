"""Shared fixtures: tiny random models built from configs (tests/fixtures/models.py) and the
real services — PostgreSQL, an S3 server over HTTP (tests/fixtures/services.py)."""

import os

# Ray Serve's controller gives a starting HTTP proxy 5 s per readiness check and kills it
# after three misses; on this 2-core machine, with two pytest workers and their trainers,
# a proxy can take longer to start, and `serve.start` then fails with ActorDiedError.
# Every Ray this suite starts (in-process, `prefixd up`, `ray start`) inherits these.
for _name, _value in (
    ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60"),
    ("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60"),
    # A raylet prestarts idle workers when the first driver connects (3 here, 1 without);
    # the suite's actors (schedulers, trainers, replicas) each get a process of their own,
    # so those were mostly CPU spent importing Ray, on a machine the suite keeps busy.
    ("RAY_prestart_worker_first_driver", "0"),
    # One torch (OpenMP) thread per process: two pytest workers already fill the two cores,
    # and more threads than cores spin in OpenMP's barriers and waste CPU (tests/common:
    # 92 s -> 61 s of CPU). Ray gives its workers one thread per CPU they hold already.
    ("OMP_NUM_THREADS", "1"),
):
    os.environ.setdefault(_name, _value)

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.services",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.stack",
]


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests first, the rest after, each in its collected order.

    ``make test`` runs ``--dist loadfile``: xdist hands whole modules to its two workers in
    collection order, so a long integration module collected last (``tests/workers/`` sorts
    late) ran alone for minutes while the other worker sat idle. Longest first is the
    classic fix for that tail; the ``slow`` mark is the durations we already keep. xdist
    reorders modules by their number of tests unless told not to (``--no-loadscope-reorder``
    in the Makefile): that put the few-but-long modules (two nodes, `prefixd up`) last."""
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_modules)  # stable: False (slow) first
