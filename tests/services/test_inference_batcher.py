"""The continuous-batching engine and the prefix cache, on a tiny model, without Ray."""

import asyncio
import contextlib
import time

import pytest
import torch

from common.architectures import prefix_shape
from common.generation import DecodingConfig, GenerationRow, generate
from common.prefix_file import Prefix
from services.inference.batcher import ContinuousBatcher
from services.inference.prefix_cache import PrefixCache, prefix_bytes


def random_prefix(loaded, length, seed):
    shape = prefix_shape(loaded.model.config).tensor_shape(length)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def solo(loaded, row, decoding):
    tok = loaded.tokenizer
    return generate(
        loaded.model, [row], decoding, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )[0]


@pytest.fixture
def batcher(tiny_llama):
    engine = ContinuousBatcher(tiny_llama, max_batch_size=8, batch_wait_s=0.05)
    yield engine
    engine.close()


def test_eight_tenants_share_forward_passes_and_get_their_solo_outputs(tiny_llama, batcher):
    rows = [
        GenerationRow(list(range(10, 10 + 1 + i % 4)), random_prefix(tiny_llama, 1 + i, seed=i))
        for i in range(8)
    ]
    greedy = DecodingConfig(max_new_tokens=8)

    async def main():
        return await asyncio.gather(*(batcher.generate(row, greedy) for row in rows))

    outputs = asyncio.run(main())
    assert outputs == [solo(tiny_llama, row, greedy) for row in rows]
    total_tokens = sum(len(o) for o in outputs)
    assert batcher.stats.requests == 8
    assert batcher.stats.max_rows_in_batch > 1
    assert batcher.stats.forward_passes < total_tokens  # rows shared forward passes


def test_late_arrivals_join_the_running_batch(tiny_llama, batcher):
    rows = [
        GenerationRow([10 + i, 11], random_prefix(tiny_llama, 2 + i, seed=20 + i)) for i in range(4)
    ]
    decoding = DecodingConfig(max_new_tokens=12)

    async def main():
        first = asyncio.create_task(batcher.generate(rows[0], decoding))
        await asyncio.sleep(0.2)  # the first request is decoding by now
        rest = await asyncio.gather(*(batcher.generate(row, decoding) for row in rows[1:]))
        return [await first, *rest]

    assert asyncio.run(main()) == [solo(tiny_llama, row, decoding) for row in rows]


def test_mixed_decoding_settings_in_one_batch(tiny_llama, batcher):
    prefix = random_prefix(tiny_llama, 3, seed=1)
    row = GenerationRow([12, 13, 14], prefix)
    settings = [
        DecodingConfig(max_new_tokens=6),
        DecodingConfig(max_new_tokens=6, do_sample=True, temperature=1.3, seed=7),
        DecodingConfig(max_new_tokens=3, do_sample=True, top_p=0.5, seed=8),
        DecodingConfig(max_new_tokens=6, num_beams=3),
        DecodingConfig(max_new_tokens=6, frequency_penalty=1.5, presence_penalty=0.5),
        DecodingConfig(max_new_tokens=6, do_sample=True, seed=9, frequency_penalty=-1.0),
    ]

    async def main():
        return await asyncio.gather(*(batcher.generate(row, d) for d in settings))

    outputs = asyncio.run(main())
    # Per-row generators: a sampled row gives what it gives alone, whatever its batch.
    assert outputs == [solo(tiny_llama, row, d) for d in settings]


def test_penalized_rows_share_the_batch_and_get_their_solo_outputs(tiny_llama, batcher):
    rows = [
        GenerationRow([10 + i, 11], random_prefix(tiny_llama, 2 + i, seed=30 + i)) for i in range(4)
    ]
    plain = DecodingConfig(max_new_tokens=12)
    penalized = DecodingConfig(max_new_tokens=12, frequency_penalty=2.0, presence_penalty=2.0)
    decodings = [penalized, plain, penalized, plain]

    async def main():
        return await asyncio.gather(
            *(batcher.generate(r, d) for r, d in zip(rows, decodings, strict=True))
        )

    outputs = asyncio.run(main())
    assert outputs == [solo(tiny_llama, r, d) for r, d in zip(rows, decodings, strict=True)]
    # The penalties changed what the penalized rows say (so the batcher really applied them).
    assert any(outputs[i] != solo(tiny_llama, rows[i], plain) for i in (0, 2))
    assert batcher.stats.max_rows_in_batch > 1


def test_streaming_yields_the_same_tokens(tiny_llama, batcher):
    row = GenerationRow([15, 16], random_prefix(tiny_llama, 4, seed=3))
    decoding = DecodingConfig(max_new_tokens=7)

    async def main():
        return [token async for token in batcher.stream(row, decoding)]

    assert asyncio.run(main()) == solo(tiny_llama, row, decoding)


