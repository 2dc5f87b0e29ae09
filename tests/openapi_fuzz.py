"""Property-based fuzzing of a live app's OpenAPI document with schemathesis: a test tool, used by
`tests/test_fuzz.py` (a small budget) and `benchmarks/fuzz.py` (a larger one)."""
from __future__ import annotations

from typing import Any

from llmserve_nb.bench.client import headers as auth_headers

__all__ = ["fuzz_openapi"]


def fuzz_openapi(
    base_url: str,
    *,
    api_key: str | None = None,
    max_examples: int = 25,
    modes: tuple[str, ...] = ("positive", "negative"),
    max_tokens_cap: int | None = 8,
    request_timeout_s: float = 60.0,
    seed: int | None = 0,
    operations: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Property-based fuzzing of a live app with schemathesis (4.x): every operation of its
    `/openapi.json`, `max_examples` generated requests per operation and generation mode, each checked
    for no 5xx and conformance to the document (status code documented, content type, body schema,
    headers). Findings are grouped per (operation, failure, status) with a curl command that
    reproduces one (the API key shown as `$LLMSERVE_NB_API_KEY`).

    `max_tokens_cap` lowers generated `max_tokens` / `max_new_tokens` values between the cap and the
    server's limit to the cap, and sets it where a valid case leaves the field out, so that the budget
    is spent on inputs, not on decoding long answers (values above any limit are kept: they must get a
    400)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from hypothesis import seed as hypothesis_seed
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              response_headers_conformance]
    base_url = base_url.rstrip("/")
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    headers = auth_headers(api_key)
    shown_headers = {"Authorization": "Bearer $LLMSERVE_NB_API_KEY"} if api_key else {}
    findings: dict[tuple[str, str, int | None], dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []

    def cap(case: Any, mode: str) -> None:
        body = case.body
        if max_tokens_cap and isinstance(body, dict):
            key = "max_new_tokens" if case.path == "/generate" else "max_tokens"
            v = body.get(key)
            # Floats too: /generate's schema takes 209.0 as a number, and four such cases spent 100 s decoding.
            if isinstance(v, (int, float)) and not isinstance(v, bool) and max_tokens_cap < v <= 512:
                body[key] = max_tokens_cap
            elif key not in body and mode == "positive":
                body[key] = max_tokens_cap  # the defaults (16, 64, 256 for chat) would spend the budget decoding

    for result in schema.get_all_operations():
        op = result.ok()
        if operations is not None and op.label not in operations:
            continue
        for mode in modes:
            stats = {"operation": op.label, "mode": mode, "cases": 0, "statuses": {}, "failed": 0}
            strategy = op.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

            @given(case=strategy)
            @settings(max_examples=max_examples, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def one(case: Any) -> None:
                cap(case, mode)
                stats["cases"] += 1
                status = None
                try:
                    response = case.call(base_url=base_url, headers=headers, timeout=request_timeout_s)
                    status = response.status_code
                    stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
                    case.validate_response(response, checks=checks, headers=headers)
                except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - a finding, with its reproduction
                    stats["failed"] += 1
                    failures = getattr(e, "exceptions", None) or [e]
                    for f in failures:
                        title = getattr(f, "title", None) or type(f).__name__
                        key = (op.label, title, status)
                        if key not in findings:
                            findings[key] = {
                                "operation": op.label, "mode": mode, "failure": title, "status": status,
                                "message": str(getattr(f, "message", "") or f)[:600],
                                "curl": case.as_curl_command(headers=shown_headers, base_url=base_url)[:2000],
                                "count": 0,
                            }
                        findings[key]["count"] += 1

            if seed is not None:
                one = hypothesis_seed(seed)(one)
            try:
                one()
            except Unsatisfiable:  # e.g. no invalid request exists for an operation without inputs
                stats["skipped"] = f"no {mode} data can be generated for this operation"
            stats["statuses"] = {str(k): v for k, v in sorted(stats["statuses"].items())}
            runs.append(stats)
    return {"operations": runs, "cases": sum(r["cases"] for r in runs), "findings": list(findings.values())}
