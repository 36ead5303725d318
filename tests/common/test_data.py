import pytest
import torch

from common.data import IGNORE_INDEX, Example, collate, encode_examples, parse_jsonl, read_jsonl
from common.errors import InvalidInputError


def test_parse_jsonl_skips_blank_lines():
    lines = ['{"input": "a", "output": "b"}', "", '  {"input": "c", "output": "d"}  ']
    assert parse_jsonl(lines, source="x.jsonl") == [Example("a", "b"), Example("c", "d")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "x.jsonl:2: invalid JSON"),
        ("[1, 2]", "x.jsonl:2: expected an object"),
        ('{"input": "a"}', "x.jsonl:2: missing field 'output'"),
        ('{"input": 3, "output": "b"}', "x.jsonl:2: field 'input' must be a string, got int"),
        ('{"input": "a", "output": "  "}', "x.jsonl:2: field 'output' is empty"),
        (b'{"input": "\xff", "output": "b"}', "x.jsonl:2: not valid UTF-8"),
        ('{"prompt": "a"}', "x.jsonl:2: missing field 'completion'"),
        ('{"prompt": "a", "completion": 5}', "x.jsonl:2: field 'completion' must be a string"),
        ('{"prompt": "a", "output": "b"}', "x.jsonl:2: use either input/output or prompt/com"),
    ],
)
def test_parse_jsonl_names_file_and_line(line, message):
    with pytest.raises(InvalidInputError) as error:
        parse_jsonl(['{"input": "a", "output": "b"}', line], source="x.jsonl")
    assert str(error.value).startswith(message)


def test_openai_prompt_completion_lines_are_the_same_pair():
    lines = ['{"prompt": "a", "completion": "b"}', '{"input": "c", "output": "d"}']
    assert parse_jsonl(lines, source="x.jsonl") == [Example("a", "b"), Example("c", "d")]


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(InvalidInputError, match=r"empty.jsonl: no examples"):
        read_jsonl(path)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(InvalidInputError, match=r"cannot read .*nope\.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_loss_only_on_output_tokens(tiny_llama):
    tokenizer = tiny_llama.tokenizer
    encoded = encode_examples(
        tokenizer, [Example("alpha beta", "red"), Example("gamma", "one")], max_tokens=64
    )
    batch = collate(encoded, pad_id=tokenizer.pad_token_id)
    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert batch.input_ids.tolist() == [
        [*ids("alpha beta"), bos, *ids("red"), eos],
        [*ids("gamma"), bos, *ids("one"), eos, pad],
    ]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # labels[t] is the token predicted after position t: only output tokens and EOS.
    i = IGNORE_INDEX
    assert batch.labels.tolist() == [
        [i, i, *ids("red"), eos, i],
        [i, *ids("one"), eos, i, i],
    ]
    assert batch.target_tokens == 4
    assert batch.labels.dtype == torch.long


def test_too_long_example_is_refused_with_its_number(tiny_llama):
    examples = [Example("alpha", "red"), Example("alpha " * 30, "red")]
    with pytest.raises(InvalidInputError, match="example 2 has 33 tokens; the limit is 20"):
        encode_examples(tiny_llama.tokenizer, examples, max_tokens=20, source="data.jsonl")
