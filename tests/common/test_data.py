import json

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


# --- chat data: {"messages": [...]} -----------------------------------------------------------

# A chat template for the tiny word-level tokenizer (its words, its special tokens).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def chat_line(*messages: dict) -> str:
    return json.dumps({"messages": list(messages)})


def test_a_chat_line_is_one_example_per_trained_assistant_message():
    line = chat_line(
        {"role": "system", "content": "say one"},
        {"role": "user", "content": "alpha"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": [{"type": "text", "text": "beta"}]},
        {"role": "assistant", "content": "two", "weight": 0},  # context only
        {"role": "user", "content": "gamma"},
        {"role": "assistant", "content": "three", "weight": 1},
    )
    first, second = parse_jsonl(['{"input": "a", "output": "b"}', line], source="x.jsonl")[1:]
    assert first.output == "one" and second.output == "three"
    assert first.context == (("system", "say one"), ("user", "alpha"))
    assert second.context == (
        ("system", "say one"),
        ("user", "alpha"),
        ("assistant", "one"),
        ("user", "beta"),
        ("assistant", "two"),
        ("user", "gamma"),
    )
    # Without a template, the input is the documented plain format.
    assert first.input == "system: say one\nuser: alpha\nassistant:"


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ('"hi"', "field 'messages' must be a list, got str"),
        ("[]", "field 'messages' is empty"),
        ('["hi"]', "message 1 must be an object"),
        ('[{"content": "a"}]', "message 1 has no 'role'"),
        ('[{"role": "tool", "content": "a"}]', "message 1 has role 'tool'; expected one of"),
        ('[{"role": "user"}]', "message 1's content is missing"),
        ('[{"role": "user", "content": 3}]', "message 1's content must be a string, got int"),
        ('[{"role": "user", "content": " "}]', "message 1's content is empty"),
        ('[{"role": "user", "content": [{"type": "image_url"}]}]', "message 1's content part 0"),
        ('[{"role": "user", "content": "a"}]', "no assistant message to train on"),
        (
            '[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]',
            "no assistant message to train on (every assistant message has weight 0)",
        ),
        (
            '[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]',
            "message 2's weight must be 0 or 1, got 2",
        ),
        (
            '[{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b"}]',
            "message 1 has a weight, which only assistant messages take",
        ),
        (
            '[{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{}]}]',
            "message 2 has tool_calls",
        ),
    ],
)
def test_bad_chat_lines_name_file_line_and_message(messages, message):
    with pytest.raises(InvalidInputError) as error:
        parse_jsonl(['{"input": "a", "output": "b"}', f'{{"messages": {messages}}}'], source="x")
    assert str(error.value).startswith(f"x:2: {message}"), str(error.value)


def test_a_chat_line_with_pair_fields_too_is_refused():
    line = '{"messages": [{"role": "assistant", "content": "b"}], "input": "a"}'
    with pytest.raises(InvalidInputError, match=r"^x:1: use one of input/output, prompt/comp"):
        parse_jsonl([line], source="x")


def test_chat_loss_is_on_the_assistant_tokens_only_behind_the_chat_routes_prompt(tiny_llama):
    """Each example reads exactly the prompt the chat route builds for the messages before
    its assistant message (the template as it is: no separator after its generation
    prompt), and only the assistant's tokens and EOS carry a loss."""
    from common.chat_format import render_chat
    from common.data import encode_prompt, separator_id

    tokenizer = tiny_llama.tokenizer
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "say one"},
        {"role": "user", "content": "alpha beta"},
        {"role": "assistant", "content": "one two"},
        {"role": "user", "content": "gamma"},
        {"role": "assistant", "content": "three"},
    ]
    examples = parse_jsonl([chat_line(*messages)], source="x")
    encoded = encode_examples(tokenizer, examples, max_tokens=100)
    batch = collate(encoded, pad_id=tokenizer.pad_token_id)
    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    eos = tokenizer.eos_token_id
    for row, (upto, answer) in enumerate([(2, "one two"), (4, "three")]):
        served = encode_prompt(tokenizer, render_chat(tokenizer, messages[:upto]), chat=True)
        assert served == ids(render_chat(tokenizer, messages[:upto]))  # the template alone
        assert served[-1] != separator_id(tokenizer)
        assert encoded[row].prompt_ids == served
        assert encoded[row].target_ids == [*ids(answer), eos]
        labelled = batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist()
        assert labelled == [*ids(answer), eos]  # the assistant's tokens, nothing else
        start = len(served) - 1  # labels[t] predicts ids[t + 1]: the answer's first at the last
        assert (batch.labels[row, :start] == IGNORE_INDEX).all()
    # The second turn's context holds the first answer as the template renders it.
    assert tokenizer.decode(encoded[1].prompt_ids).count(": one two </s>") == 1


def test_a_template_that_refuses_the_conversation_is_a_clear_error(tiny_llama):
    tokenizer = tiny_llama.tokenizer
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    examples = parse_jsonl(
        [chat_line({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"})],
        source="x",
    )
    with pytest.raises(InvalidInputError, match=r"chat template refused .*roles must alternate"):
        encode_examples(tokenizer, examples, max_tokens=100)


def test_a_prefix_trains_on_chat_data(tiny_llama):
    """Chat examples go through train_prefix like pairs (the trainer's path)."""
    from common.training import train_prefix
    from common.training_config import TrainingConfig

    tiny_llama.tokenizer.chat_template = TINY_CHAT_TEMPLATE
    line = chat_line(
        {"role": "user", "content": "alpha"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "beta"},
        {"role": "assistant", "content": "blue"},
    )
    examples = parse_jsonl([line] * 4, source="x")
    result = train_prefix(
        tiny_llama,
        examples,
        # One batch of all 8 examples a step, so the first and last losses are on the same rows.
        TrainingConfig(prefix_length=2, mid_dim=8, epochs=4, batch_size=8, learning_rate=0.05),
    )
    assert result.prefix.metrics["examples"] == 8  # two turns a line
    assert result.history[-1].loss < result.history[0].loss