def test_a_row_ends_at_its_stop_sequence_and_leaves_the_batch(tiny_llama, batcher):
    """The decode loop ends a row as soon as its text holds a stop sequence: it produces
    no token after the one that completed it (its slot is free), and its batch neighbour
    decodes on, unchanged."""
    tokenizer = tiny_llama.tokenizer
    row = GenerationRow([12, 13], random_prefix(tiny_llama, 2, seed=4))
    neighbour = GenerationRow([15, 16], random_prefix(tiny_llama, 4, seed=3))
    free = DecodingConfig(max_new_tokens=12)
    expected = solo(tiny_llama, row, free)
    special = set(tokenizer.all_special_ids)
    at = next(k for k in range(2, len(expected)) if expected[k] not in special)
    at = expected.index(expected[at])  # the word's first use
    stop = DecodingConfig(max_new_tokens=12, stop=(tokenizer.decode([expected[at]]),))

    async def main():
        return await asyncio.gather(batcher.generate(row, stop), batcher.generate(neighbour, free))

    stopped, other = asyncio.run(main())
    assert stopped == expected[: at + 1] and len(stopped) < len(expected)
    assert other == solo(tiny_llama, neighbour, free)
    assert batcher.stats.stopped_rows == 1
    assert batcher.stats.tokens == len(stopped) + len(other)  # nothing decoded past the stop


def test_invalid_decoding_fails_alone(tiny_llama, batcher):
    from common.errors import InvalidInputError

    row = GenerationRow([15, 16], None)

    async def main():
        good = asyncio.create_task(batcher.generate(row, DecodingConfig(max_new_tokens=4)))
        with pytest.raises(InvalidInputError):
            await batcher.generate(row, DecodingConfig(max_new_tokens=0))
        return await good

    assert asyncio.run(main()) == solo(tiny_llama, row, DecodingConfig(max_new_tokens=4))


def test_a_pathological_temperature_is_greedy_and_never_fails_the_batch(tiny_llama, batcher):
    """Issue 16: temperature 1e-300 overflowed in the shared sampling step and failed every
    co-batched row. Below an epsilon it is greedy; nobody else notices it."""
    rows = [GenerationRow([12 + i, 13], random_prefix(tiny_llama, 2 + i, seed=i)) for i in range(3)]
    normal = [
        DecodingConfig(max_new_tokens=6),
        DecodingConfig(max_new_tokens=6, do_sample=True, temperature=0.8, seed=11),
    ]
    tiny = DecodingConfig(max_new_tokens=6, do_sample=True, temperature=1e-300, seed=1)

    async def main():
        return await asyncio.gather(
            batcher.generate(rows[0], normal[0]),
            batcher.generate(rows[1], normal[1]),
            batcher.generate(rows[2], tiny),
        )

    outputs = asyncio.run(main())
    assert outputs[:2] == [solo(tiny_llama, rows[i], normal[i]) for i in range(2)]
    assert outputs[2] == solo(tiny_llama, rows[2], DecodingConfig(max_new_tokens=6))


@pytest.mark.parametrize("sample", [True, False])
def test_a_row_whose_decoding_fails_fails_alone(tiny_llama, batcher, sample):
    """A row whose scores are not finite (here a NaN prefix, which prefix loading refuses but
    the engine does not take on trust) fails with its own error; the rows it shared the
    batch with continue and get exactly their solo outputs."""
    from common.errors import DecodingFailedError

    poisoned = random_prefix(tiny_llama, 3, seed=5)
    poisoned[:, 1] = float("nan")  # every value: the row's logits are NaN
    bad = GenerationRow([12, 13], poisoned)
    good = [
        GenerationRow([14 + i, 15], random_prefix(tiny_llama, 2, seed=30 + i)) for i in range(3)
    ]
    decodings = [
        DecodingConfig(max_new_tokens=8),
        DecodingConfig(max_new_tokens=8, do_sample=True, temperature=1.2, seed=3),
        DecodingConfig(max_new_tokens=8, do_sample=True, top_p=0.7, seed=4),
    ]
    bad_decoding = DecodingConfig(max_new_tokens=8, do_sample=sample, seed=9)

    async def main():
        tasks = [
            asyncio.create_task(batcher.generate(row, d))
            for row, d in zip(good, decodings, strict=True)
        ]
        with pytest.raises(DecodingFailedError, match="not finite"):
            await batcher.generate(bad, bad_decoding)
        return await asyncio.gather(*tasks)

    outputs = asyncio.run(main())
    assert outputs == [solo(tiny_llama, r, d) for r, d in zip(good, decodings, strict=True)]
    # The replica keeps serving: a later request decodes normally.
    assert asyncio.run(batcher.generate(good[0], decodings[0])) == outputs[0]


