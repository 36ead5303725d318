"""Bad input against the API in-process (tests/security/conftest.py: the real app on
PostgreSQL and S3 over HTTP): schema-driven fuzzing of every route, property-based JSONL
uploads, oversized, compressed and malformed bodies, and malformed prefix files. Every
refusal is a 4xx whose message names the problem (line, field, limit), never a 5xx, and a
refused upload leaves no row and no blob behind."""

from __future__ import annotations

import gzip
import json
import re
import struct
import uuid
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

from common.architectures import prefix_shape
from common.errors import IncompatiblePrefixError
from common.prefix_file import Prefix, prefix_from_bytes, prefix_to_bytes
from tests.security.conftest import LIMITS, InProc, error, examples, jsonl

FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def tenant(inproc: InProc) -> tuple[str, str]:
    return inproc.new_tenant()


def assert_nothing_stored(inproc: InProc, tenant_id: str, rows_before: int) -> None:
    from common.blobstore import datasets_key_prefix

    assert inproc.dataset_rows(tenant_id) == rows_before
    assert len(inproc.objects(datasets_key_prefix(tenant_id))) == rows_before


# --- JSONL uploads, property-based ----------------------------------------------------------

GOOD_TEXT = st.lists(
    st.sampled_from(["alpha", "beta", "red", "one", "zebra", "ü", "猫"]), min_size=1, max_size=8
).map(" ".join)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def lines(draw: Any) -> tuple[bytes, str | None]:
    """One JSONL line and, when it is bad, the words its error must contain."""
    kind = draw(
        st.sampled_from(
            [
                "good",
                "good",
                "good",
                "blank",
                "utf8",
                "json",
                "type",
                "field",
                "empty",
                "surrogate",
                "nested",
                "not_object",
                "long",
            ]
        )
    )
    good = {"input": draw(GOOD_TEXT), "output": draw(GOOD_TEXT)}
    if kind == "good":
        return json.dumps(good, ensure_ascii=draw(st.booleans())).encode(), None
    if kind == "blank":
        return draw(st.sampled_from([b"", b" ", b"\t", b"\r"])), None
    if kind == "utf8":
        bad = draw(
            st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
        )
        return json.dumps(good).encode()[:-2] + bad + b'"}', "not valid UTF-8"
    if kind == "json":
        return draw(
            st.sampled_from([b"{", b'{"input": "a",', b"nul", b"{'input': 'a'}"])
        ), "invalid JSON"
    if kind == "type":
        field = draw(st.sampled_from(["input", "output"]))
        value = draw(JSON_VALUES.filter(lambda v: not isinstance(v, str)))
        return json.dumps({**good, field: value}).encode(), f"field '{field}' must be a string"
    if kind == "field":
        field = draw(st.sampled_from(["input", "output"]))
        return json.dumps(
            {k: v for k, v in good.items() if k != field}
        ).encode(), f"missing field '{field}'"
    if kind == "empty":
        field = draw(st.sampled_from(["input", "output"]))
        blank = draw(st.sampled_from(["", " ", "\n", "\u3000", "\t \r"]))
        return json.dumps({**good, field: blank}).encode(), f"field '{field}' is empty"
    if kind == "surrogate":
        field = draw(st.sampled_from(["input", "output"]))
        return json.dumps({**good, field: "a\ud800b"}).encode(), f"field '{field}'"
    if kind == "nested":
        depth = draw(st.sampled_from([5, 100_000]))
        return b"[" * depth + b"]" * depth, "expected an object|nested"
    if kind == "not_object":
        value = draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
        return json.dumps(value).encode(), "expected an object"
    # Over the token limit: the model's context minus the longest prefix (112 tokens here).
    return json.dumps(
        {"input": "alpha " * 200, "output": "beta"}
    ).encode(), "tokens; the limit is 112"


