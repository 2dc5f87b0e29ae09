"""Notebook 02 headless: live batching change, then Serve autoscaling up under load and back down."""
from __future__ import annotations

import pytest

from llmserve_nb.notebooks import read_results, run_notebook

pytestmark = pytest.mark.notebook


def test_tune_notebook_scales_up_and_down(tmp_path):
    out = run_notebook("02_tune_autoscaling", tmp_path, {"load_seconds": 30, "load_concurrency": 8}, html=False)
    res = read_results(out)
    assert res["replica_kept_on_reconfigure"] is True
    assert res["batching_after_apply"]["max_batch_size"] == 4
    assert res["max_replicas_seen"] == 2, res["history"]
    assert res["replicas_after_load"] == 1, res["history"]
    assert res["load"]["completed"] > 0 and res["load"]["errors"] == 0, res["load"]
