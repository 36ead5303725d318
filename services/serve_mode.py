"""Ray Serve's high-throughput mode for a Ray that prefixd starts itself.

Ray Serve (2.55 and later) has a documented high-throughput mode, switched on by two
environment variables that its controller, proxies and replicas read when they import
Serve: ``RAY_SERVE_ENABLE_HA_PROXY`` (HAProxy, in C, takes the API port and forwards each
request straight to an ingress replica's own HTTP server, instead of Serve's Python proxy
and one more process hop) and ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` (gRPC between replicas,
user code on the replica's event loop; two more of its changes are undone below). What it
buys on this project's load benchmark: docs/BENCHMARKS.md, "Load".

Variables that Ray reads at process start must be in the environment of the process that
starts Ray, before ``ray.init``; that is what :func:`serve_environment` is for. Its side
ports are free ports, because Ray's fixed defaults would collide between two Rays on one
machine (two test workers, a benchmark beside the tests). On a cluster that ``ray start``
started, the operator sets :data:`HIGH_THROUGHPUT_ENV` on every node
(``deploy/compose.yaml``, ``deploy/kuberay``; a test keeps them equal).

    os.environ.update(serve_environment(settings))  # then ray.init(), serve.start()

What it opens beside the API port: HAProxy's statistics page and Prometheus counters, each
on a port of its own that Ray's configuration template binds on all interfaces (request
counts and backend addresses; no tenant data, no credentials). Neither is published by
``deploy/``; the API port keeps the host ``prefixd up --host`` gives it.
"""

from __future__ import annotations

import socket

from common.config import Settings

# Serve's switches (ray/serve/_private/constants.py), as deploy/ sets them on every node.
HIGH_THROUGHPUT_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # The mode would also move a deployment handle's router onto the caller's event loop;
    # prefixd calls handles from synchronous code too (the erasure's replica evictor, in
    # the scheduler and the CLI), which that refuses ("No event loop running").
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    # And it would buffer a replica's log lines by the thousand, losing them when the
    # replica dies: the lines that say why, with the request id an error body returns.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve_environment(settings: Settings) -> dict[str, str]:
    """The variables to add to the environment before ``ray.init`` for a Ray about to be
    started, from ``settings.serve_high_throughput`` and ``settings.serve_drain_seconds``.
    With the mode off, Serve's two switches are set to ``"0"``, so a shell's own setting
    cannot turn it on behind the setting's back."""
    if not settings.serve_high_throughput:
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    return {
        **HIGH_THROUGHPUT_ENV,
        # Ray's default holds every stopped ingress replica open for 30 s, and each
        # `serve.shutdown` or redeployment with it.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(settings.serve_drain_seconds),
        # Fixed by default (HAProxy's statistics page 8404 and Prometheus counters 9101, the
        # head node's fallback Python proxy, used while no ingress replica is up, 8500 and
        # 9500): a second Ray on the machine would fail to start its HAProxy. Its files are
        # already per Ray node (/tmp/haproxy-serve/<node id>/).
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(_free_port()),
    }