@FUZZ
@given(rows=st.lists(lines(), min_size=1, max_size=12), newline=st.sampled_from([b"\n", b"\r\n"]))
def test_jsonl_uploads_name_the_first_bad_line_and_leave_nothing(
    inproc: InProc, tenant: tuple[str, str], rows: list[tuple[bytes, str | None]], newline: bytes
) -> None:
    tenant_id, key = tenant
    before = inproc.dataset_rows(tenant_id)
    content = newline.join(line for line, _ in rows)
    first_bad = next((n for n, (_, problem) in enumerate(rows, 1) if problem), None)
    response = inproc.upload(key, content)
    if first_bad is None and any(problem is None and line.strip() for line, problem in rows):
        assert response.status_code == 201, response.text
        assert response.json()["examples"] == sum(1 for line, _ in rows if line.strip())
        return
    status, code, message = error(response)
    assert (status, code) == (422, "invalid_input"), message
    if first_bad is None:
        assert message.startswith("no examples")
    else:
        assert message.startswith(f"line {first_bad}: "), (message, rows[first_bad - 1][0][:80])
        assert re.search(rows[first_bad - 1][1] or "", message), message
    assert_nothing_stored(inproc, tenant_id, before)


def test_huge_lines_many_lines_and_bodies_over_the_limits(inproc: InProc, tenant) -> None:
    tenant_id, key = tenant
    before = inproc.dataset_rows(tenant_id)
    row = json.dumps({"input": "alpha", "output": "beta"}).encode() + b"\n"
    limit = LIMITS["max_dataset_bytes"]
    cases: list[tuple[Any, tuple[int, str, str]]] = [
        # One line past the per-line limit (1 MiB), inside the body limit.
        (
            b'{"input": "' + b"a" * (1024 * 1024 + 1) + b'", "output": "b"}\n',
            (422, "invalid_input", r"^line 1: longer than 1048576 bytes"),
        ),
        (row + b"x" * (1024 * 1024 + 1), (422, "invalid_input", r"^line 2: longer than")),
        # 10^6 blank lines hold no example; 5·10^4 valid ones are past max_dataset_examples.
        (b"\n" * 10**6, (422, "invalid_input", r"^no examples")),
        (
            row * 5 * 10**4,
            (
                413,
                "payload_too_large",
                r"^line 201: more examples than max_dataset_examples \(200\)",
            ),
        ),
        # 10^6 valid lines (27 MB): refused from Content-Length, before the body is read.
        (row * 10**6, (413, "payload_too_large", r"max_dataset_bytes")),
        # The same without Content-Length (chunked): counted while it streams.
        (
            iter([row * 10**4] * 100),
            (413, "payload_too_large", rf"max_dataset_bytes \({limit} bytes"),
        ),
    ]
    for content, (status, code, pattern) in cases:
        got = error(inproc.upload(key, content))
        assert got[:2] == (status, code) and re.search(pattern, got[2]), got
    # Blank lines are skipped, not refused, and still counted in line numbers.
    ok = inproc.upload(key, b"\n" * 10**6 + row)
    assert ok.status_code == 201 and ok.json()["examples"] == 1
    inproc.request("DELETE", f"/v1/datasets/{ok.json()['id']}", key)
    assert_nothing_stored(inproc, tenant_id, before)


