"""Property-based fuzzing of the live app (schemathesis 4, through `llmserve_nb.reliability.fuzz_openapi`).

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
from test_reliability import warm_cluster

pytestmark = pytest.mark.ray

EXAMPLES = 25  # per operation and generation mode


@pytest.fixture(scope="module")
def fuzz_app(request):
    warm_cluster(request)
    return request.getfixturevalue("app")


def test_fuzz_openapi_no_5xx_and_responses_match_the_document(fuzz_app):
    from llmserve_nb.reliability import fuzz_openapi

    report = fuzz_openapi(fuzz_app.base_url, api_key=API_KEY, max_examples=EXAMPLES, seed=0)
    print("FUZZ", json.dumps(report, sort_keys=True))
    ops = {r["operation"] for r in report["operations"]}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /generate", "GET /v1/models"} <= ops
    assert report["cases"] >= len(report["operations"]) * 5  # it really sent requests
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


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/generate"])
def test_a_body_that_is_not_an_object_is_a_documented_400(fuzz_app, path):
    for content in (b"[]", b"1", b'"text"', b"null"):
        r = _post(fuzz_app, path, content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (content, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
        assert "error" in r.json()
    assert "400" in _documented(fuzz_app, "POST", path)
