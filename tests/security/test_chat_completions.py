"""``POST /v1/chat/completions`` driven by the official ``openai`` package (its HTTP client
is the in-process API's TestClient): plain and streamed answers agree, ``n``, ``stop`` (on
chat, completions and generate: decoding ends there), ``finish_reason``, usage, and errors
raise the SDK's own exception classes."""

from __future__ import annotations

import uuid

import openai
import pytest

from common.chat_format import render_chat
from common.stop_sequences import StopStreamer, cut_at_stop
from tests.fixtures.models import tiny_tokenizer
from tests.security.conftest import InProc

PROMPT = "red green"
MESSAGES = [
    {"role": "system", "content": "alpha beta"},
    {"role": "user", "content": [{"type": "text", "text": "red green"}]},
]


def client(inproc: InProc, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=inproc.client, max_retries=0
    )


def test_chat_completions_with_the_openai_sdk(inproc_inference: InProc) -> None:
    inproc = inproc_inference
    tenant_id, key = inproc.new_tenant()
    prefix_id = inproc.publish(tenant_id, length=2, seed=7)
    sdk = client(inproc, key)

    plain = sdk.chat.completions.create(
        model="default", messages=MESSAGES, max_tokens=6, temperature=0
    )
    (choice,) = plain.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert plain.object == "chat.completion" and plain.model == f"prefix-{prefix_id}"
    assert plain.usage is not None and 0 < plain.usage.completion_tokens <= 6
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    # The model reads the rendered chat as it is, no separator after the open assistant turn.
    tokenizer = inproc.loaded.tokenizer
    rendered = render_chat(
        tokenizer,
        [{"role": "system", "content": "alpha beta"}, {"role": "user", "content": "red green"}],
    )
    assert plain.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))

    chunks = list(
        sdk.chat.completions.create(
            model="default",
            messages=MESSAGES,
            max_tokens=6,
            stream=True,
            temperature=0,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content  # greedy: the same text both ways
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].choices == []

    # A stop sequence taken from the text itself cuts it there (and is not returned).
    words = choice.message.content.split()
    assert len(words) >= 2, choice.message.content  # the tiny model's greedy text here
    stop = " " + words[1]
    cut = sdk.chat.completions.create(
        model="default", messages=MESSAGES, max_tokens=6, stop=[stop], temperature=0
    )
    assert cut.choices[0].message.content == choice.message.content.split(stop)[0]
    assert cut.choices[0].finish_reason == "stop"
    # Decoding ended at the stop sequence: its second word's token was the last one.
    assert cut.usage is not None and cut.usage.completion_tokens == 2

    many = sdk.chat.completions.create(
        model="default", messages=MESSAGES, max_tokens=4, n=3, temperature=1.0, seed=11
    )
    assert [c.index for c in many.choices] == [0, 1, 2]

    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="default", messages=[], max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        client(inproc, "pfx_" + "x" * 40).chat.completions.create(
            model="default", messages=MESSAGES
        )
    _, untrained = inproc.new_tenant()
    with pytest.raises(openai.ConflictError):
        client(inproc, untrained).chat.completions.create(model="default", messages=MESSAGES)


def test_presence_and_frequency_penalties_reach_the_decoder_on_every_route(
    inproc_inference: InProc,
) -> None:
    """OpenAI's penalties are applied, never silently ignored: they change the greedy text on
    chat, completions and generate (negative values, which favour the tokens already in the
    output: the tiny model's short answers have no repeats for positive ones to act on)."""
    inproc = inproc_inference
    tenant_id, key = inproc.new_tenant()
    inproc.publish(tenant_id, length=2, seed=5)
    sdk = client(inproc, key)
    penalties = {"frequency_penalty": -2.0, "presence_penalty": -2.0}
    common = {"model": "default", "max_tokens": 16, "temperature": 0}

    def chat(**extra: float) -> str:
        answer = sdk.chat.completions.create(messages=MESSAGES, **common, **extra)
        return answer.choices[0].message.content or ""

    def completion(**extra: float) -> str:
        return sdk.completions.create(prompt=PROMPT, **common, **extra).choices[0].text

    def generate(**extra: float) -> str:
        body = {"input": PROMPT, "max_new_tokens": 16, **extra}
        response = inproc.request("POST", "/v1/generate", key, json=body)
        assert response.status_code == 200, response.text
        return str(response.json()["outputs"][0])

    for route in (chat, completion, generate):
        assert route(**penalties) != route(), route.__name__
    # Out of OpenAI's range [-2, 2], or not a number (Python's JSON reads NaN): refused.
    for value in ("2.5", "NaN"):
        refused = inproc.request(
            "POST",
            "/v1/generate",
            key,
            content=f'{{"input": "a", "frequency_penalty": {value}}}',
            headers={"Content-Type": "application/json"},
        )
        assert refused.status_code == 422, refused.text
        assert "frequency_penalty" in refused.json()["error"]["message"], refused.text


def test_chat_prompt_without_a_template_is_the_plain_format() -> None:
    tokenizer = tiny_tokenizer()
    assert not getattr(tokenizer, "chat_template", None)
    rendered = render_chat(
        tokenizer, [{"role": "developer", "content": "be terse"}, {"role": "user", "content": "hi"}]
    )
    assert rendered == "system: be terse\nuser: hi\nassistant:"


def test_stop_sequences_cut_text_and_streams_hold_back_partial_matches() -> None:
    assert cut_at_stop("red. blue.", [".", "blue"]) == ("red", True)
    assert cut_at_stop("red", ["x"]) == ("red", False)
    streamer = StopStreamer(["END"])
    sent = [streamer.feed(piece) for piece in ["ab", "cE", "N", "Dxyz"]]
    assert sent == ["ab", "c", "", ""] and streamer.stopped and streamer.flush() == ""
    # Only what may still become a stop sequence waits: here "E", then "EN" is not "ED".
    open_ended = StopStreamer(["END", "ED"])
    assert open_ended.feed("abcE") == "abc"
    assert open_ended.feed("Nx") == "ENx" and open_ended.flush() == ""
    assert StopStreamer(["END"]).feed("xEN") == "x"


def test_stop_sequences_end_decoding_on_every_route(inproc_inference: InProc) -> None:
    """``stop`` on chat, completions and generate, plain and streamed: the answer ends
    before the stop sequence, decoding ended at the token that completed it (usage), the
    finish reason is "stop", and a stream never sends a piece of a stop sequence."""
    inproc = inproc_inference
    tenant_id, key = inproc.new_tenant()
    inproc.publish(tenant_id, length=2, seed=7)
    sdk = client(inproc, key)
    free = sdk.completions.create(model="default", prompt="alpha beta", max_tokens=8, temperature=0)
    words = free.choices[0].text.split()
    assert len(words) >= 4 and free.usage is not None, free  # the tiny model's greedy text
    assert free.choices[0].finish_reason == "length"
    stop = f" {words[1]} {words[2]}"  # two tokens: the first is held back, then it stops

    cut = sdk.completions.create(
        model="default", prompt="alpha beta", max_tokens=8, temperature=0, stop=[stop, "zzz"]
    )
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (words[0], "stop")
    assert cut.usage is not None and cut.usage.completion_tokens == 3  # nothing decoded after

    chunks = list(
        sdk.completions.create(
            model="default",
            prompt="alpha beta",
            max_tokens=8,
            temperature=0,
            stop=stop,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == words[0] and not any(words[1] in p for p in pieces)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3

    # A partial match that does not complete is held back, then sent: nothing is lost.
    whole = list(
        sdk.completions.create(
            model="default",
            prompt="alpha beta",
            max_tokens=8,
            temperature=0,
            stop=f" {words[1]} nothing",
            stream=True,
        )
    )
    assert "".join(c.choices[0].text for c in whole if c.choices) == " ".join(words)

    generated = inproc.request(
        "POST", "/v1/generate", key, json={"input": "alpha beta", "max_new_tokens": 8, "stop": stop}
    ).json()
    assert generated["outputs"] == [words[0]] and generated["finish_reasons"] == ["stop"]
    assert generated["usage"]["completion_tokens"] == 3
    beams = inproc.request(
        "POST",
        "/v1/generate",
        key,
        json={"input": "alpha beta", "max_new_tokens": 8, "num_beams": 2, "stop": words[0]},
    ).json()
    assert words[0] not in beams["outputs"][0], beams

    chat = sdk.chat.completions.create(
        model="default",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
        stop=stop,
        stream_options={"include_usage": True},
    )
    streamed = list(chat)
    assert streamed[-1].usage is not None
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] in ("stop", "length")

    with pytest.raises(openai.BadRequestError) as refused:
        sdk.completions.create(model="default", prompt="a", stop=["a", "b", "c", "d", "e"])
    assert refused.value.param == "stop"


def test_models_list_and_select_a_version(inproc_inference: InProc) -> None:
    inproc = inproc_inference
    tenant_id, key = inproc.new_tenant()
    _, other_key = inproc.new_tenant()
    first = inproc.publish(tenant_id, length=2, seed=1)
    second = inproc.publish(tenant_id, length=3, seed=2)  # now the active one
    sdk = client(inproc, key)

    ids = [m.id for m in sdk.models.list()]
    assert ids == [inproc.settings.model, f"prefix-{first}", f"prefix-{second}"]
    assert sdk.models.retrieve(f"prefix-{first}").id == f"prefix-{first}"

    def completion(model: str) -> tuple[str, str]:
        answer = sdk.completions.create(model=model, prompt="alpha beta", max_tokens=4)
        return answer.model, answer.choices[0].text

    assert completion("default")[0] == completion(inproc.settings.model)[0] == f"prefix-{second}"
    assert completion(f"prefix-{first}")[0] == f"prefix-{first}"
    chat = sdk.chat.completions.create(model=f"prefix-{first}", messages=MESSAGES, max_tokens=3)
    assert chat.model == f"prefix-{first}"

    for unknown in ("gpt-4o", f"prefix-{uuid.uuid4()}", "prefix-nonsense"):
        with pytest.raises(openai.NotFoundError):
            completion(unknown)
    # Another tenant's version is exactly an unknown model.
    other = client(inproc, other_key)
    with pytest.raises(openai.NotFoundError):
        other.completions.create(model=f"prefix-{first}", prompt="alpha", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        other.models.retrieve(f"prefix-{first}")


def test_openai_routes_answer_errors_in_openai_shape(inproc_inference: InProc) -> None:
    """Errors of the OpenAI-shaped routes are OpenAI's body and status, so the SDK raises
    its usual classes with ``type``, ``param`` and ``code``, and the request id from the
    header; prefixd's own routes keep prefixd's body."""
    inproc = inproc_inference
    tenant_id, key = inproc.new_tenant()
    inproc.publish(tenant_id, length=2, seed=3)
    sdk = client(inproc, key)

    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    error = unknown.value
    assert (error.type, error.param, error.code) == (
        "invalid_request_error",
        "model",
        "model_not_found",
    )
    assert error.request_id and error.request_id == error.response.headers["x-request-id"]
    assert set(error.response.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4o")
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(str(uuid.uuid4()))

    datasets = inproc.dataset_rows(tenant_id)  # publishing a version made one
    with pytest.raises(openai.BadRequestError) as bad_file:
        sdk.files.create(
            file=("bad.jsonl", b'{"input": "a", "output": "b"}\n{"input": 1}\n'),
            purpose="fine-tune",
        )
    assert bad_file.value.param == "file" and "line 2" in bad_file.value.message
    assert inproc.dataset_rows(tenant_id) == datasets
    with pytest.raises(openai.BadRequestError) as bad_purpose:
        sdk.files.create(file=("x.jsonl", b'{"input": "a", "output": "b"}\n'), purpose="batch")
    assert bad_purpose.value.param == "purpose"
    with pytest.raises(openai.BadRequestError) as no_file:
        sdk.fine_tuning.jobs.create(model="default", training_file=str(uuid.uuid4()))
    assert no_file.value.param == "training_file"

    for bad, param in (
        ({"temperature": 5}, "temperature"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"n": 0}, "n"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.chat.completions.create(**{"model": "default", "messages": MESSAGES, **bad})
        assert (refused.value.type, refused.value.param) == ("invalid_request_error", param)
        assert refused.value.code in ("invalid_value", "invalid_type"), refused.value.body
    with pytest.raises(openai.BadRequestError) as missing:
        inproc_sdk_post(inproc, key, "/v1/chat/completions", {"model": "default"})
    assert (missing.value.param, missing.value.code) == ("messages", "missing_required_parameter")
    with pytest.raises(openai.BadRequestError) as too_big:
        sdk.completions.create(model="default", prompt="alpha " * 20_000)
    assert too_big.value.code == "payload_too_large"

    with pytest.raises(openai.AuthenticationError) as unauthorized:
        client(inproc, "pfx_" + "x" * 40).models.list()
    assert (unauthorized.value.type, unauthorized.value.code) == (
        "authentication_error",
        "invalid_api_key",
    )
    anonymous = inproc.request("GET", "/v1/models", None)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "invalid_api_key"

    # Too many at once (the tenant's in-flight cost is full): the SDK's RateLimitError.
    cap = inproc.settings.tenant_max_inflight_cost
    assert inproc.context.inflight_cost.try_acquire(uuid.UUID(tenant_id), cap)
    try:
        with pytest.raises(openai.RateLimitError) as limited:
            sdk.chat.completions.create(model="default", messages=MESSAGES, max_tokens=2)
    finally:
        inproc.context.inflight_cost.release(uuid.UUID(tenant_id), cap)
    assert limited.value.type == "rate_limit_error"
    assert limited.value.response.headers["retry-after"]

    # A stream that fails after it began sends OpenAI's error event; the SDK raises it.
    from common.blobstore import prefix_key

    broken_id, broken_key = inproc.new_tenant()
    prefix_id = inproc.publish(broken_id, length=2, seed=4)
    inproc.blobs.delete(prefix_key(uuid.UUID(broken_id), prefix_id))
    with pytest.raises(openai.APIError) as failed:
        list(
            client(inproc, broken_key).chat.completions.create(
                model="default", messages=MESSAGES, max_tokens=2, stream=True
            )
        )
    assert failed.value.body["type"] == "invalid_request_error", failed.value.body

    # A chat template that refuses the messages: a 400 with its reason, never a 500.
    tokenizer = inproc.context.example_checker().tokenizer
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    try:
        with pytest.raises(openai.BadRequestError, match="roles must alternate"):
            sdk.chat.completions.create(model="default", messages=MESSAGES, max_tokens=2)
    finally:
        tokenizer.chat_template = None

    # prefixd's own routes keep prefixd's body.
    native = inproc.request("POST", "/v1/generate", key, json={"input": "a", "top_p": 5})
    assert native.status_code == 422 and set(native.json()["error"]) == {
        "code",
        "message",
        "request_id",
    }


def inproc_sdk_post(inproc: InProc, key: str, path: str, body: dict) -> object:
    """A raw POST through the SDK (what a client sends that the typed methods refuse)."""
    return client(inproc, key).post(path.removeprefix("/v1"), body=body, cast_to=object)
