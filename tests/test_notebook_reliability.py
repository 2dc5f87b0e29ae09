"""notebooks/04_reliability.ipynb end to end through papermill; its results come back from the `results` cell."""
from __future__ import annotations

import math

import pytest

from llmserve_nb.notebooks import read_results, run_notebook


@pytest.mark.notebook
def test_reliability_notebook_runs_and_reports(tmp_path):
    params = {"target": "local", "burst_size": 16, "max_tokens": 12, "load_concurrency": 2, "load_s": 20.0,
              "kill_at_s": 5.0, "kill_how": "ray_kill", "num_cpus_per_replica": 0.5}
    out = run_notebook("04_reliability", tmp_path, params, html=True, timeout_s=900)
    results = read_results(out)

    assert results["unauthorized"]["status"] == 401 and "API key" in results["unauthorized"]["message"]
    assert results["bad_request"]["status"] == 400 and "max_tokens" in results["bad_request"]["message"]

    burst = results["burst"]
    assert burst["refused"] >= 1 and burst["refused_statuses"] == [503], burst
    assert burst["refused_with_retry_after"] == burst["refused"] and burst["retry_after"] == ["3"]
    assert burst["accepted"] >= 1 and burst["other_failures"] == 0
    assert burst["refused_max_s"] < 1.0

    failure = results["replica_failure"]
    assert failure["hung"] == 0, failure
    assert failure["succeeded"] > 0 and "kill_error" not in failure, failure
    assert results["recovery_s"] is not None and math.isfinite(results["recovery_s"]), results
    assert results["serving_s"] is not None and math.isfinite(results["serving_s"]), results
    assert len(results["per_second"]) >= 15
    assert out.with_suffix(".html").stat().st_size > 10_000  # the timeline plot is in the export
