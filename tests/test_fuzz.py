"""Property-based fuzzing of the live app (schemathesis 4, through `openapi_fuzz.fuzz_openapi`, a test tool here).

Every operation of the app's `/openapi.json` gets generated requests, valid ("positive") and invalid
("negative"), sent with the API key. Each answer must not be a 5xx and must conform to the document:
a documented status code, the documented content type, a body that validates against the documented
schema. A small budget here (CI); `benchmarks/fuzz.py` runs a larger one. Findings come back with a
curl command that reproduces them; each one found is pinned below as a plain regression test.
"""
from __future__ import annotations

import json

import httpx
import pytest

from conftest import API_KEY
from openapi_fuzz import fuzz_openapi

EXAMPLES = 15  # per operation and generation mode


@pytest.fixture(scope="module")
def fuzz_app(app):
    """The session's `app`, serving its OpenAPI document."""
    assert httpx.get(f"{app.base_url}/openapi.json", timeout=30).status_code == 200
    return app


@pytest.mark.ray
def test_fuzz_openapi_no_5xx_and_responses_match_the_document(fuzz_app):
    report = fuzz_openapi(fuzz_app.base_url, api_key=API_KEY, max_examples=EXAMPLES, seed=0)
    print("FUZZ", json.dumps(report, sort_keys=True))
    ops = {r["operation"] for r in report["operations"]}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /generate", "GET /v1/models"} <= ops
    # Both generation modes ran for every operation, and each sent requests or says why it could not.
    assert len(report["operations"]) == 2 * len(ops)
    assert all(r["cases"] >= 1 or "skipped" in r for r in report["operations"]), report["operations"]
    # The API key was sent: generated valid requests were served, not all refused with 401.
    assert any(r["statuses"].get("200") for r in report["operations"] if r["operation"] == "POST /generate")
    assert report["findings"] == [], json.dumps(report["findings"], indent=1)


# ---- regression tests: one per fuzzing finding, with the request that triggered it ------------------
def _post(app, path: str, body=None, content: bytes | None = None, headers=None) -> httpx.Response:
    h = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
    return httpx.post(f"{app.base_url}{path}", json=body, content=content, headers=h, timeout=60)


def _documented(app, method: str, path: str) -> set[str]:
    doc = httpx.get(f"{app.base_url}/openapi.json", timeout=30).json()
    return set(doc["paths"][path][method.lower()]["responses"])


@pytest.mark.ray
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/generate"])
def test_a_body_that_is_not_an_object_is_a_documented_400(fuzz_app, path):
    for content in (b"[]", b"1", b'"text"', b"null"):
        r = _post(fuzz_app, path, content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (content, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
        assert "error" in r.json()
    assert "400" in _documented(fuzz_app, "POST", path)


@pytest.mark.ray
def test_an_out_of_range_seed_is_a_400_and_does_not_fail_its_batch_neighbours(fuzz_app):
    """Schema-valid input (`seed` is an unbounded integer in the document) that torch cannot take:
    `torch.Generator.manual_seed(2**64)` raises "Overflow when unpacking long long" in
    `HFEngine.generator`, called from `TransformersEngine.submit` inside the admission batch, whose
    `except` fails *every* request of the batch with a 500. Reproduce:

        curl -X POST $URL/v1/completions -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \\
             -d '{"prompt": "hi", "max_tokens": 4, "temperature": 0.7, "seed": 18446744073709551616}'
    """
    from concurrent.futures import ThreadPoolExecutor

    bad = {"prompt": "Hello", "max_tokens": 4, "temperature": 0.7, "seed": 2**64}
    good = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0.0}
    with ThreadPoolExecutor(4) as pool:  # sent together: they land in one admission batch
        futures = [pool.submit(_post, fuzz_app, "/v1/completions", b) for b in (bad, good, good, good)]
        bad_r, *good_rs = [f.result() for f in futures]
    assert [r.status_code for r in good_rs] == [200, 200, 200], [r.text for r in good_rs]
    assert bad_r.status_code == 400, bad_r.text
    assert "seed" in bad_r.json()["error"]["message"]


# These two reproduce the fuzzing findings without Ray, on the deployment's FastAPI app itself.
def test_a_body_that_cannot_be_parsed_gets_the_documented_error_shape():
    """Finding (negative mode, all three POST routes): bytes that are not JSON text, e.g.

        curl -X POST $URL/v1/completions -H 'Content-Type: application/json' --data-binary $'\\xff\\xfe\\x00'

    answer 400 `{"detail": "There was an error parsing the body"}` (Starlette's HTTPException, which
    `install_error_handling` does not map), not the documented `ErrorResponse` `{"error": {...}}`."""
    from fastapi.testclient import TestClient

    from llmserve_nb.server.app import api

    client = TestClient(api)
    for path in ("/v1/chat/completions", "/v1/completions", "/generate"):
        r = client.post(path, content=b"\xff\xfe\x00", headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (path, r.text)
        assert r.json().get("error", {}).get("code") == 400, (path, r.text)


def test_the_event_stream_is_documented_per_event():
    """Finding (positive mode, stream=true): every SSE event "violates schema": before OpenAPI 3.2 a
    text/event-stream `schema` describes one event (an object with `data`), and the document says
    `{"type": "string"}`. Reproduce: any chat completion with `"stream": true`."""
    from llmserve_nb.server.app import api

    doc = api.openapi()
    assert doc["openapi"].startswith("3.1")
    for path in ("/v1/chat/completions", "/v1/completions"):
        sse = doc["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
        schema = sse.get("itemSchema") or sse["schema"]
        assert schema.get("type") == "object" and "data" in schema.get("properties", {}), (path, sse)
