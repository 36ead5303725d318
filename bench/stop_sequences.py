"""What stop sequences cost the decode loop, on the embedded model.

The decode loop (``ContinuousBatcher``) decodes a row's whole text after every token to
check its stop sequences (``common/stop_sequences.py``). Measured in one run, alternating
rounds: 8 concurrent requests decoding a fixed number of tokens (EOS ignored) with **no
stop sequences** (the baseline) against the same requests with **4 stop sequences that
never match** (the worst case: every token of every row is checked until the end); and one
check of a whole output's text on its own, against the time per output token.

    .venv/bin/python -m bench.stop_sequences [--new-tokens 64] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from bench.report import write_section
from common.config import get_settings
from common.data import encode_prompt
from common.generation import DecodingConfig, GenerationRow
from common.model_loading import load_model
from common.stop_sequences import StopChecker
from services.inference.batcher import ContinuousBatcher

REQUESTS = 8
NEVER = ("<<never-1>>", "<<never-2>>", "\n\n\n\n\n\n", "zzzzzzzzqq")


def tokens_per_second(batcher: ContinuousBatcher, rows, decoding: DecodingConfig) -> float:
    async def main() -> list[list[int]]:
        return await asyncio.gather(*(batcher.generate(row, decoding) for row in rows))

    started = time.perf_counter()
    outputs = asyncio.run(main())
    elapsed = time.perf_counter() - started
    assert all(len(o) == decoding.max_new_tokens for o in outputs)  # nothing stopped early
    return sum(len(o) for o in outputs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = get_settings()
    loaded = load_model(settings.model, settings=settings)
    batcher = ContinuousBatcher(loaded, max_batch_size=REQUESTS, stop_at_eos=False)
    texts = [f"name : Restaurant {i} | food : Italian | area : city centre" for i in range(8)]
    rows = [GenerationRow(encode_prompt(loaded.tokenizer, t), None) for t in texts]
    plain = DecodingConfig(max_new_tokens=args.new_tokens)
    stopped = DecodingConfig(max_new_tokens=args.new_tokens, stop=NEVER)
    tokens_per_second(batcher, rows[:2], plain)  # warm up
    results: dict[str, list[float]] = {"none": [], "four": []}
    try:
        for _ in range(args.rounds):
            results["none"].append(tokens_per_second(batcher, rows, plain))
            results["four"].append(tokens_per_second(batcher, rows, stopped))
        output = asyncio.run(batcher.generate(rows[0], plain))  # a full-length output
    finally:
        batcher.close()
    ratios = [s / p for s, p in zip(results["four"], results["none"], strict=True)]
    # One check of a full-length output (the most expensive one), timed alone.
    checker = StopChecker(loaded.tokenizer, NEVER)
    started = time.perf_counter()
    for _ in range(200):
        checker(output)
    check_ms = (time.perf_counter() - started) / 200 * 1000
    token_ms = 1000 / statistics.median(results["none"])

    def cells(values: list[float]) -> str:
        return ", ".join(f"{v:.1f}" for v in values)

    body = f"""
{REQUESTS} concurrent requests (bare embedded model, E2E-style inputs), greedy,
{args.new_tokens} new tokens each (EOS ignored), `ContinuousBatcher` in process, torch
threads {args.threads}; {args.rounds} alternating rounds.

| side | output tokens/s per round | median |
|---|---|---|
| no stop sequences (baseline) | {cells(results["none"])} | {statistics.median(results["none"]):.1f} |
| 4 stop sequences that never match (every token checked) | {cells(results["four"])} | {statistics.median(results["four"]):.1f} |

**With stop sequences vs without: {statistics.median(ratios):.2f}×** (per round
{", ".join(f"{r:.2f}" for r in ratios)}; on a shared machine the spread between rounds is
larger than any difference the check makes). One check of a {args.new_tokens}-token output (the
longest, so the dearest: the whole text is decoded each time) takes **{check_ms:.3f} ms**,
against {token_ms:.1f} ms per output token of the baseline
({check_ms / token_ms * 100:.2f}%). A stop sequence that matches ends its row and saves
every token after it.

Reproduce: `.venv/bin/python -m bench.stop_sequences --new-tokens {args.new_tokens} --rounds {args.rounds} --threads {args.threads}`
"""
    path = write_section("Stop sequences in the decode loop (bench/stop_sequences.py)", body)
    print(body)
    print("wrote", path)


if __name__ == "__main__":
    main()
