"""What `make demo` (`llmserve-nb run-notebooks`) prints carries nothing a user cannot act on, and a real problem
still shows.

The noise it used to print, each silenced at its source:
- Jupyter's kernel: "Kernel is running over TCP without encryption" at every kernel start (the kernels now talk
  over unix sockets: `notebooks._kernel_config`);
- nbconvert's HTML export: "Your element with mimetype(s) dict_keys(['application/json']) is not able to be
  represented" for every notebook's results cell (`emit_results` now adds a text/plain copy);
- Ray, in red under every connect cell: "Token authentication is enabled for this Ray cluster" (dropped, that
  message only, by `cluster.targets.quiet_token_auth_notice`).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nbformat
import pytest

from llmserve_nb.notebooks import emit_results, read_results

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("llmserve-nb")
NOISE = {
    "Jupyter's unencrypted-TCP warning": "Kernel is running over TCP without encryption",
    "nbconvert's mimetype warning": "is not able to be represented",
    "Ray's token-auth notice": "Token authentication is enabled for this Ray cluster",
}


def _demo(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """`llmserve-nb run-notebooks ARGS` as `make demo` runs it, from the checkout, its output captured."""
    env = {k: v for k, v in os.environ.items() if k != "LLMSERVE_NB_API_KEY"}
    return subprocess.run([str(CLI), "run-notebooks", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _cell_stderr(executed: Path) -> str:
    nb = nbformat.read(str(executed), as_version=4)
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []) if out.get("output_type") == "stream" and out.get("name") == "stderr")


def _noise_in(text: str) -> list[str]:
    return [name for name, message in NOISE.items() if message in text]


@pytest.mark.notebook
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_the_quickstart_demo_prints_no_noise(quickstart_demo):
    run, executed = quickstart_demo
    assert "Paris" in read_results(executed)["answer"]  # the demo did run the model
    assert _noise_in(run.stdout + run.stderr) == [], run.stdout + run.stderr
    assert _noise_in(_cell_stderr(executed)) == [], _cell_stderr(executed)
    # What the user does need is still there: where the executed copies went.
    assert f"executed notebooks and HTML exports are in {executed.parent}/" in run.stdout


@pytest.mark.notebook
@pytest.mark.timeout(300)
def test_a_real_warning_and_a_failing_cell_still_show(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"},
                                            "language_info": {"name": "python"}})
    nb.cells = [
        nbformat.v4.new_code_cell("size_gb = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import warnings\nwarnings.warn('the disk is nearly full')"),
        nbformat.v4.new_code_cell("raise ValueError(f'the model file is corrupt ({size_gb} GB)')"),
    ]
    nbformat.write(nb, str(folder / "tiny.ipynb"))
    run = _demo("tiny", "--notebooks", str(folder), "--out", str(tmp_path / "runs"), "--no-html", timeout=240)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "error: tiny failed" in run.stderr and "the model file is corrupt (1 GB)" in run.stderr, run.stderr
    (executed,) = (tmp_path / "runs").glob("*/tiny.ipynb")
    assert "the disk is nearly full" in _cell_stderr(executed)
    assert _noise_in(run.stdout + run.stderr) == [], run.stderr


def test_results_export_to_html_without_a_warning():
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output
    from nbconvert import HTMLExporter

    InteractiveShell.instance()
    with capture_output() as captured:
        emit_results({"answer": "Paris", "tokens": 7})
    (output,) = captured.outputs
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("emit_results(...)", metadata={"tags": ["results"]},
                                          outputs=[nbformat.v4.new_output("display_data", data=output.data)])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        body, _ = HTMLExporter().from_notebook_node(nb)
    assert "Paris" in body


def test_only_ray_s_token_enabled_notice_is_dropped():
    from llmserve_nb.cluster.targets import quiet_token_auth_notice

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    ray_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    ray_log.addHandler(handler)
    try:
        quiet_token_auth_notice()
        quiet_token_auth_notice()  # idempotent
        ray_log.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        ray_log.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    finally:
        ray_log.removeHandler(handler)
    assert seen == ["Token authentication is disabled for this Ray cluster. Anyone with network access ..."]
