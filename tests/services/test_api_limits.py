"""The API's building blocks without Ray Serve: the body-size middleware, the token bucket,
and upload validation (fast; the HTTP behaviour end to end is in test_api_routes.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from common.config import Settings
from common.errors import InvalidInputError
from services.api.errors import ApiError, install_error_handlers
from services.api.limits import BodyLimit, BodySizeLimitMiddleware, TokenBucket
from services.api.uploads import MAX_LINE_BYTES, ExampleChecker, count_valid_examples
from tests.fixtures.models import tiny_tokenizer

# --- body size ------------------------------------------------------------------------------


@pytest.fixture
def limited_client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimitMiddleware,
        default=BodyLimit("max_request_bytes", 100),
        per_route={("POST", "/upload"): BodyLimit("max_dataset_bytes", 1000)},
    )
    app.state.read = 0

    @app.post("/echo")
    async def echo(body: dict) -> dict:
        return body

    @app.post("/refuse")
    async def refuse() -> dict:
        raise ApiError(429, "too_many_concurrent", "too many at once")

    @app.post("/read-then-refuse")
    async def read_then_refuse(request: Request) -> dict:
        await request.body()
        raise ApiError(422, "invalid_input", "line 1: invalid JSON")

    @app.post("/upload")
    async def upload(request: Request) -> dict:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            app.state.read += len(chunk)
        return {"size": size}

    return TestClient(app)


def test_a_body_within_its_limit_passes(limited_client: TestClient) -> None:
    assert limited_client.post("/echo", json={"a": "x" * 50}).json() == {"a": "x" * 50}
    assert limited_client.post("/upload", content=b"y" * 900).json() == {"size": 900}


def test_content_length_over_the_limit_is_refused_before_reading(
    limited_client: TestClient,
) -> None:
    response = limited_client.post("/upload", content=b"y" * 1001)
    assert response.status_code == 413
    assert response.json() == {
        "error": {
            "code": "payload_too_large",
            "message": "request body larger than max_dataset_bytes (1000 bytes)",
        }
    }
    assert limited_client.app.state.read == 0  # type: ignore[attr-defined]
    json_route = limited_client.post("/echo", json={"a": "x" * 200})
    assert json_route.status_code == 413
    assert "max_request_bytes (100 bytes)" in json_route.json()["error"]["message"]


def test_a_chunked_body_is_counted_while_it_streams(limited_client: TestClient) -> None:
    chunks = iter([b"z" * 300] * 10)  # no Content-Length: chunked transfer
    response = limited_client.post("/upload", content=chunks)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert limited_client.app.state.read <= 1000  # type: ignore[attr-defined]
    json_chunks = iter([b'{"a": "', b"x" * 200, b'"}'])
    response = limited_client.post(
        "/echo", content=json_chunks, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def test_an_error_before_the_body_is_read_closes_the_connection(
    limited_client: TestClient,
) -> None:
    """Keeping the connection alive would mean reading (and dropping) the rest of the body
    on the HTTP proxy every tenant shares: up to max_dataset_bytes per refused upload."""
    refused = limited_client.post("/refuse", content=b"y" * 90)
    assert refused.status_code == 429
    assert refused.headers["connection"] == "close"
    too_large = limited_client.post("/upload", content=b"y" * 1001)  # by Content-Length
    assert too_large.headers["connection"] == "close"
    # Nothing left unread: the connection stays open.
    assert "connection" not in limited_client.post("/read-then-refuse", content=b"{").headers
    assert "connection" not in limited_client.post("/refuse").headers  # no body at all
    assert "connection" not in limited_client.post("/upload", content=b"y" * 10).headers


# --- token bucket ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.acquire("a") == pytest.approx(0.5)  # one token every 0.5 s
    assert bucket.acquire("b") == 0.0  # another key has its own bucket
    clock.now += 0.5
    assert bucket.acquire("a") == 0.0
    assert bucket.acquire("a") > 0
    clock.now += 60  # refills up to the burst, not beyond
    assert [bucket.acquire("a") for _ in range(4)][-1] > 0


def test_token_bucket_forgets_idle_full_buckets() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock, max_keys=10)
    for key in range(20):
        bucket.acquire(key)
        clock.now += 2  # every earlier bucket is full again
    assert len(bucket._buckets) <= 11


# --- upload validation ----------------------------------------------------------------------


@pytest.fixture
def checker() -> ExampleChecker:
    return ExampleChecker(tiny_tokenizer(), 32, Settings(max_prefix_length=12))


def write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "upload.jsonl"
    path.write_bytes(content)
    return path


def test_blank_lines_count_in_the_line_numbers(tmp_path: Path, checker: ExampleChecker) -> None:
    row = json.dumps({"input": "alpha", "output": "beta"}).encode()
    assert count_valid_examples(write(tmp_path, row + b"\n\n" + row), checker, max_examples=5) == 2
    with pytest.raises(InvalidInputError, match=r"^line 3: invalid JSON"):
        count_valid_examples(write(tmp_path, row + b"\n\n{\n" + row), checker, max_examples=5)


def test_the_token_limit_is_the_context_minus_the_longest_prefix(
    tmp_path: Path, checker: ExampleChecker
) -> None:
    assert (checker.max_prefix_length, checker.max_example_tokens) == (12, 20)
    fits = {"input": " ".join(["alpha"] * 17), "output": "beta"}  # 17 + sep + 1 + eos = 20
    too_long = {"input": " ".join(["alpha"] * 18), "output": "beta"}
    assert count_valid_examples(write(tmp_path, json.dumps(fits).encode()), checker, max_examples=1)
    with pytest.raises(
        InvalidInputError, match=r"line 1: the example has 21 tokens; the limit is 20"
    ):
        count_valid_examples(
            write(tmp_path, json.dumps(too_long).encode()), checker, max_examples=1
        )
    # A small model keeps half its context for examples whatever max_prefix_length says.
    small = ExampleChecker(tiny_tokenizer(), 32, Settings(max_prefix_length=200))
    assert (small.max_prefix_length, small.max_example_tokens) == (16, 16)


def test_an_encoder_decoder_example_is_measured_by_its_longer_side(tmp_path: Path) -> None:
    """Input and output go to different sides, each with its own prefix and context: an
    example whose input and output each fit is accepted even when together they would not."""
    checker = ExampleChecker(
        tiny_tokenizer(), 32, Settings(max_prefix_length=12), encoder_decoder=True
    )
    words = " ".join(["alpha"] * 15)
    both_fit = {"input": words, "output": words}  # 15 + eos = 16 each side; 32 together
    assert count_valid_examples(
        write(tmp_path, json.dumps(both_fit).encode()), checker, max_examples=1
    )
    too_long = {"input": "beta", "output": " ".join(["alpha"] * 20)}
    with pytest.raises(InvalidInputError, match=r"line 1: its longer side has 21 tokens"):
        count_valid_examples(
            write(tmp_path, json.dumps(too_long).encode()), checker, max_examples=1
        )


def test_huge_lines_and_too_many_examples_are_refused(
    tmp_path: Path, checker: ExampleChecker
) -> None:
    with pytest.raises(InvalidInputError, match=r"^line 1: longer than"):
        count_valid_examples(write(tmp_path, b"x" * (MAX_LINE_BYTES + 1)), checker, max_examples=1)
    row = json.dumps({"input": "alpha", "output": "beta"}).encode() + b"\n"
    with pytest.raises(ApiError, match=r"line 3: more examples than max_dataset_examples \(2\)"):
        count_valid_examples(write(tmp_path, row * 3), checker, max_examples=2)


def test_a_chat_line_counts_its_trained_turns_and_a_long_turn_is_named(
    tmp_path: Path, checker: ExampleChecker
) -> None:
    """Plain format (no template): each later turn reads the whole conversation before it,
    so a late turn can outgrow the context; the error names the line and the message."""
    words = "alpha beta gamma"  # "user: alpha beta gamma" is 4 tokens
    turn = [{"role": "user", "content": words}, {"role": "assistant", "content": words}]
    row = json.dumps({"messages": turn * 2}).encode()  # message 4: 3 × 4 + 1, 3, eos
    assert count_valid_examples(write(tmp_path, row), checker, max_examples=5) == 2
    # message 6: 5 × 4 + 1 ("assistant:"), no separator (a chat prompt is read as it is), 3, eos
    long = json.dumps({"messages": turn * 3}).encode()
    with pytest.raises(InvalidInputError, match=r"^line 2, message 6: the example has 25 tokens"):
        count_valid_examples(write(tmp_path, row + b"\n" + long), checker, max_examples=9)


# --- API key cache --------------------------------------------------------------------------


def test_the_api_key_cache_expires_and_forgets_a_tenant_at_once() -> None:
    from services.api.limits import ApiKeyCache

    now = [0.0]
    cache = ApiKeyCache(2.0, clock=lambda: now[0])
    cache.put("hash-a", "tenant A", "a")
    cache.put("hash-b", "tenant B", "b")
    assert cache.get("hash-a") == "tenant A"
    cache.forget_tenant("a")  # revoked or erased through this replica: at once
    assert cache.get("hash-a") is None and cache.get("hash-b") == "tenant B"
    now[0] = 2.0  # elsewhere: within the TTL
    assert cache.get("hash-b") is None
    off = ApiKeyCache(0.0)
    off.put("hash-a", "tenant A", "a")
    assert off.get("hash-a") is None


def test_the_api_ingress_is_sized_from_settings() -> None:
    """Issue 16: ApiIngress took Serve's defaults (one replica, 5 requests at once)."""
    from services.api.ingress import ApiIngress
    from services.app_builder import ingress_options

    settings = Settings(api_replicas=3, api_max_ongoing_requests=300, api_max_queued_requests=900)
    deployment = ApiIngress.options(**ingress_options(settings))
    assert deployment.num_replicas == 3
    assert deployment.max_ongoing_requests == 300
    assert deployment.max_queued_requests == 900
    assert Settings().api_max_ongoing_requests > 5
