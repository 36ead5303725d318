"""Load on the embedded model: generate through the HTTP API of a `prefixd up` on the
embedded default (SmolLM2-135M-Instruct), from ``--concurrency`` clients at once against the
same calls one at a time (issue 16: "on the embedded model through HTTP: 8 concurrent
clients against one at a time").

Tenants get an active prefix each before the service starts, as in ``bench/load.py``; each
call is a random tenant's. The baseline and the concurrent calls run in the same service,
one after the other, alternated for ``--rounds`` rounds.

    .venv/bin/python -m bench.load_embedded [--concurrency 8] [--rounds 2] [--python-proxy]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.load import SERVICE_ENV, Recorder, generate_body, percentile, seed_tenants
from bench.local_service import local_service
from bench.report import write_section

TITLE = "Load on the embedded model (bench/load_embedded.py)"


def one_round(
    client: httpx.Client,
    tenants: list[tuple[str, str]],
    *,
    calls: int,
    concurrency: int,
    max_new_tokens: int,
    seed: int,
) -> tuple[Recorder, float, Recorder, float]:
    """``calls`` calls one at a time (the baseline), then ``calls`` per client from
    ``concurrency`` clients at once; each with its seconds."""

    def call(recorder: Recorder, local: random.Random) -> None:
        _, key = local.choice(tenants)
        recorder.call(
            "generate",
            client,
            "POST",
            "/v1/generate",
            json=generate_body(local, max_new_tokens),
            headers={"Authorization": f"Bearer {key}"},
        )

    def client_loop(recorder: Recorder, client_seed: int) -> None:
        local = random.Random(client_seed)
        for _ in range(calls):
            call(recorder, local)

    alone = Recorder()
    started = time.perf_counter()
    client_loop(alone, seed)
    alone_seconds = time.perf_counter() - started
    together = Recorder()
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        seeds = range(seed * 100 + 1, seed * 100 + 1 + concurrency)
        list(pool.map(lambda s: client_loop(together, s), seeds))
    return alone, alone_seconds, together, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--calls", type=int, default=8, help="calls per client and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--python-proxy", action="store_true", help="as in bench.load")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    rows = []
    ratios = []
    with tempfile.TemporaryDirectory(prefix="prefixd-load-embedded-") as tmp:
        home = Path(tmp) / "home"
        tenants = seed_tenants(home, Path("embedded"), args.tenants)
        mode = str(not args.python_proxy).lower()
        env = SERVICE_ENV | {"PREFIXD_SERVE_HIGH_THROUGHPUT": mode}
        with local_service(home, "embedded", env=env) as (url, _):
            limits = httpx.Limits(max_connections=args.concurrency * 2)
            with httpx.Client(base_url=url, timeout=300, limits=limits) as client:
                # Warm up: prefixes into the replica's cache, the first forward passes.
                one_round(
                    client,
                    tenants,
                    calls=args.tenants,
                    concurrency=1,
                    max_new_tokens=2,
                    seed=0,
                )
                for index in range(args.rounds):
                    alone, alone_s, together, together_s = one_round(
                        client,
                        tenants,
                        calls=args.calls,
                        concurrency=args.concurrency,
                        max_new_tokens=args.max_new_tokens,
                        seed=index + 1,
                    )
                    base = len(alone.latencies["generate"]) / alone_s
                    burst = len(together.latencies["generate"]) / together_s
                    ratios.append(burst / base)
                    for name, recorder, rate in (
                        ("one at a time", alone, base),
                        (f"{args.concurrency} clients at once", together, burst),
                    ):
                        values = recorder.latencies["generate"]
                        bad, total = recorder.errors("generate")
                        rows.append(
                            f"| {index + 1} | {name} | {total} | {rate:.2f} | "
                            f"{percentile(values, 50) * 1000:.0f} | "
                            f"{percentile(values, 95) * 1000:.0f} | {bad} |"
                        )
    serving = "Serve's Python HTTP proxy" if args.python_proxy else "Serve's high-throughput mode"
    command = (
        f"`.venv/bin/python -m bench.load_embedded --tenants {args.tenants} "
        f"--concurrency {args.concurrency} --calls {args.calls} --rounds {args.rounds} "
        f"--max-new-tokens {args.max_new_tokens}{' --python-proxy' if args.python_proxy else ''}`"
    )
    body = f"""
{command} — `prefixd up` on the embedded model (SmolLM2-135M-Instruct, CPU; {serving}),
{args.tenants} tenants with a prefix each, generate calls of `max_new_tokens`
{args.max_new_tokens} for a random tenant, through HTTP on loopback. Baseline: the same
calls one at a time, in the same service, alternated with the concurrent ones.

| round | clients | calls | calls/s | p50 ms | p95 ms | errors |
|---|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

**{args.concurrency} clients vs one at a time: {statistics.median(ratios):.2f}×** (median)
(rounds: {", ".join(f"{r:.2f}×" for r in ratios)}).
"""
    print(body)
    if not (args.no_write or args.python_proxy):
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
