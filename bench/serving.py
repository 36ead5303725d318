"""Serving benchmark: many tenants' prefixes in one batch, on the embedded model.

Measures, in one run and on the same inputs (8 E2E meaning representations, 8 tenants with
their own length-10 prefixes, greedy decoding of a fixed number of tokens — EOS ignored so
every side decodes exactly the same amount):

1. throughput of one mixed batch of the 8 tenants (``common.generation.generate``) against
   the same 8 inputs on the **bare model** in one batch (target ≥ 0.9×) and against
   **one request at a time**, loading that request's prefix per call, as single-adapter
   servers do (target ≥ 3×);
2. p50/p95 latency and throughput of the batcher (``ContinuousBatcher``, the decode
   loop inside every inference replica) at 1, 4, 8 and 16 concurrent closed-loop clients,
   each request for a random tenant — in process, without Ray Serve's HTTP hop;
3. the cold-prefix penalty: loading a prefix that is not cached from the blob store over
   HTTP (an S3 server on loopback, moto) into the replica's ``PrefixCache``, against a
   cache hit.

    .venv/bin/python -m bench.serving [--new-tokens 32] [--rounds 3] [--requests 6]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path

import torch

from bench.report import write_section
from common.architectures import prefix_shape
from common.config import get_settings
from common.data import encode_prompt
from common.datasets.e2e import read_e2e
from common.generation import DecodingConfig, GenerationRow, generate
from common.model_loading import LoadedModel, load_model
from common.prefix_file import Prefix, prefix_from_bytes, prefix_to_bytes
from common.prefix_init import text_key_values
from services.inference.batcher import ContinuousBatcher
from services.inference.prefix_cache import PrefixCache

TENANTS, PREFIX_LENGTH = 8, 10
IMG = Path(__file__).resolve().parent.parent / "docs" / "img" / "serving.png"


def tenant_prefixes(loaded: LoadedModel, count: int) -> list[Prefix]:
    """Realistic prefixes: the model's own key/values of ten-token texts (random vectors
    would have unrealistic magnitudes)."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()
    prefixes = []
    for i in range(count):
        text = " ".join(words[(i + j) % len(words)] for j in range(PREFIX_LENGTH))
        key_values = text_key_values(loaded.model, loaded.tokenizer, text)[:, :, :, :PREFIX_LENGTH]
        prefixes.append(Prefix(key_values.contiguous(), loaded.fingerprint, loaded.architecture))
    return prefixes


def tokens_per_second(fn, tokens: int) -> float:
    started = time.perf_counter()
    fn()
    return tokens / (time.perf_counter() - started)


def batch_comparison(
    loaded, prefixes, inputs, new_tokens: int, rounds: int
) -> dict[str, list[float]]:
    decoding = DecodingConfig(max_new_tokens=new_tokens)
    pad = int(loaded.tokenizer.pad_token_id)
    blobs = [prefix_to_bytes(p) for p in prefixes]

    def run(rows):
        return generate(loaded.model, rows, decoding, eos_token_id=-1, pad_token_id=pad)

    def mixed():
        run([GenerationRow(ids, p.key_values) for ids, p in zip(inputs, prefixes, strict=True)])

    def bare():
        run([GenerationRow(ids, None) for ids in inputs])

    def one_at_a_time():
        for ids, blob in zip(inputs, blobs, strict=True):
            prefix = prefix_from_bytes(blob, expected_fingerprint=loaded.fingerprint)
            run([GenerationRow(ids, prefix.key_values)])

    total = new_tokens * len(inputs)
    mixed()  # warm-up
    results: dict[str, list[float]] = {"mixed": [], "bare": [], "sequential": []}
    for _ in range(rounds):
        results["mixed"].append(tokens_per_second(mixed, total))
        results["bare"].append(tokens_per_second(bare, total))
        results["sequential"].append(tokens_per_second(one_at_a_time, total))
    return results


async def _closed_loop(engine, prefixes, inputs, new_tokens: int, clients: int, requests: int):
    """``clients`` clients, each sending ``requests`` requests one after another."""
    latencies: list[float] = []

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(requests):
            tenant = rng.randrange(len(prefixes))
            row = GenerationRow(inputs[tenant], prefixes[tenant].key_values)
            started = time.perf_counter()
            await engine.generate(row, DecodingConfig(max_new_tokens=new_tokens))
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, time.perf_counter() - started


def concurrency_sweep(loaded, prefixes, inputs, new_tokens: int, requests: int, levels: list[int]):
    rows = []
    for clients in levels:
        engine = ContinuousBatcher(loaded, max_batch_size=16, batch_wait_s=0.005, stop_at_eos=False)
        latencies, wall = asyncio.run(
            _closed_loop(engine, prefixes, inputs, new_tokens, clients, requests)
        )
        engine.close()
        quantiles = statistics.quantiles(latencies, n=20)
        rows.append(
            {
                "clients": clients,
                "p50": statistics.median(latencies),
                "p95": quantiles[18],
                "tokens_per_s": len(latencies) * new_tokens / wall,
                "max_rows": engine.stats.max_rows_in_batch,
            }
        )
        print(f"{clients} clients: {rows[-1]}")
    return rows


