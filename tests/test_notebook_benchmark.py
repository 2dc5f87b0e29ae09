"""notebooks/03_benchmark.ipynb end to end through papermill; its results come back from the `results` cell."""
from __future__ import annotations

import pytest

from llmserve_nb.notebooks import read_results, run_notebook


@pytest.mark.notebook
def test_benchmark_notebook_runs_and_reports(tmp_path):
    params = {"num_requests": 2, "max_tokens": 8, "concurrency": [1, 2], "level_duration_s": 120.0,
              "compare": {"batch 4": {"batching.max_batch_size": 4}, "off": {"batching.max_batch_size": 1}}}
    results = read_results(run_notebook("03_benchmark", tmp_path, params, html=False))

    sweep = results["sweep"]
    assert [row["concurrency"] for row in sweep] == [1, 2]
    for row in sweep:
        assert row["errors"] == 0 and row["incomplete"] == 0 and row["completed"] == 2
        assert row["output_tok_per_s"] > 0 and row["ttft_ms_p50"] > 0
        assert row["mean_output_tokens"] == 8  # ignore_eos honoured: every request ran to max_tokens
    compare = results["compare"]
    assert [(r["label"], r["concurrency"]) for r in compare] == [("batch 4", 1), ("batch 4", 2), ("off", 1), ("off", 2)]
    assert all(r["errors"] == 0 for r in compare)
    assert compare[0]["output_tok_per_s_ratio"] == pytest.approx(1.0)
    assert (tmp_path / "runs" / "03_benchmark" / "report.json").is_file()
