"""The continuous-batching engine with an encoder-decoder base model (BART, T5): tenants'
requests with different encoder/decoder/cross-attention prefixes share forward passes, join
a running batch and leave it, and each gets what it gets alone. No Ray."""

import asyncio

import torch

from common.architectures import prefix_shape
from common.generation import DecodingConfig, GenerationRow, generate
from services.inference.batcher import ContinuousBatcher


def random_prefix(loaded, length, seed):
    shape = prefix_shape(loaded.model.config).tensor_shape(length)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def solo(loaded, row, decoding):
    # The engine below decodes fixed lengths (no EOS stop), so the reference does too.
    return generate(
        loaded.model, [row], decoding, eos_token_id=-1, pad_token_id=loaded.tokenizer.pad_token_id
    )[0]


def test_mixed_prefixes_join_and_leave_and_get_their_solo_outputs(tiny_seq2seq):
    # Five prefixes of lengths 1 to 9, inputs of 2 to 4 tokens, and a bare row.
    rows = [
        GenerationRow(
            [*[10 + i, 11, 12][: 1 + i % 3], 2], random_prefix(tiny_seq2seq, 1 + 2 * i, i)
        )
        for i in range(5)
    ]
    rows.append(GenerationRow([20, 21, 2], None))
    # The first three decode long enough for the others to join them mid-decode.
    decodings = [DecodingConfig(max_new_tokens=60 if i < 3 else 4 + i) for i in range(len(rows))]
    engine = ContinuousBatcher(tiny_seq2seq, max_batch_size=8, batch_wait_s=0.01, stop_at_eos=False)
    try:

        async def main():
            first = [asyncio.create_task(engine.generate(rows[i], decodings[i])) for i in range(3)]
            await asyncio.sleep(0.02)  # decoding by now: the others join a running batch
            later = [
                asyncio.create_task(engine.generate(rows[i], decodings[i]))
                for i in range(3, len(rows))
            ]
            return await asyncio.gather(*first, *later)

        outputs = asyncio.run(main())
    finally:
        engine.close()
    assert outputs == [solo(tiny_seq2seq, r, d) for r, d in zip(rows, decodings, strict=True)]
    assert engine.stats.requests == len(rows) and engine.stats.prefill_passes >= 2
    assert engine.stats.max_rows_in_batch > 3  # late rows joined the running ones
    assert engine.stats.forward_passes < sum(len(o) for o in outputs)  # shared passes