def test_compressed_uploads_are_refused_not_decompressed(inproc: InProc, tenant) -> None:
    """No route decompresses: a gzip body (a 100 MB zip bomb here, 100 KB compressed) is
    refused by its Content-Encoding, or as bytes that are not JSONL; nothing is inflated."""
    tenant_id, key = tenant
    before = inproc.dataset_rows(tenant_id)
    bomb = gzip.compress(b"\n" * 100 * 1024 * 1024, compresslevel=9)
    assert len(bomb) < LIMITS["max_dataset_bytes"]
    status, code, message = error(inproc.upload(key, bomb, headers={"content-encoding": "gzip"}))
    assert (status, code) == (415, "unsupported_media_type") and "Content-Encoding" in message
    for media in ("application/gzip", "application/zip"):
        assert error(inproc.upload(key, bomb, media))[:2] == (415, "unsupported_media_type")
    # The same bytes as a multipart file, or as a JSONL body: not UTF-8 text, line 1.
    as_file = inproc.request("POST", "/v1/datasets", key, files={"file": ("x.jsonl.gz", bomb)})
    assert error(as_file)[:2] == (422, "invalid_input")
    assert error(as_file)[2].startswith("line 1: not valid UTF-8")
    assert error(inproc.upload(key, bomb))[2].startswith("line 1: not valid UTF-8")
    # A JSON route with a compressed body: refused, not inflated.
    jobs = inproc.request(
        "POST",
        "/v1/jobs",
        key,
        content=gzip.compress(b"{}"),
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert 400 <= jobs.status_code < 500
    assert_nothing_stored(inproc, tenant_id, before)


def test_malformed_multipart_bodies(inproc: InProc, tenant) -> None:
    tenant_id, key = tenant
    before = inproc.dataset_rows(tenant_id)
    good = jsonl(examples(2))
    boundary = "b0undary"

    def part(name: str, body: bytes, filename: str | None = "d.jsonl") -> bytes:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        return (
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + body + b"\r\n"
        )

    end = f"--{boundary}--\r\n".encode()
    media = f"multipart/form-data; boundary={boundary}"
    cases: list[tuple[bytes, str, int]] = [
        (part("file", good) + end, "multipart/form-data", 400),  # no boundary parameter
        (b"garbage without any boundary", media, 400),
        (part("file", good) + part("file", good) + end, media, 400),  # two files
        (part("file", good, filename=None) + end, media, 422),  # a text field, not a file
        (
            b"".join(part(f"f{i}", b"x", None) for i in range(20)) + part("file", good) + end,
            media,
            400,
        ),
        (part("other", good) + end, media, 422),
        (part("file", good), media, 422),  # no closing boundary: the part never ends
    ]
    for number, (body, content_type, status) in enumerate(cases):
        response = inproc.upload(key, body, content_type)
        assert error(response)[0] == status, (number, response.text)
    # The file's name never reaches storage (path traversal in the filename).
    traversal = part("file", good, filename="../../../etc/passwd") + end
    response = inproc.upload(key, traversal, media)
    assert response.status_code == 201, response.text
    assert all(".." not in k and "passwd" not in k for k in inproc.objects(""))
    inproc.request("DELETE", f"/v1/datasets/{response.json()['id']}", key)
    assert_nothing_stored(inproc, tenant_id, before)


# --- JSON routes and paths ------------------------------------------------------------------


def test_malformed_json_bodies_and_paths(inproc: InProc, tenant) -> None:
    _, key = tenant
    admin = inproc.admin
    deep = b'{"dataset_ids": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    bodies: list[tuple[str, str, bytes]] = [
        ("/v1/jobs", key, deep),
        ("/v1/jobs", key, b'{"dataset_ids": ["\xff\xfe"]}'),
        ("/v1/jobs", key, b"\xef\xbb\xbf{}"),
        ("/v1/jobs", key, b'{"dataset_ids": [1e999]}'),
        (
            "/v1/jobs",
            key,
            b'{"dataset_ids": ["'
            + str(uuid.uuid4()).encode()
            + b'"], "hyperparameters": {"learning_rate": NaN}}',
        ),
        ("/v1/tenants", admin, b'{"name": "a\\u0000b"}'),
        ("/v1/tenants", admin, b'{"name": "\\ud800"}'),
        ("/v1/tenants", admin, b'{"name": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"),
        ("/v1/generate", key, b'{"input": "\\udfff"}'),
        ("/v1/generate", key, b'{"input": ' + b'"a", ' * 5 + b"}"),
        ("/v1/completions", key, b'{"prompt": ["\\ud800"]}'),
    ]
    for path, token, body in bodies:
        response = inproc.request(
            "POST", path, token, content=body, headers={"content-type": "application/json"}
        )
        if path == "/v1/completions":  # OpenAI's route: OpenAI's error body
            status, message = response.status_code, response.json()["error"]["message"]
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        else:
            status, _, message = error(response)
        assert 400 <= status < 500 and message, (path, body[:60], response.text)
    for path in (
        "/v1/datasets/../../tenants",
        "/v1/datasets/..%2F..%2Fx",
        "/v1/datasets/%00",
        "/v1/jobs/not-a-uuid/events",
        "/v1/prefixes/" + "9" * 5000,
        "/v1/jobs?status=queued'%20OR%20'1'='1",
        "/v1/jobs/" + str(uuid.uuid4()) + "/events?after_id=-1",
    ):
        response = inproc.request("GET", path, key)
        assert 400 <= response.status_code < 500, (path, response.text)


# --- schema-driven fuzzing of every route ---------------------------------------------------


def test_schemathesis_fuzzes_every_route_in_process(inproc_inference: InProc) -> None:
    """Every operation of the OpenAPI document, valid and invalid requests, as a tenant
    that has an active prefix (so generate reaches the inference server), as the admin and
    without credentials: never a 5xx."""
    import schemathesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    inproc = inproc_inference

    @schemathesis.serializer("application/jsonl", "application/x-ndjson")
    def _jsonl(context: Any, value: Any) -> bytes:
        if isinstance(value, bytes):
            return value
        return (
            value.encode("utf-8", "surrogatepass")
            if isinstance(value, str)
            else json.dumps(value).encode()
        )

    tenant_id, key = inproc.new_tenant()
    inproc.dataset(key)
    inproc.publish(tenant_id)
    schema = schemathesis.openapi.from_asgi("/openapi.json", inproc.client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {(op.method.upper(), op.path) for op in operations}
    # Every route of the app is in the document, so every route is fuzzed.
    routes = {
        (method, route.path)  # type: ignore[attr-defined]
        for route in inproc.client.app.routes
        for method in getattr(route, "methods", ()) or ()
        if method != "HEAD"
        and route.path not in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")  # type: ignore[attr-defined]
    }
    assert routes <= paths, routes - paths
    failures: list[str] = []
    identities = st.sampled_from([key, key, inproc.admin, None])

    def fuzz(operation: Any, mode: GenerationMode) -> None:
        @settings(
            max_examples=25,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode), token=identities)
        def run(case: Any, token: str | None) -> None:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = case.call(headers=headers)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} ({mode.value}): "
                    f"{response.status_code} {response.text[:200]}"
                )

        try:
            run()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE, operation.label

    for operation in operations:
        if (operation.method.upper(), operation.path) == ("DELETE", "/v1/tenants/{tenant_id}"):
            continue  # fuzzed with random ids below, never the test tenant's own
        fuzz(operation, GenerationMode.POSITIVE)
        fuzz(operation, GenerationMode.NEGATIVE)
    for junk in ("x", str(uuid.uuid4()), "0" * 40):
        assert inproc.request("DELETE", f"/v1/tenants/{junk}", key).status_code in (404, 422)
    assert failures == []
    # The tenant is intact after all of this.
    assert inproc.request("GET", f"/v1/tenants/{tenant_id}", key).json()["status"] == "active"


