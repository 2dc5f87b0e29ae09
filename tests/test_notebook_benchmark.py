"""notebooks/03_benchmark.ipynb end to end through papermill; its results come back from the `results` cell."""
from __future__ import annotations

import pytest

from llmserve_nb.notebooks import read_results, run_notebook


@pytest.mark.notebook
def test_benchmark_notebook_runs_and_reports(tmp_path):
    params = {"target": "local", "num_requests": 2, "max_tokens": 8, "concurrency": [1, 2], "level_duration_s": 120.0,
              "mixed_requests": 4, "mixed_max_tokens": [4, 48],
              "compare": {"batch 4": {"batching.max_batch_size": 4}, "off": {"batching.max_batch_size": 1}}}
    results = read_results(run_notebook("03_benchmark", tmp_path, params, html=False))

    assert results["target"] == "local"
    sweep = results["sweep"]
    assert [row["concurrency"] for row in sweep] == [1, 2]
    for row in sweep:
        assert row["errors"] == 0 and row["incomplete"] == 0 and row["completed"] == 2
        assert row["output_tok_per_s"] > 0 and row["ttft_ms_p50"] > 0
        assert row["mean_output_tokens"] == 8  # ignore_eos honoured: every request ran to max_tokens

    mixed = results["mixed"]
    assert [row["concurrency"] for row in mixed] == [1, 2]
    for row in mixed:
        assert row["errors"] == 0 and row["incomplete"] == 0 and row["completed"] == 4
        assert row["short_requests"] + row["long_requests"] == row["completed"]
        # Log-uniform over 4-48 asks for at most 32 tokens about 80 % of the time, and EOS only shortens.
        assert row["short_requests"] >= 1 and 1 <= row["mean_output_tokens"] < 48
        assert row["short_e2e_ms_p50"] > 0

    compare = results["compare"]
    assert [(r["label"], r["concurrency"]) for r in compare] == [("batch 4", 1), ("batch 4", 2), ("off", 1), ("off", 2)]
    assert all(r["errors"] == 0 for r in compare)
    base = {r["concurrency"]: r for r in compare if r["label"] == "batch 4"}
    for r in compare:
        if r["label"] == "off":  # each ratio divides by the baseline config at the same level, not another level
            assert r["output_tok_per_s_ratio"] == pytest.approx(r["output_tok_per_s"] / base[r["concurrency"]]["output_tok_per_s"])
            assert r["e2e_ms_p50_ratio"] == pytest.approx(r["e2e_ms_p50"] / base[r["concurrency"]]["e2e_ms_p50"])
    # The live view ran during the sweep: it redrew its chart and read the app's series.
    assert results["monitor"]["updates"] > 1 and results["monitor"]["samples"] >= 1, results["monitor"]
    assert (tmp_path / "runs" / "03_benchmark" / "report.json").is_file()
    assert (tmp_path / "runs" / "03_benchmark" / "mixed" / "report.json").is_file()
