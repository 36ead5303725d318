"""A ``prefixd up`` in a subprocess for the end-to-end benchmarks, driven over loopback.

The service gets a temporary ``PREFIXD_HOME`` (SQLite and a blob directory there), a model
directory and a free port; the benchmark gets its base URL and the generated admin token.
Its output is echoed (prefixed ``up:``) and kept draining, so a full pipe never blocks the
service mid-run; it is stopped with Ctrl-C as a user would, and its process group killed if
that takes too long.

    with local_service(home, model_dir, env={"PREFIXD_TRAINER_SLOTS": "2"}) as (url, token):
        httpx.get(f"{url}/v1/health")
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

TOKEN_LINE = re.compile(r"admin token \(generated.*\): (\S+)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _echo(lines: Iterable[str]) -> None:
    for line in lines:
        print("  up:", line.rstrip(), flush=True)


@contextmanager
def local_service(
    home: Path, model_dir: Path | str, *, env: Mapping[str, str] = {}, stop_timeout: float = 120
) -> Iterator[tuple[str, str]]:
    """Start ``prefixd up`` on ``model_dir`` (a model directory, or ``embedded``); yield
    ``(base_url, admin_token)``; stop it on exit."""
    port = free_port()
    # Only what this run sets: never a PREFIXD_* or RAY_ADDRESS of the calling shell.
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith("PREFIXD_") and k != "RAY_ADDRESS"
    }
    environment |= {"PREFIXD_HOME": str(home), "PREFIXD_MODEL": str(model_dir), **env}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefixd"), "up", "--port", str(port)],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so a stuck stop can take Ray down too
    )
    assert process.stdout is not None
    try:
        token = None
        for line in process.stdout:
            print("  up:", line.rstrip(), flush=True)
            if match := TOKEN_LINE.search(line):
                token = match.group(1)
                break
        if token is None:
            raise RuntimeError(f"prefixd up exited (status {process.wait()}) before it was ready")
        threading.Thread(target=_echo, args=(process.stdout,), daemon=True).start()
        yield f"http://127.0.0.1:{port}", token
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            print(f"  up: did not stop within {stop_timeout:.0f} s; killing its process group")
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