def test_generate_inputs_past_the_model_limits(inproc_inference: InProc) -> None:
    inproc = inproc_inference
    tenant_id, key = inproc.new_tenant()
    inproc.publish(tenant_id, length=4)
    ok = inproc.request("POST", "/v1/generate", key, json={"input": "alpha", "max_new_tokens": 2})
    assert ok.status_code == 200, ok.text
    # No max_new_tokens: the default (64) gives way to the server's lower limit, never a 422.
    default = inproc.request("POST", "/v1/generate", key, json={"input": "alpha"})
    assert default.status_code == 200, default.text
    assert default.json()["usage"]["completion_tokens"] <= 48
    cases: list[tuple[dict[str, Any], tuple[int, str, str]]] = [
        (
            {"input": "alpha", "max_new_tokens": 49},
            (422, "invalid_input", r"max_new_tokens is 49; the limit is 48"),
        ),
        (
            {"input": "alpha " * 130, "max_new_tokens": 2},
            (422, "invalid_input", r"input 1 is too long"),
        ),
        (
            {"inputs": ["alpha", "alpha " * 130], "max_new_tokens": 2},
            (422, "invalid_input", r"input 2 is too long"),
        ),
        (
            {"input": "alpha", "num_beams": 2, "temperature": 0.5},
            (422, "invalid_request", r"not both"),
        ),
        ({"input": "a\ud800"}, (422, "invalid_request", r"^input: .*unicode")),
        ({"inputs": ["alpha"] * 65}, (422, "invalid_request", r"inputs")),
    ]
    for body, (status, code, pattern) in cases:
        got = error(
            inproc.request(
                "POST",
                "/v1/generate",
                key,
                content=json.dumps(body).encode(),
                headers={"content-type": "application/json"},
            )
        )
        assert got[:2] == (status, code) and re.search(pattern, got[2]), (body, got)