def test_a_long_beam_search_does_not_stall_the_shared_batch_and_stops_when_cancelled(tiny_llama):
    """Issue 16: beam searches ran on the decode thread, one after another, so one tenant's
    maximal beam request stalled every other tenant; cancellation was not checked."""
    engine = ContinuousBatcher(tiny_llama, max_batch_size=8, batch_wait_s=0.0, stop_at_eos=False)
    row = GenerationRow([12, 13], random_prefix(tiny_llama, 3, seed=1))
    beams = DecodingConfig(max_new_tokens=100, num_beams=16)
    greedy = DecodingConfig(max_new_tokens=4)

    async def main():
        search = asyncio.create_task(engine.generate(row, beams))
        await asyncio.sleep(0.05)  # the search is under way
        quick = await asyncio.wait_for(engine.generate(row, greedy), timeout=30)
        still_searching = not search.done()
        search.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await search
        return quick, still_searching

    def cancelled_mid_search(before: int) -> bool:
        deadline = time.monotonic() + 10
        while engine.stats.beam_cancelled <= before:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    try:
        # On a loaded machine the OS may leave the decode thread unscheduled long enough for
        # the whole search to end first (or to end between the check and the cancel): try
        # again. With the search on the decode thread (the defect) the greedy request never
        # finishes first; without cancellation checks the search is never counted cancelled.
        outcomes = []
        for _attempt in range(3):
            before = engine.stats.beam_cancelled
            quick, still_searching = asyncio.run(main())
            assert len(quick) == 4
            outcomes.append((still_searching, still_searching and cancelled_mid_search(before)))
            if outcomes[-1] == (True, True):
                break
        assert outcomes[-1] == (True, True), outcomes  # (finished first, stopped mid-search)
        short = DecodingConfig(max_new_tokens=3, num_beams=2)
        assert len(asyncio.run(engine.generate(row, short))) == 3  # the lane is free again
    finally:
        engine.close()


def make_prefix(loaded, length, seed=0):
    return Prefix(random_prefix(loaded, length, seed), loaded.fingerprint, "llama")


def test_prefix_cache_hits_misses_and_single_flight(tiny_llama):
    loads: list[str] = []

    async def load(prefix_id):
        loads.append(prefix_id)
        await asyncio.sleep(0.05)
        return make_prefix(tiny_llama, 4)

    async def main():
        cache = PrefixCache(10**9, load)
        first = await asyncio.gather(*(cache.get("a") for _ in range(5)))  # concurrent misses
        again = await cache.get("a")
        return cache, first, again

    cache, first, again = asyncio.run(main())
    assert loads == ["a"]  # five concurrent misses, one load
    assert all(p is first[0] for p in first) and again is first[0]
    assert cache.stats.loads == 1 and cache.stats.hits == 1


def test_prefix_cache_is_bounded_by_bytes_lru(tiny_llama):
    size = prefix_bytes(make_prefix(tiny_llama, 4))

    async def load(prefix_id):
        return make_prefix(tiny_llama, 4)

    async def main():
        cache = PrefixCache(3 * size, load)
        for key in "abc":
            await cache.get(key)
        await cache.get("a")  # a is now the most recent
        await cache.get("d")  # evicts b, the least recent
        return cache

    cache = asyncio.run(main())
    assert cache.keys() == ["c", "a", "d"]
    assert cache.stats.bytes == 3 * size <= cache.max_bytes
    assert cache.stats.evictions == 1
    assert cache.evict(["a", "zzz"]) == 1 and "a" not in cache


def test_failed_load_is_not_cached_and_reaches_every_waiter(tiny_llama):
    attempts = []

    async def load(prefix_id):
        attempts.append(prefix_id)
        await asyncio.sleep(0.02)
        if len(attempts) == 1:
            raise OSError("blob store down")
        return make_prefix(tiny_llama, 2)

    async def main():
        cache = PrefixCache(10**9, load)
        results = await asyncio.gather(cache.get("x"), cache.get("x"), return_exceptions=True)
        return results, await cache.get("x")

    results, later = asyncio.run(main())
    assert all(isinstance(r, OSError) for r in results)
    assert later.prefix_length == 2 and len(attempts) == 2


