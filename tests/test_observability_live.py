"""Observability against a real Prometheus (Debian's 2.42, started by the test on 127.0.0.1, scraping this
Ray cluster through the service-discovery file Ray writes): the app's metrics under load, as PromQL
results, and every expression of the Grafana dashboard, the alert rules and the HPA adapter rule under
`k8s/` returns data. A panel on a metric nobody exports fails here."""
from __future__ import annotations

import threading
import time

import pytest

from conftest import API_KEY
from prometheus_server import prometheus  # noqa: F401  (the fixture)

from llmserve_nb.bench import Workload, run_benchmark
from llmserve_nb.k8s import all_promql_expressions
from llmserve_nb.observability.promql import queries

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def loaded(app, prometheus):  # noqa: F811
    """~40 s of mixed streaming traffic, EOS honoured, with a few clients that drop their stream."""
    workload = Workload(num_requests=400, input_tokens=(8, 40), output_tokens=(8, 64), output_dist="loguniform",
                        ignore_eos=False, duration_s=40, timeout_s=60, drop_fraction=0.1, drop_after_chunks=2)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("run", run_benchmark(
        app.base_url, workload, concurrency=6, model=app.model, progress=False, api_key=API_KEY)), daemon=True)
    thread.start()
    sel = f'application="{app.name}"'
    q = queries(window="30s", selector=sel)
    prometheus.wait_for(q["generation_tokens_per_s"], lambda v: v > 0, timeout_s=90)
    prometheus.wait_for(q["requests_running"], lambda v: v > 0, timeout_s=60)
    yield q
    thread.join(timeout=120)
    assert not thread.is_alive()
    summary = result["run"].summary()
    assert summary["completed"] > 0 and summary["errors"] == 0, {k: v for k, v in summary.items() if k.startswith("err")}


def test_the_apps_metrics_read_sensibly_in_promql(app, prometheus, loaded):  # noqa: F811
    q = loaded
    assert prometheus.value(q["requests_per_s"]) > 0
    ttft_p50, ttft_p99 = prometheus.value(q["ttft_p50_s"]), prometheus.value(q["ttft_p99_s"])
    assert 0 < ttft_p50 <= ttft_p99 < 60
    assert 0 < prometheus.value(q["tpot_p50_s"]) < 5
    assert prometheus.value(q["replicas_running"]) == 1
    assert prometheus.value(q["errors_per_s"]) == 0
    aborted = f'sum(ray_llmserve_request_success_total{{application="{app.name}",finished_reason="abort"}})'
    assert prometheus.value(aborted) >= 1  # the dropped streams were aborted


def test_every_dashboard_alert_and_hpa_expression_returns_data(app, prometheus, loaded):  # noqa: F811
    expressions = all_promql_expressions(app=app.config, rate_window="30s")
    assert any(k.startswith("dashboard/") for k in expressions) and any(k.startswith("alert/") for k in expressions)
    assert any(k.startswith("hpa/") for k in expressions)
    # Rates and derivatives need two samples in their window: give each a few scrapes under load.
    deadline = time.monotonic() + 45
    while True:
        empty = {k: e for k, e in expressions.items() if not prometheus.query(e)}
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert not empty, f"expressions with no data under load: {empty}"
