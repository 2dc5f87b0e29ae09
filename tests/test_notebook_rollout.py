"""notebooks/05_rollout.ipynb end to end through papermill: a rollout under load drops no request."""
from __future__ import annotations

import pytest

from llmserve_nb.notebooks import read_results, run_notebook


@pytest.mark.notebook
def test_rollout_notebook_promotes_without_failures(tmp_path):
    params = {"target": "local", "compare_requests": 2, "concurrency": 3, "sessions": 12, "max_tokens": 6,
              "steps": [50, 100], "hold_s": 5.0, "baseline_requests": 4}
    results = read_results(run_notebook("05_rollout", tmp_path, params, html=False))

    assert results["target"] == "local"
    assert results["requests"] > 0 and results["failed"] == 0
    assert set(results["by_version"]) == {"llm-v1", "llm-v2"}  # both versions served traffic
    assert all(n > 0 for n in results["by_version"].values())
    assert results["stickiness_violations"] == []
    assert all(p["failed"] == 0 for p in results["phases"].values())
    assert results["phases"]["after"]["by_version"] == {"llm-v2": results["phases"]["after"]["completed"]}
    final = results["final"]
    assert final["weights"] == {"llm-v2": 100.0} and list(final["versions"]) == ["llm-v2"]
    assert [r["label"] for r in results["comparison"]] == ["llm-v1", "llm-v2"]
    # The live view ran during the rollout and redrew its chart.
    assert results["monitor"]["updates"] > 0 and not results["monitor"]["error"], results["monitor"]
