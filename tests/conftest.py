"""Shared fixtures: tiny random models built from configs (tests/fixtures/models.py) and the
real services — PostgreSQL, an S3 server over HTTP (tests/fixtures/services.py)."""

import os

import pytest
from xdist.scheduler import LoadFileScheduling

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


# The modules that deploy the Serve application on the session's Serve instance
# (``tests/fixtures/stack.py``), in the order they run. ``make test`` runs them on one pytest
# worker, one after the other (``ServeAppScheduling``), with the modules that deploy the same
# settings next to each other: each change of settings starts a new API replica, its
# validation process and the inference replicas (a process importing torch each), and the
# other worker then starts no Serve at all. A module missing from this list fails the run.
SERVE_APP_MODULES = (
    # The session's settings (``service_settings``).
    "tests/services/test_serve_inference.py",
    "tests/services/test_serve_mode.py",
    "tests/services/test_tenant_erasure.py",
    "tests/reliability/test_serving_faults.py",  # kills replicas, redeploys the same settings
    # Settings of their own.
    "tests/services/test_api_routes.py",
    "tests/services/test_base_prefix_api.py",
    "tests/reliability/test_database_restart.py",  # removes the application when it ends
)
SERVE_APP_GROUP = "serve-app"


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config, items):
    """The Serve application's modules first (one unit of work, in ``SERVE_APP_MODULES``'
    order), then modules with slow tests, then the rest, each in its collected order.

    ``make test`` runs ``--dist loadfile``: xdist hands whole modules to its two workers in
    collection order, so a long integration module collected last (``tests/workers/`` sorts
    late) ran alone for minutes while the other worker sat idle. Longest first is the
    classic fix for that tail; the ``slow`` mark is the durations we already keep. xdist
    reorders modules by their number of tests unless told not to (``--no-loadscope-reorder``
    in the Makefile): that put the few-but-long modules (two nodes, `prefixd up`) last."""
    on_serve = {_module(item) for item in items if "serve_instance" in item.fixturenames}
    collected = {_module(item) for item in items}
    unlisted = on_serve - set(SERVE_APP_MODULES)
    stale = (set(SERVE_APP_MODULES) & collected) - on_serve
    if unlisted or stale:
        raise pytest.UsageError(
            f"tests/conftest.py SERVE_APP_MODULES: add {sorted(unlisted)} (they deploy the Serve "
            f"application), remove {sorted(stale)} (they no longer do)"
        )
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}

    def order(item: pytest.Item) -> tuple[int, int]:
        module = _module(item)
        if module in SERVE_APP_MODULES:
            return (0, SERVE_APP_MODULES.index(module))
        return (1 if item.path in slow_modules else 2, 0)

    items.sort(key=order)  # stable: each module's tests keep their order


class ServeAppScheduling(LoadFileScheduling):
    """``--dist loadfile``, except that the Serve application's modules are one unit of work:
    one worker runs them all, in order."""

    def _split_scope(self, nodeid: str) -> str:
        module = super()._split_scope(nodeid)
        return SERVE_APP_GROUP if module in SERVE_APP_MODULES else module


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") == "loadfile":
        return ServeAppScheduling(config, log)
    return None  # xdist's own
