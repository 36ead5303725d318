import pytest
import torch

from common.architectures import prefix_shape
from common.base_prefix import stack_prefixes
from common.errors import InvalidInputError
from common.generation import (
    DecodingConfig,
    GenerationRow,
    generate,
    generate_texts,
    penalize,
)
from common.kv_cache import prefix_cache
from common.prefix_file import Prefix

GREEDY = DecodingConfig(max_new_tokens=10)


def random_prefix(loaded, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = prefix_shape(loaded.model.config).tensor_shape(length)
    return torch.randn(shape, generator=generator)  # (layers, 2, kv_heads, P, hs)


def mixed_rows(loaded) -> list[GenerationRow]:
    # Different prefixes, prefix lengths (1, 4, 9 and none) and input lengths (1 to 6).
    return [
        GenerationRow([10, 11, 12], random_prefix(loaded, 4, seed=1)),
        GenerationRow([13, 14, 15, 16, 17, 18], random_prefix(loaded, 9, seed=2)),
        GenerationRow([19], random_prefix(loaded, 1, seed=3)),
        GenerationRow([20, 21], None),
        GenerationRow([22, 23, 24, 25], random_prefix(loaded, 4, seed=4)),
    ]


def run(loaded, rows, decoding=GREEDY):
    tokenizer = loaded.tokenizer
    return generate(
        loaded.model,
        rows,
        decoding,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def test_mixed_batch_gives_each_row_its_solo_output(tiny_model):
    rows = mixed_rows(tiny_model)
    batched = run(tiny_model, rows)
    solo = [run(tiny_model, [row])[0] for row in rows]
    assert batched == solo
    assert len({tuple(o) for o in solo}) > 1  # the rows really differ


def test_mixed_base_and_tenant_combinations_give_each_row_its_solo_output(tiny_model):
    # Two bases (lengths 4 and 2), two tenants (3 and 5): every row its own stack, or none.
    base_a, base_b = random_prefix(tiny_model, 4, seed=11), random_prefix(tiny_model, 2, seed=12)
    tenant_1, tenant_2 = (
        random_prefix(tiny_model, 3, seed=13),
        random_prefix(tiny_model, 5, seed=14),
    )
    base_a_before = base_a.clone()
    prefixes = [
        stack_prefixes(base_a, tenant_1),
        stack_prefixes(base_b, tenant_1),
        stack_prefixes(base_a, tenant_2),
        tenant_1,  # a prefix without a base
        base_b,  # the base prefix alone
        None,  # the bare model
    ]
    rows = [GenerationRow([10 + i, 20 + i, 30], prefix) for i, prefix in enumerate(prefixes)]
    batched = run(tiny_model, rows)
    solo = [run(tiny_model, [row])[0] for row in rows]
    assert batched == solo
    assert len({tuple(o) for o in solo}) > 2  # the combinations really differ
    assert torch.equal(base_a, base_a_before)  # decoding never writes a stored prefix
    # A stacked row is the stacked prefix, not the tenant alone nor the base alone.
    same_input = [GenerationRow([10, 20, 30], p) for p in (prefixes[0], tenant_1, base_a)]
    outputs = [run(tiny_model, [row])[0] for row in same_input]
    assert outputs[0] != outputs[1] or outputs[0] != outputs[2]


def reference_greedy(
    model, prefix: torch.Tensor, input_ids: list[int], steps: int, eos: int
) -> list[int]:
    """Hand-written decode: each step re-runs forward() over the whole sequence behind a fresh
    prefix cache (no incremental caching, no generate()) and takes the argmax."""
    prefix_length = prefix.shape[3]
    sequence, output = list(input_ids), []
    for _ in range(steps):
        ids = torch.tensor([sequence])
        cache = prefix_cache(prefix.unsqueeze(2).clone(), model.config)  # (layers, 2, 1, kv, P, hs)
        logits = model(
            input_ids=ids,
            attention_mask=torch.ones((1, prefix_length + len(sequence)), dtype=torch.long),
            position_ids=torch.arange(prefix_length, prefix_length + len(sequence)).unsqueeze(0),
            past_key_values=cache,
        ).logits
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        output.append(token)
        sequence.append(token)
    return output


def test_greedy_equals_step_by_step_forward_and_leaves_the_prefix_unchanged(tiny_model):
    prefix = random_prefix(tiny_model, 5, seed=7)
    snapshot = prefix.clone()
    input_ids = [30, 31, 32]
    ours = run(tiny_model, [GenerationRow(input_ids, prefix)])[0]
    with torch.no_grad():
        expected = reference_greedy(
            tiny_model.model, prefix, input_ids, 10, tiny_model.tokenizer.eos_token_id
        )
    assert ours == expected and len(ours) > 0
    assert torch.equal(prefix, snapshot)  # decoding never mutates a cached prefix
    assert run(tiny_model, [GenerationRow(input_ids, prefix)])[0] == ours  # and can be reused


def test_beam_search_runs_on_a_mixed_batch(tiny_model):
    rows = mixed_rows(tiny_model)
    beams = run(tiny_model, rows, DecodingConfig(max_new_tokens=8, num_beams=4))
    assert len(beams) == len(rows) and all(0 < len(b) <= 8 for b in beams)
    # Rows are independent in beam search too: the batched result equals the solo one.
    assert beams == [
        run(tiny_model, [r], DecodingConfig(max_new_tokens=8, num_beams=4))[0] for r in rows
    ]
    # One beam is greedy decoding.
    assert run(tiny_model, rows, DecodingConfig(max_new_tokens=8, num_beams=1)) == run(
        tiny_model, rows, DecodingConfig(max_new_tokens=8)
    )


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(tiny_llama):
    row = mixed_rows(tiny_llama)[0]

    def log_prob(tokens):
        prefix = row.prefix
        ids = torch.tensor([list(row.input_ids) + tokens])
        length = prefix.shape[3]
        with torch.no_grad():
            logits = tiny_llama.model(
                input_ids=ids,
                attention_mask=torch.ones((1, length + ids.shape[1]), dtype=torch.long),
                position_ids=torch.arange(length, length + ids.shape[1]).unsqueeze(0),
                past_key_values=prefix_cache(prefix.unsqueeze(2).clone(), tiny_llama.model.config),
            ).logits.log_softmax(-1)
        start = len(row.input_ids) - 1
        return sum(float(logits[0, start + i, t]) for i, t in enumerate(tokens))

    greedy = run(tiny_llama, [row], DecodingConfig(max_new_tokens=6))[0]
    beam = run(
        tiny_llama, [row], DecodingConfig(max_new_tokens=6, num_beams=5, length_penalty=0.0)
    )[0]
    eos = tiny_llama.tokenizer.eos_token_id
    finished = lambda tokens: [*tokens, eos] if len(tokens) < 6 else tokens  # noqa: E731
    assert log_prob(finished(beam)) >= log_prob(finished(greedy)) - 1e-5


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(tiny_model):
    rows = mixed_rows(tiny_model)
    sample = DecodingConfig(max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)
    first, second = run(tiny_model, rows, sample), run(tiny_model, rows, sample)
    assert first == second
    assert first != run(
        tiny_model, rows, DecodingConfig(max_new_tokens=8, do_sample=True, temperature=1.5, seed=4)
    )
    nucleus = DecodingConfig(max_new_tokens=8, do_sample=True, top_p=1e-6, seed=5)
    assert run(tiny_model, rows, nucleus) == run(tiny_model, rows, DecodingConfig(max_new_tokens=8))


def counts_of(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=vocab).float()


def test_penalties_lower_the_scores_of_generated_tokens_as_openai_defines_them():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    counts = [counts_of([3, 3, 1], 4), counts_of([3], 4)]
    decodings = [DecodingConfig(frequency_penalty=0.5, presence_penalty=0.25), DecodingConfig()]
    penalized = penalize(logits, decodings, counts)
    # mu[j] - c[j] * frequency - (c[j] > 0) * presence; a row without penalties is untouched.
    assert penalized.tolist() == [[1.0, 1.25, 3.0, 2.75], [1.0, 2.0, 3.0, 4.0]]
    assert logits[0, 3] == 4.0  # the caller's logits are not modified
    assert penalize(logits, decodings, [None, None]) is logits  # nothing generated yet


@pytest.mark.parametrize("num_beams", [1, 3])
def test_penalties_change_repetitive_outputs_and_keep_rows_independent(tiny_llama, num_beams):
    rows = mixed_rows(tiny_llama)
    plain = DecodingConfig(max_new_tokens=12, num_beams=num_beams)
    penalized = DecodingConfig(
        max_new_tokens=12, num_beams=num_beams, frequency_penalty=2.0, presence_penalty=2.0
    )
    before, after = run(tiny_llama, rows, plain), run(tiny_llama, rows, penalized)
    repeats = lambda outputs: sum(len(o) - len(set(o)) for o in outputs)  # noqa: E731
    assert repeats(before) > 0  # a random tiny model repeats itself
    assert repeats(after) < repeats(before)
    # A penalized row's output does not depend on its batch.
    assert after == [run(tiny_llama, [row], penalized)[0] for row in rows]
    # Encouraging repetition (negative values) is allowed too, as in OpenAI's range.
    encouraged = DecodingConfig(max_new_tokens=12, num_beams=num_beams, frequency_penalty=-2.0)
    assert repeats(run(tiny_llama, rows, encouraged)) >= repeats(before)


def test_generation_stops_at_eos_and_max_new_tokens(tiny_llama):
    rows = mixed_rows(tiny_llama)
    outputs = run(tiny_llama, rows, DecodingConfig(max_new_tokens=3))
    assert all(len(o) <= 3 for o in outputs)
    eos = tiny_llama.tokenizer.eos_token_id
    assert all(eos not in o for o in run(tiny_llama, rows, DecodingConfig(max_new_tokens=30)))


@pytest.mark.parametrize(
    ("decoding", "message"),
    [
        (DecodingConfig(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (DecodingConfig(num_beams=0), "num_beams must be at least 1"),
        (DecodingConfig(do_sample=True, num_beams=2), "sampling or beam search"),
        (DecodingConfig(do_sample=True, temperature=0), "temperature must be positive"),
        (DecodingConfig(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (DecodingConfig(presence_penalty=2.5), r"presence_penalty must be in \[-2.0, 2.0\]"),
        (DecodingConfig(frequency_penalty=float("nan")), "frequency_penalty must be in"),
    ],
)
def test_bad_decoding_settings_are_refused(tiny_llama, decoding, message):
    with pytest.raises(InvalidInputError, match=message):
        run(tiny_llama, mixed_rows(tiny_llama), decoding)


def test_stop_sequences_end_each_row_at_the_token_that_completes_one(tiny_llama):
    """Greedy and beam: a row whose text reaches a stop sequence ends with that token (the
    decode spends nothing after it); the others decode as without stops."""
    tokenizer = tiny_llama.tokenizer
    rows = mixed_rows(tiny_llama)
    free = run(tiny_llama, rows, DecodingConfig(max_new_tokens=12))
    special = set(tokenizer.all_special_ids)
    # A word the greedy text reaches after a few tokens (stop there, at its first use).
    row, word = next(
        (i, tokenizer.decode([ids[k]]))
        for i, ids in enumerate(free)
        for k in range(3, len(ids))
        if ids[k] not in special
    )
    first = free[row].index(tokenizer.convert_tokens_to_ids(word))
    stop = DecodingConfig(max_new_tokens=12, stop=(word, "never said"))
    stopped = generate(
        tiny_llama.model,
        rows,
        stop,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tokenizer=tokenizer,
    )
    assert stopped[row] == free[row][: first + 1]  # ends with the token that completed it
    for other, ids in enumerate(free):
        if word not in tokenizer.decode(ids):
            assert stopped[other] == ids
    with pytest.raises(ValueError, match="stop sequences need the tokenizer"):
        run(tiny_llama, rows, stop)

    (beam_free,) = run(tiny_llama, [rows[row]], DecodingConfig(max_new_tokens=12, num_beams=3))
    beam_word = tokenizer.decode([next(t for t in beam_free[2:] if t not in special)])
    beam_stop = DecodingConfig(max_new_tokens=12, num_beams=3, stop=(beam_word,))
    (beam_stopped,) = generate(
        tiny_llama.model,
        [rows[row]],
        beam_stop,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tokenizer=tokenizer,
    )
    # The best hypothesis either ended at the stop word or never said it (beam search
    # keeps the best of the finished and the running ones); never says it and goes on.
    assert beam_word not in tokenizer.decode(beam_stopped[:-1], skip_special_tokens=True)
    assert beam_stopped != beam_free


def test_generate_texts_cuts_at_the_earliest_stop_sequence(tiny_llama):
    (free,) = generate_texts(tiny_llama, [(None, "alpha beta")], GREEDY)
    words = free.split()
    assert len(words) >= 3, free
    (cut,) = generate_texts(
        tiny_llama, [(None, "alpha beta")], DecodingConfig(max_new_tokens=10, stop=(words[2],))
    )
    assert cut == free[: free.index(words[2])].strip()


@pytest.mark.parametrize(
    ("stop", "message"),
    [
        (("a", "b", "c", "d", "e"), "at most 4 stop sequences, got 5"),
        (("a", ""), "stop sequence 2 must be a non-empty string"),
        (("x" * 201,), "stop sequence 1 has 201 characters; the limit is 200"),
    ],
)
def test_stop_sequences_are_bounded(stop, message):
    with pytest.raises(InvalidInputError, match=message):
        DecodingConfig(stop=stop).validate()


def test_input_longer_than_context_is_refused_before_any_work(tiny_llama):
    prefix = Prefix(random_prefix(tiny_llama, 20, seed=1), tiny_llama.fingerprint, "llama")
    text = "alpha " * 100
    with pytest.raises(
        InvalidInputError,
        match=r"input 2 is too long: 101 tokens \+ prefix 20 \+ max_new_tokens 10 = 131 > context 128",
    ):
        generate_texts(tiny_llama, [(prefix, "beta"), (prefix, text)], GREEDY)


def test_rows_joining_and_leaving_mid_decode_match_their_solo_outputs(tiny_model):
    """Continuous batching: rows join a running batch between steps (caches of different
    lengths merged with masked slots) and leave when done; no row's output changes."""
    from common.generation import DecodeBatch

    rows = mixed_rows(tiny_model)
    solo = [run(tiny_model, [row], DecodingConfig(max_new_tokens=6))[0] for row in rows]
    eos, pad = tiny_model.tokenizer.eos_token_id, tiny_model.tokenizer.pad_token_id
    batch = DecodeBatch(tiny_model.model, pad)
    outputs: dict[int, list[int]] = {}
    running: list[int] = []
    logits = torch.zeros((0, tiny_model.model.config.vocab_size))
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4]}  # step -> rows that join before it
    for step in range(12):
        if step in arrivals:
            new = arrivals[step]
            logits = torch.cat([logits, batch.add([rows[i] for i in new])])
            running += new
            outputs.update({i: [] for i in new})
        if not running:
            break
        tokens = logits.argmax(dim=-1)
        keep = []
        for position, (row, token) in enumerate(zip(running, tokens.tolist(), strict=True)):
            if token != eos:
                outputs[row].append(token)
            if token != eos and len(outputs[row]) < 6:
                keep.append(position)
        kept = torch.tensor(keep, dtype=torch.long)
        batch.select(kept)
        running = [running[i] for i in keep]
        logits = batch.step(tokens[kept]) if running else torch.zeros((0, logits.shape[1]))
    assert [outputs[i] for i in range(len(rows))] == solo
    assert batch.forward_passes < sum(len(o) + 1 for o in solo)  # shared forward passes


def test_choose_tokens_survives_pathological_settings_it_was_not_told_about():
    """The engine does not trust validation: a temperature of 1e-300 is greedy (it used to
    overflow to NaN probabilities and raise), top_p at the smallest float keeps one token,
    and a row with non-finite logits is reported alone."""
    from common.errors import DecodingFailedError
    from common.generation import choose_tokens, choose_tokens_per_row

    logits = torch.randn((3, 50), generator=torch.Generator().manual_seed(0)) * 30  # (B, vocab)
    settings = [
        DecodingConfig(do_sample=True, temperature=1e-300, seed=1),
        DecodingConfig(do_sample=True, temperature=2e-4, seed=2),  # just above greedy
        DecodingConfig(do_sample=True, top_p=5e-324, seed=3),
    ]
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    assert choose_tokens(logits, settings, generators).tolist() == logits.argmax(-1).tolist()
    logits[1, 7] = float("nan")
    tokens, failed = choose_tokens_per_row(logits, settings, generators)
    assert set(failed) == {1} and isinstance(failed[1], DecodingFailedError)
    assert tokens[[0, 2]].tolist() == logits[[0, 2]].argmax(-1).tolist()


def test_unseeded_sampling_draws_fresh_randomness_and_seeded_repeats(tiny_model):
    """Issue 16: without a seed every request used seed 0 (two users got the same text)."""
    rows = mixed_rows(tiny_model)[:1]
    unseeded = DecodingConfig(max_new_tokens=12, do_sample=True, temperature=3.0)
    assert len({tuple(run(tiny_model, rows, unseeded)[0]) for _ in range(4)}) > 1
    seeded = DecodingConfig(max_new_tokens=12, do_sample=True, temperature=3.0, seed=2**63 - 1)
    assert run(tiny_model, rows, seeded) == run(tiny_model, rows, seeded)
    with pytest.raises(InvalidInputError, match=r"seed must be in \[0, 9223372036854775807\]"):
        run(tiny_model, rows, DecodingConfig(do_sample=True, seed=2**64))