def cold_prefix_penalty(loaded, prefixes, samples: int = 20) -> dict[str, float]:
    """ms to get a prefix into the replica cache from S3 over HTTP vs a cache hit."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    from common.blobstore.s3 import S3BlobStore

    with socket.socket() as probe:  # a free loopback port for the S3 server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the S3 server's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        session = boto3.session.Session(
            aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1"
        )
        endpoint = f"http://127.0.0.1:{port}"
        session.client("s3", endpoint_url=endpoint).create_bucket(Bucket="prefixd-bench")
        store = S3BlobStore("prefixd-bench", "bench", endpoint_url=endpoint, session=session)
        keys = []
        for i in range(samples):
            key = f"tenants/{i:08d}-0000-0000-0000-000000000000/prefixes/p.safetensors"
            store.put_bytes(key, prefix_to_bytes(prefixes[i % len(prefixes)]))
            keys.append(key)

        async def load(prefix_id: str, key: str) -> Prefix:
            data = await asyncio.to_thread(store.get_bytes, key)
            return prefix_from_bytes(
                data,
                expected_fingerprint=loaded.fingerprint,
                expected_shape=prefix_shape(loaded.model.config),
            )

        async def measure() -> tuple[list[float], list[float]]:
            cache = PrefixCache(10**9, load)
            cold, warm = [], []
            for i, key in enumerate(keys):
                started = time.perf_counter()
                await cache.get(str(i), key)
                cold.append(time.perf_counter() - started)
                started = time.perf_counter()
                await cache.get(str(i), key)
                warm.append(time.perf_counter() - started)
            return cold, warm

        cold, warm = asyncio.run(measure())
    finally:
        server.stop()
    return {"cold_ms": statistics.median(cold) * 1000, "warm_ms": statistics.median(warm) * 1000}


def plot(rows, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    clients = [r["clients"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(clients, [r["tokens_per_s"] for r in rows], "o-")
    left.set_xlabel("concurrent clients")
    left.set_ylabel("output tokens/s")
    left.set_title("throughput (8 tenants, mixed)")
    right.plot(clients, [r["p50"] for r in rows], "o-", label="p50")
    right.plot(clients, [r["p95"] for r in rows], "s--", label="p95")
    right.set_xlabel("concurrent clients")
    right.set_ylabel("latency per request (s)")
    right.set_title("latency")
    right.legend()
    for axis in (left, right):
        axis.set_xticks(clients)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=6, help="requests per client in the sweep")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--model", default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    loaded = load_model(args.model, settings=get_settings())
    prefixes = tenant_prefixes(loaded, TENANTS)
    mrs = read_e2e()[:TENANTS]
    inputs = [encode_prompt(loaded.tokenizer, m.mr) for m in mrs]

    batch = batch_comparison(loaded, prefixes, inputs, args.new_tokens, args.rounds)
    median = {k: statistics.median(v) for k, v in batch.items()}
    vs_bare = [m / b for m, b in zip(batch["mixed"], batch["bare"], strict=True)]
    vs_seq = [m / s for m, s in zip(batch["mixed"], batch["sequential"], strict=True)]
    print(batch)
    sweep = concurrency_sweep(loaded, prefixes, inputs, args.new_tokens, args.requests, args.levels)
    cold = cold_prefix_penalty(loaded, prefixes)
    print(cold)
    image = plot(sweep, IMG)

    fmt = lambda values: ", ".join(f"{v:.1f}" for v in values)  # noqa: E731
    sweep_rows = "\n".join(
        f"| {r['clients']} | {r['tokens_per_s']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['max_rows']} |"
        for r in sweep
    )
    body = f"""{TENANTS} tenants, each with its own length-{PREFIX_LENGTH} prefix, one E2E meaning
representation each (inputs of {min(map(len, inputs))}–{max(map(len, inputs))} tokens), greedy,
{args.new_tokens} new tokens per request (EOS ignored so every side decodes the same amount);
{args.rounds} alternating rounds.

| side | output tokens/s per round | median |
|---|---|---|
| 8 tenants mixed in one batch (prefixd) | {fmt(batch["mixed"])} | {median["mixed"]:.1f} |
| the same 8 inputs on the bare model, one batch | {fmt(batch["bare"])} | {median["bare"]:.1f} |
| one request at a time, prefix loaded per call | {fmt(batch["sequential"])} | {median["sequential"]:.1f} |

**Mixed batch vs bare model: {statistics.median(vs_bare):.2f}×** (target ≥ 0.9×; per round {fmt(vs_bare)}).
**Mixed batch vs one at a time: {statistics.median(vs_seq):.2f}×** (target ≥ 3×; per round {fmt(vs_seq)}).

The batcher (`ContinuousBatcher`, the decode loop of each inference replica) under
closed-loop load, each request for a random one of the 8 tenants, {args.requests} requests per
client, max batch 16, in process (no HTTP hop):

| concurrent clients | output tokens/s | p50 latency (s) | p95 latency (s) | largest batch |
|---|---|---|---|---|
{sweep_rows}

![throughput and latency against concurrency](img/{image.name})

Cold prefix (not in the replica's cache; fetched from an S3 server over HTTP on loopback,
checksum verified, parsed and validated): **{cold["cold_ms"]:.1f} ms** median against
{cold["warm_ms"]:.3f} ms for a cache hit — a penalty of {cold["cold_ms"] - cold["warm_ms"]:.1f} ms (target ≤ 50 ms).

Reproduce: `.venv/bin/python -m bench.serving --new-tokens {args.new_tokens} --rounds {args.rounds} --requests {args.requests}`
"""
    print(body)
    if not args.no_write:
        print("wrote", write_section("Serving (bench/serving.py)", body))


if __name__ == "__main__":
    main()