# --- prefix files ---------------------------------------------------------------------------


def _prefix_bytes(inproc: InProc, length: int = 3, dtype: torch.dtype = torch.float32) -> bytes:
    shape = prefix_shape(inproc.loaded.model.config).tensor_shape(length)
    values = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    return prefix_to_bytes(Prefix(values, inproc.loaded.fingerprint, inproc.loaded.architecture))


def _rewrite(data: bytes, tensors: dict[str, torch.Tensor], **changes: str) -> bytes:
    (size,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + size])["__metadata__"] | changes
    return save_safetensors(tensors, {k: v for k, v in metadata.items() if v is not None})


def test_malformed_prefix_files_are_refused_naming_the_problem(inproc: InProc) -> None:
    loaded = inproc.loaded
    expected = {
        "expected_fingerprint": loaded.fingerprint,
        "expected_shape": prefix_shape(loaded.model.config),
    }
    good = _prefix_bytes(inproc)
    kv = prefix_from_bytes(good, **expected).key_values
    header = b"[" * 100_000
    zero_length = kv[:, :, :, :0].contiguous()
    cases: dict[str, tuple[bytes, str]] = {
        "truncated in the tensor": (good[: len(good) - 7], "corrupt prefix file"),
        "truncated in the header": (good[:40], "truncated header"),
        "empty": (b"", "truncated header"),
        "header size past the end": (struct.pack("<Q", 2**63) + good[8:], "truncated header"),
        "deeply nested header": (struct.pack("<Q", len(header)) + header, "not a prefix file"),
        "header not an object": (struct.pack("<Q", 2) + b"[]", "no prefixd metadata"),
        "extra tensor": (
            _rewrite(good, {"self_attn.key_values": kv, "prefix_mlp.0.weight": torch.zeros(2)}),
            "expected exactly one tensor",
        ),
        "renamed tensor": (_rewrite(good, {"past": kv}), "expected exactly one tensor"),
        "wrong shape": (
            _rewrite(good, {"self_attn.key_values": kv[:, :, :1].contiguous()}),
            "does not match the metadata",
        ),
        "wrong shape for the model": (
            _rewrite(good, {"self_attn.key_values": kv[:1].contiguous()}, layers="1"),
            "does not fit the model",
        ),
        "zero prefix length": (
            _rewrite(good, {"self_attn.key_values": zero_length}, prefix_length="0"),
            "prefix length",
        ),
        "wrong dtype": (
            _rewrite(good, {"self_attn.key_values": kv.double()}, dtype="float64"),
            "dtype must be one of",
        ),
        "int dtype": (
            _rewrite(good, {"self_attn.key_values": kv.to(torch.int32)}, dtype="int32"),
            "dtype must be one of",
        ),
        "dtype lies": (_rewrite(good, {"self_attn.key_values": kv.half()}), "match the metadata"),
        "wrong fingerprint": (
            _rewrite(good, {"self_attn.key_values": kv}, base_model_fingerprint="0" * 64),
            "trained for another base model",
        ),
        "no fingerprint": (
            _rewrite(good, {"self_attn.key_values": kv}, base_model_fingerprint=None),
            "invalid metadata",
        ),
        "non-numeric metadata": (
            _rewrite(good, {"self_attn.key_values": kv}, layers="two"),
            "invalid metadata",
        ),
        "bad hyperparameters JSON": (
            _rewrite(good, {"self_attn.key_values": kv}, hyperparameters="{"),
            "invalid metadata",
        ),
        "not finite": (
            _rewrite(good, {"self_attn.key_values": torch.full_like(kv, float("nan"))}),
            "not finite",
        ),
        "future format": (
            _rewrite(good, {"self_attn.key_values": kv}, format_version="2"),
            "format version",
        ),
        "no metadata": (save_safetensors({"self_attn.key_values": kv}), "no prefixd metadata"),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(IncompatiblePrefixError, match=message) as caught:
            prefix_from_bytes(data, source=name, **expected)
        assert str(caught.value).startswith(f"{name}: "), caught.value


@FUZZ
@given(data=st.data())
def test_mutated_prefix_files_are_refused_or_valid(inproc: InProc, data: Any) -> None:
    """Random truncations, byte flips and insertions anywhere in a prefix file: loading
    either refuses it with IncompatiblePrefixError or returns a prefix that fits."""
    loaded = inproc.loaded
    good = bytearray(
        _prefix_bytes(
            inproc, length=2, dtype=data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
        )
    )
    (header_size,) = struct.unpack("<Q", bytes(good[:8]))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "header"]))
        where = data.draw(st.integers(0, len(good) - 1))
        if kind == "header":  # most of the interesting structure is in the JSON header
            where = data.draw(st.integers(0, min(len(good), header_size + 8) - 1))
        if kind in ("flip", "header"):
            good[where] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del good[where:]
            if not good:
                break
        else:
            good[where:where] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        prefix = prefix_from_bytes(
            bytes(good),
            source="mutated",
            expected_fingerprint=loaded.fingerprint,
            expected_shape=prefix_shape(loaded.model.config),
        )
    except IncompatiblePrefixError as refused:
        assert str(refused).startswith("mutated: ")
    else:
        assert prefix.base_model_fingerprint == loaded.fingerprint
        assert prefix.prefix_length >= 1 and bool(torch.isfinite(prefix.key_values.float()).all())


def test_a_corrupt_prefix_blob_is_a_clear_4xx_at_generate(inproc_inference: InProc) -> None:
    """A stored prefix that does not load (overwritten, wrong model) answers 409
    incompatible_prefix naming the prefix, never a 500."""
    inproc = inproc_inference
    tenant_id, key = inproc.new_tenant()
    prefix_id = inproc.publish(tenant_id, length=2)
    from common.blobstore import prefix_key

    good = inproc.blobs.get_bytes(prefix_key(tenant_id, prefix_id))
    kv = prefix_from_bytes(good).key_values
    inproc.blobs.put_bytes(
        prefix_key(tenant_id, prefix_id),
        _rewrite(good, {"self_attn.key_values": kv}, base_model_fingerprint="0" * 64),
    )
    status, code, message = error(
        inproc.request("POST", "/v1/generate", key, json={"input": "alpha", "max_new_tokens": 2})
    )
    assert (status, code) == (409, "incompatible_prefix"), message
    assert f"prefix {prefix_id}" in message and "another base model" in message
