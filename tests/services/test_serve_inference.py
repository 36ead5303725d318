"""The Serve application over HTTP: many tenants' requests in shared forward passes, the
prefix cache, freshness on activation and deletion, streaming, OpenAI-compatible
completions, and per-request failures that never fail a batch."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from common.architectures import prefix_shape
from common.generation import DecodingConfig, generate_texts
from common.prefix_file import Prefix

pytestmark = pytest.mark.slow


def random_key_values(stack, length: int, seed: int) -> torch.Tensor:
    shape = prefix_shape(stack.loaded.model.config).tensor_shape(length)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def solo(stack, key_values, text, max_new_tokens=8) -> str:
    prefix = Prefix(key_values, stack.loaded.fingerprint, "llama")
    return generate_texts(
        stack.loaded, [(prefix, text)], DecodingConfig(max_new_tokens=max_new_tokens)
    )[0]


def post(stack, path, key, body, timeout=60.0):
    return httpx.post(
        f"{stack.url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=timeout
    )


def test_eight_tenants_are_batched_together_and_each_gets_its_solo_output(stack):
    tenants = []
    for i in range(8):
        tenant_id, key = stack.tenant()
        key_values = random_key_values(stack, 1 + i, seed=100 + i)
        stack.publish(tenant_id, key_values)
        tenants.append((key, key_values, "alpha beta gamma"[: 5 + i]))
    before = sum(s["engine"]["prefill_passes"] for s in stack.replica_stats(2))

    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(
                lambda t: post(stack, "/v1/generate", t[0], {"input": t[2], "max_new_tokens": 8}),
                tenants,
            )
        )

    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    for (_key, key_values, text), response in zip(tenants, responses, strict=True):
        assert response.json()["outputs"] == [solo(stack, key_values, text)]
    prefills = sum(s["engine"]["prefill_passes"] for s in stack.replica_stats(2)) - before
    assert prefills < 8  # requests of different tenants shared forward passes
    assert all(s["zero_copy"] for s in stack.replica_stats(2))


def test_cached_prefix_is_read_from_the_blob_store_at_most_once_per_replica(stack):
    tenant_id, key = stack.tenant()
    prefix_id = stack.publish(tenant_id, random_key_values(stack, 3, seed=7))
    before = sum(s["blob_reads"] for s in stack.replica_stats(2))
    for _ in range(10):
        assert (
            post(stack, "/v1/generate", key, {"input": "alpha", "max_new_tokens": 2}).status_code
            == 200
        )
    reads = sum(s["blob_reads"] for s in stack.replica_stats(2)) - before
    assert 1 <= reads <= 2
    assert any(str(prefix_id) in s["cached_prefixes"] for s in stack.replica_stats(2))


def test_rollback_and_deletion_take_effect_on_the_next_request(stack):
    from sqlmodel import Session, select

    from common.db import crud
    from common.db.models import PrefixVersion

    tenant_id, key = stack.tenant()
    old = random_key_values(stack, 2, seed=1)
    new = random_key_values(stack, 5, seed=2)
    old_id = stack.publish(tenant_id, old)
    assert post(stack, "/v1/generate", key, {"input": "alpha"}).json()["outputs"] == [
        solo(stack, old, "alpha", 64)
    ]
    new_id = stack.publish(tenant_id, new)
    assert post(stack, "/v1/generate", key, {"input": "alpha"}).json()["prefix_id"] == str(new_id)
    with Session(stack.db) as session:
        crud.activate_prefix(session=session, tenant_id=tenant_id, version=1)
    response = post(stack, "/v1/generate", key, {"input": "alpha"}).json()
    assert response["prefix_id"] == str(old_id)
    assert response["outputs"] == [solo(stack, old, "alpha", 64)]

    # Delete: the key stops working, and every replica drops the cached prefixes.
    with Session(stack.db) as session:
        crud.mark_tenant_deleting(session=session, tenant_id=tenant_id)
        for row in session.exec(
            select(PrefixVersion).where(PrefixVersion.tenant_id == tenant_id)
        ).all():
            session.delete(row)
        session.commit()
    # Marked out of band (not through the API): the key stops working within the API's
    # key cache interval.
    deadline = time.monotonic() + stack.settings.api_key_cache_seconds + 2
    while post(stack, "/v1/generate", key, {"input": "alpha"}).status_code != 401:
        assert time.monotonic() < deadline, "a deleting tenant's key kept working"
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    ids = {str(old_id), str(new_id)}
    while any(ids & set(s["cached_prefixes"]) for s in stack.replica_stats(2)):
        assert time.monotonic() < deadline, "a replica kept a deleted tenant's prefix"
        time.sleep(0.2)


def test_streaming_yields_the_same_text(stack):
    tenant_id, key = stack.tenant()
    stack.publish(tenant_id, random_key_values(stack, 4, seed=3))
    whole = post(stack, "/v1/generate", key, {"input": "gamma delta", "max_new_tokens": 10}).json()[
        "outputs"
    ][0]
    deltas = []
    with httpx.stream(
        "POST",
        f"{stack.url}/v1/generate",
        json={"input": "gamma delta", "max_new_tokens": 10, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                deltas.append(json.loads(line[6:])["delta"])
    assert "".join(deltas).strip() == whole
    assert len(deltas) > 1  # token by token, not one chunk


def test_over_long_input_fails_alone(stack):
    tenant_id, key = stack.tenant()
    key_values = random_key_values(stack, 4, seed=5)
    stack.publish(tenant_id, key_values)
    bodies = [
        {"input": "alpha beta", "max_new_tokens": 8},
        {"input": "alpha " * 200},
        {"input": "gamma", "max_new_tokens": 8},
    ]
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda b: post(stack, "/v1/generate", key, b), bodies))
    assert [r.status_code for r in responses] == [200, 422, 200]
    assert "input 1 is too long" in responses[1].json()["error"]["message"]
    assert responses[0].json()["outputs"] == [solo(stack, key_values, "alpha beta")]
    assert responses[2].json()["outputs"] == [solo(stack, key_values, "gamma")]


def test_openai_compatible_completions(stack):
    tenant_id, key = stack.tenant()
    key_values = random_key_values(stack, 3, seed=9)
    stack.publish(tenant_id, key_values)
    body = post(
        stack,
        "/v1/completions",
        key,
        {"model": "default", "prompt": ["alpha", "beta"], "max_tokens": 6, "temperature": 0},
    ).json()
    assert body["object"] == "text_completion"
    assert [c["text"] for c in body["choices"]] == [
        solo(stack, key_values, t, 6) for t in ("alpha", "beta")
    ]
    assert (
        body["usage"]["total_tokens"]
        == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    sampled = post(
        stack, "/v1/completions", key, {"prompt": "alpha", "max_tokens": 6, "n": 3, "seed": 1}
    ).json()
    assert [c["index"] for c in sampled["choices"]] == [0, 1, 2]


def test_auth_and_missing_prefix_errors(stack):
    _, key = stack.tenant()
    response = post(stack, "/v1/generate", key, {"input": "alpha"})
    assert response.status_code == 409 and response.json()["error"]["code"] == "no_active_prefix"
    assert httpx.post(f"{stack.url}/v1/generate", json={"input": "alpha"}).status_code == 401
    assert post(stack, "/v1/generate", "not-a-key", {"input": "alpha"}).status_code == 401
    bad = post(stack, "/v1/generate", key, {"input": "alpha", "inputs": ["x"]})
    assert bad.status_code == 422 and "exactly one of" in bad.json()["error"]["message"]
    assert post(
        stack, "/v1/generate", key, {"input": "a", "max_new_tokens": 10**6}
    ).status_code in (409, 422)
