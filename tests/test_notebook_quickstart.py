"""The quickstart notebook, run headless exactly as `make demo` runs it (`llmserve-nb run-notebooks`), then nbval."""
from __future__ import annotations

import subprocess
import sys

import pytest

from llmserve_nb.notebooks import check_clean, read_results


def test_committed_notebooks_are_clean():
    """nbdev-style gate: no stale outputs in git, papermill's `parameters` cell first, every parameter readable."""
    assert check_clean() == []


def test_a_second_equals_sign_hides_a_parameter_from_papermill():
    """Regression: comments such as `# None = the same host` made papermill drop 20 documented parameters
    (`address`, `token`...) from --help-notebook and warn "Passed unknown parameter" on every run."""
    from llmserve_nb.notebooks import unreadable_parameters

    src = 'a = 1  # the first\nb = None  # None = the default\nc: int = 3  # with x="y": this\nd = {"k": 1}\n'
    assert unreadable_parameters(src) == ["b", "c"]


@pytest.fixture(scope="module")
def executed_quickstart(quickstart_demo):
    return quickstart_demo[1]


@pytest.mark.notebook
def test_quickstart_results(executed_quickstart):
    res = read_results(executed_quickstart)
    assert "Paris" in res["answer"]
    assert res["streamed"] == res["answer"]
    assert res["burst"]["requests"] == 8
    assert res["burst"]["max_batch_size_seen"] > 1, res["burst"]
    assert executed_quickstart.with_suffix(".html").stat().st_size > 10_000


@pytest.mark.notebook
def test_quickstart_passes_nbval(executed_quickstart):
    """nbval re-executes the notebook and compares the cells marked NBVAL_CHECK_OUTPUT (the greedy answer
    and its usage) with the papermill run's outputs; unmarked cells (timings, ids) are only run."""
    import nbformat

    nb = nbformat.read(str(executed_quickstart), as_version=4)
    checked = [c for c in nb.cells if c.cell_type == "code" and "NBVAL_CHECK_OUTPUT" in c.source]
    assert checked and all("Paris" in "".join(o.get("text", "") for o in c.outputs) for c in checked)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", str(executed_quickstart)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