def stacked(loaded, base, tenant, base_id):
    """The tenant's prefix as served: ``stack_prefixes(base, tenant)`` via the core's
    ``inference_prefix``, its base checked by id and fingerprint."""
    from common.base_prefix import inference_prefix, key_values_fingerprint

    prefix = Prefix(
        tenant,
        loaded.fingerprint,
        loaded.architecture,
        base_prefix_id=base_id,
        base_fingerprint=key_values_fingerprint(base),
        base_mode="stack",
    )
    base_prefix = Prefix(base, loaded.fingerprint, loaded.architecture)
    return inference_prefix(prefix, base_prefix, base_prefix_id=base_id).key_values


def test_mixed_base_and_tenant_combinations_get_their_solo_outputs(tiny_llama, batcher):
    base_a, base_b = random_prefix(tiny_llama, 3, seed=70), random_prefix(tiny_llama, 5, seed=71)
    served = [
        stacked(tiny_llama, base_a, random_prefix(tiny_llama, 2, seed=72), "a"),
        stacked(tiny_llama, base_b, random_prefix(tiny_llama, 4, seed=73), "b"),
        stacked(tiny_llama, base_a, random_prefix(tiny_llama, 6, seed=74), "a"),
        random_prefix(tiny_llama, 3, seed=75),  # a tenant without a base
        base_b,  # the base alone
        None,  # the bare model
    ]
    # Stacking is the base first, then the tenant's part, on the prefix axis.
    assert served[0].shape[3] == 5 and torch.equal(served[0][:, :, :, :3], base_a)
    assert torch.equal(served[1][:, :, :, 5:], random_prefix(tiny_llama, 4, seed=73))
    rows = [GenerationRow([10 + i, 11, 12], p) for i, p in enumerate(served)]
    decoding = DecodingConfig(max_new_tokens=8)

    async def main():
        return await asyncio.gather(*(batcher.generate(row, decoding) for row in rows))

    outputs = asyncio.run(main())
    assert outputs == [solo(tiny_llama, row, decoding) for row in rows]
    assert batcher.stats.max_rows_in_batch > 1


def test_a_stacked_prefix_is_refused_without_its_base_or_with_another(tiny_llama):
    from common.base_prefix import inference_prefix, key_values_fingerprint
    from common.errors import IncompatiblePrefixError

    base = random_prefix(tiny_llama, 3, seed=80)
    prefix = Prefix(
        random_prefix(tiny_llama, 2, seed=81),
        tiny_llama.fingerprint,
        tiny_llama.architecture,
        base_prefix_id="a",
        base_fingerprint=key_values_fingerprint(base),
        base_mode="stack",
    )
    with pytest.raises(IncompatiblePrefixError, match="not available"):
        inference_prefix(prefix, None, base_prefix_id="a")
    changed = Prefix(base + 1, tiny_llama.fingerprint, tiny_llama.architecture)
    with pytest.raises(IncompatiblePrefixError, match="changed"):
        inference_prefix(prefix, changed, base_prefix_id="a")


def test_the_beam_lane_and_the_decode_loop_alternate_steps_when_both_have_work():
    """A replica's compute is shared step by step: with both waiting, neither runs twice in
    a row, so a beam search takes at most every other step from the shared batch. (A thread
    the OS did not run between two of its steps cannot be waiting; on a loaded machine a few
    repeats come from that, never a run of them: a plain lock gives ~all repeats.)"""
    import threading

    from services.inference.batcher import _Turns

    turns, order = _Turns(), []
    start = threading.Barrier(2)

    def worker(name: str) -> None:
        start.wait()
        for _ in range(50):
            turns.acquire(name)
            order.append(name)
            time.sleep(0.002)  # a "forward pass"
            turns.release(name)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("decode", "beam")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(order) == 100
    # Once both are running, turns alternate until one of them is done.
    last_both = min(max(i for i, n in enumerate(order) if n == who) for who in ("decode", "beam"))
    repeats = sum(order[i] == order[i - 1] for i in range(1, last_both + 1))
    assert repeats <= 10, order


def test_a_request_alone_starts_without_waiting_for_a_batch_window(tiny_llama):
    """Issue 16: an idle replica waited ``batch_wait_s`` for company before every request,
    so one call at a time paid the window each time. A request alone starts at once; a burst
    (several queued together) still starts as one batch."""
    engine = ContinuousBatcher(tiny_llama, max_batch_size=8, batch_wait_s=3600.0)
    row = GenerationRow([10, 11], random_prefix(tiny_llama, 2, seed=3))
    greedy = DecodingConfig(max_new_tokens=4)
    try:
        # With an hour's window this would hang (the old behaviour); the bound only keeps a
        # failure from stalling the suite.
        alone = asyncio.run(asyncio.wait_for(engine.generate(row, greedy), timeout=120))
        assert alone == solo(tiny_llama, row, greedy)
        assert engine.stats.prefill_passes == 1
    finally:
        engine.close()
