"""LiveMonitor: PromQL semantics offline, a real Ray under load (direct scrape and Prometheus), headless."""
from __future__ import annotations

import math
import threading
import time

import nbformat
import pytest
from nbclient import NotebookClient

from llmserve_nb.observability.monitor import LiveMonitor, _histogram_quantile
from prometheus_server import prometheus  # noqa: F401  (the fixture)
from test_metrics import deployed_fake_llm, drive_load

APP = "monitor-probe"


def test_histogram_quantile_matches_prometheus():
    inf = math.inf
    # 10 observations in (0, 0.1], 10 in (0.1, 0.5]: Prometheus interpolates linearly inside the bucket.
    buckets = [(0.1, 10.0), (0.5, 20.0), (inf, 20.0)]
    assert _histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert _histogram_quantile(0.75, buckets) == pytest.approx(0.3)
    assert _histogram_quantile(0.25, buckets) == pytest.approx(0.05)
    assert _histogram_quantile(0.99, [(0.1, 0.0), (inf, 5.0)]) == 0.1  # beyond the last bound: that bound
    assert math.isnan(_histogram_quantile(0.5, [(0.1, 0.0), (inf, 0.0)]))  # no observations in the window
    assert math.isnan(_histogram_quantile(0.5, []))


def test_unreachable_source_neither_hangs_nor_crashes():
    mon = LiveMonitor(metrics_urls=["127.0.0.1:9"], interval_s=0.2, duration_s=1.5).start()
    deadline = time.monotonic() + 20
    while mon.running and time.monotonic() < deadline:  # it stops by itself after duration_s
        time.sleep(0.1)
    assert not mon.running
    assert mon.updates >= 2 and "no Ray metrics endpoint answered" in mon.last_error
    assert mon.png.startswith(b"\x89PNG")
    mon.stop()


@pytest.fixture(scope="module")
def monitored_app(cluster):
    with deployed_fake_llm(cluster, APP) as url:
        yield url


def _seen(mon: LiveMonitor, key: str) -> list[float]:
    return [f[key] for _, f in mon.history if not math.isnan(f.get(key, math.nan))]


@pytest.mark.ray
def test_live_monitor_under_load(prometheus, monitored_app):  # noqa: F811
    direct = LiveMonitor(application=APP, interval_s=1.0, window_s=20.0, duration_s=120.0)
    promql = LiveMonitor(prometheus.url, application=APP, interval_s=1.0, window_s=20.0, duration_s=120.0)
    with direct, promql:
        loader = threading.Thread(target=drive_load, args=(monitored_app, 25.0))
        loader.start()
        loader.join()
        # Ray reports every 10 s: give the last report time to land before judging.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
                _seen(m, "generation_tokens_per_s") and max(_seen(m, "generation_tokens_per_s")) > 0
                and _seen(m, "ttft_p50_s") for m in (direct, promql)):
            time.sleep(1)
    for mon in (direct, promql):
        assert not mon.running  # stop() joined the thread
        assert mon.updates > 5 and mon.png.startswith(b"\x89PNG"), mon.title
        assert mon.last_error is None, mon.last_error
        # 6 clients, 20 ms per token: at most ~300 tok/s.
        assert 0 < max(_seen(mon, "generation_tokens_per_s")) < 1000, mon.title
        assert 0 < max(_seen(mon, "requests_running")) <= 32, mon.title
        assert all(v >= 0 for v in _seen(mon, "requests_waiting")), mon.title
        assert all(0 < v < 5 for v in _seen(mon, "ttft_p50_s")) and _seen(mon, "ttft_p50_s"), mon.title
        assert all(0.005 < v < 0.1 for v in _seen(mon, "tpot_p50_s")) and _seen(mon, "tpot_p50_s"), mon.title
        assert max(_seen(mon, "errors_per_s")) > 0, mon.title
        assert _seen(mon, "replicas_running")[-1] == 1 and _seen(mon, "replicas_target")[-1] == 1, mon.title
    # Same figures from either source, within what different sampling instants allow.
    peak = {m: max(_seen(m, "generation_tokens_per_s")) for m in (direct, promql)}
    assert 0.3 < peak[direct] / peak[promql] < 3, peak


def test_headless_notebook_keeps_one_final_chart(tmp_path):
    """In a kernel run by nbclient (as papermill does): no hang, and the final chart is in the outputs."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "from llmserve_nb.observability.monitor import LiveMonitor\n"
            "with LiveMonitor(metrics_urls=['127.0.0.1:9'], interval_s=0.2, duration_s=60) as mon:\n"
            "    import time; time.sleep(2.0)\n"
            "mon.updates >= 1, mon.running"
        ),
    ]
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = nb.cells[0].outputs
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, outputs
    result = [o for o in outputs if o.output_type == "execute_result"]
    assert result and result[0].data["text/plain"] == "(True, False)", outputs
