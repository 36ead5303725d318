"""services/serve_mode.py: the environment of a Ray that prefixd starts, and the API port
answered by HAProxy when Serve's high-throughput mode is on (the test Ray starts in it)."""

from __future__ import annotations

import httpx
import psutil
import pytest

from common.config import Settings
from services.serve_mode import HIGH_THROUGHPUT_ENV, serve_environment

SIDE_PORTS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


def test_the_mode_sets_serves_switches_and_free_side_ports(tmp_path):
    settings = Settings(home=tmp_path, serve_high_throughput=True, serve_drain_seconds=1.5)
    environment = serve_environment(settings)
    assert {k: environment[k] for k in HIGH_THROUGHPUT_ENV} == HIGH_THROUGHPUT_ENV
    assert environment["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "1.5"
    ports = [int(environment[name]) for name in SIDE_PORTS]
    assert len(set(ports)) == len(ports) and all(1024 <= p <= 65535 for p in ports)
    # A second Ray on the machine gets other ports than Ray's fixed defaults.
    assert not {8404, 9101, 8500, 9500} & set(ports)


def test_the_mode_off_turns_serves_switches_off_whatever_the_shell_says(tmp_path):
    environment = serve_environment(Settings(home=tmp_path, serve_high_throughput=False))
    assert environment == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}


def test_the_api_port_is_served_by_haproxy(stack):
    if not Settings().serve_high_throughput:
        pytest.skip("the suite runs on Serve's Python proxy (PREFIXD_SERVE_HIGH_THROUGHPUT=false)")
    port = int(stack.url.rsplit(":", 1)[1])
    listeners = {
        connection.pid
        for connection in psutil.net_connections("tcp")
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
    }
    assert {psutil.Process(pid).name() for pid in listeners if pid} == {"haproxy"}
    assert httpx.get(f"{stack.url}/healthz", timeout=10).status_code == 200
