"""A real browser (Debian's Chromium via Playwright) drives JupyterLab: the tuner widgets render,
a slider edit plus a click on Apply reconfigures the running Serve app, the status line shows
what Serve reports afterwards, and the live metrics chart redraws in place. Without chromium it skips
(fails in CI)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import nbformat
import pytest
from playwright import sync_api

from llmserve_nb.cluster.ports import free_port

pytestmark = [pytest.mark.notebook, pytest.mark.browser]

TOKEN = "browser-test-token"
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

def _tuner_notebook(path: Path) -> None:
    """Notebook 02 up to the tuner (no load phase): parameters, deploy, tuner."""
    nb = nbformat.read(str(NOTEBOOKS / "02_tune_autoscaling.ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tuner_at = next(i for i, c in enumerate(code) if c.source.startswith("tuner = ServeTuner"))
    nb.cells = code[: tuner_at + 1] + [nbformat.v4.new_code_cell(
        "from llmserve_nb.observability.monitor import LiveMonitor\n"
        "monitor = LiveMonitor.for_app(app, interval_s=1.0, duration_s=180).start()"
    )]
    nbformat.write(nb, str(path))


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> str:
    """JupyterLab's URL, serving a copy of notebook 02 cut after the tuner."""
    root = tmp_path_factory.mktemp("lab")
    _tuner_notebook(root / "tune.ipynb")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/api/status", params={"token": TOKEN}, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("JupyterLab did not start within 120 s")
        time.sleep(0.5)
    yield url
    # SIGTERM shuts kernels down gracefully, and the kernel's atexit stops its embedded Ray.
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_tuner_widgets_apply_batching_in_a_real_browser(chromium, lab, tmp_path):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
        ])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{lab}/lab/tree/tune.ipynb?token={TOKEN}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            # JupyterLab may ask which kernel to start (it does with a freshly registered kernelspec).
            try:
                page.locator(".jp-Dialog").get_by_role("button", name="Select", exact=True).click(timeout=15_000)
            except sync_api.TimeoutError:
                pass
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_text("Run All Cells", exact=True).click()
            apply = page.locator(".jupyter-widgets button", has_text="Apply")
            apply.wait_for(timeout=300_000)  # Ray start + model load + deploy, inside the browser's kernel
            status = page.locator(".llmserve-status")
            status.wait_for(timeout=60_000)
            assert "max_batch_size=8," in status.inner_text()

            readout = page.locator(".llmserve-max-batch-size .widget-readout")
            readout.click()
            page.keyboard.press("Control+A")
            page.keyboard.type("3")
            page.keyboard.press("Enter")
            apply.click()
            page.locator(".llmserve-status", has_text="max_batch_size=3,").wait_for(timeout=120_000)
            assert "applied" in status.inner_text()

            # The live monitor in the last cell: one chart, redrawn in place (its image changes).
            chart = page.locator(".jp-Cell").last.locator(".jp-OutputArea-output img").first
            chart.wait_for(timeout=120_000)
            first = chart.get_attribute("src")
            page.wait_for_function(
                "([sel, src]) => { const imgs = document.querySelectorAll(sel);"
                " return imgs.length > 0 && imgs[imgs.length - 1].getAttribute('src') !== src; }",
                arg=[".jp-Cell:last-child .jp-OutputArea-output img", first], timeout=60_000)
            assert page.locator(".jp-Cell").last.locator(".jp-OutputArea-output img").count() == 1  # in place
        finally:
            page.screenshot(path=str(tmp_path / "jupyterlab-tuner.png"), full_page=True)
            browser.close()
