"""A real Prometheus (Debian's, on PATH) scraping the local Ray cluster, for tests.

It reads the file-based service discovery that Ray writes for every node's metrics export port
(`<session dir>/prom_metrics_service_discovery.json`), the same way Ray's own generated Prometheus
config does, scrapes every second, and keeps its data in a temp dir removed on stop. Never the
system service: each test run has its own server on a free port.

Use the `prometheus` fixture (import it into the test module), or `PrometheusServer` directly.
"""
from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from llmserve_nb.cluster.ports import free_port
from system_deps import require_prometheus

SD_FILE = "prom_metrics_service_discovery.json"


class PrometheusError(RuntimeError):
    """Prometheus did not start, or a query failed (the message carries its answer or its log)."""


def ray_service_discovery_file() -> Path:
    """Ray's service-discovery file for the cluster this process is connected to (ray.init already called)."""
    import ray

    if not ray.is_initialized():
        raise PrometheusError("ray is not initialized in this process: connect to the cluster first")
    # The session dir, not the temp root: /tmp/ray/prom_metrics_service_discovery.json is a symlink
    # to whichever cluster on this machine started last, possibly someone else's.
    return Path(ray._private.worker.global_worker.node.get_session_dir_path()) / SD_FILE


class PrometheusServer:
    def __init__(self, binary: str, sd_file: Path, scrape_interval_s: float = 1.0):
        self.sd_file = sd_file
        self.scrape_interval_s = scrape_interval_s
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="lsnb-prom-"))
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._http = httpx.Client(timeout=httpx.Timeout(10.0, connect=2.0))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0, attempts: int = 3) -> PrometheusServer:
        interval = f"{int(self.scrape_interval_s * 1000)}ms"
        config = self.dir / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {interval}\n"
            f"  evaluation_interval: {interval}\n"
            "scrape_configs:\n"
            "  - job_name: ray\n"
            "    file_sd_configs:\n"
            f"      - files: ['{self.sd_file}']\n"
            "        refresh_interval: 1s\n"
        )
        for attempt in range(attempts):
            # Another process can take the port between our probe and Prometheus' bind: pick again.
            self.port = free_port()
            log = (self.dir / "prometheus.log").open("w")
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT,
            )
            log.close()
            try:
                self._wait_ready(timeout_s)
                return self
            except PrometheusError:
                self._terminate()
                if attempt == attempts - 1 or "address already in use" not in self.log_tail():
                    raise
        raise PrometheusError("attempts must be >= 1")

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self._http.get(f"{self.url}/-/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        path = self.dir / "prometheus.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _terminate(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        self._terminate()
        self._http.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- HTTP API -------------------------------------------------------------------------------
    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector (`[{"metric": {...}, "value": [t, "v"]}, ...]`)."""
        try:
            r = self._http.get(f"{self.url}/api/v1/query", params={"query": promql})
        except httpx.TransportError as e:
            raise PrometheusError(f"query {promql!r}: {type(e).__name__}: {e}") from None
        body = r.json() if "json" in r.headers.get("content-type", "") else {}
        if r.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(f"query {promql!r} -> HTTP {r.status_code}: {body.get('error') or r.text[:500]}")
        if body["data"]["resultType"] == "scalar":
            return [{"metric": {}, "value": body["data"]["result"]}]
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        """The query's single value (None when it has no result); more than one series is an error."""
        result = self.query(promql)
        if len(result) > 1:
            raise PrometheusError(f"query {promql!r} returned {len(result)} series, expected one: {result[:3]}")
        return float(result[0]["value"][1]) if result else None

    def targets(self) -> list[dict[str, Any]]:
        r = self._http.get(f"{self.url}/api/v1/targets")
        r.raise_for_status()
        return r.json()["data"]["activeTargets"]

    def wait_for(self, promql: str, predicate: Callable[[float], bool], timeout_s: float = 60.0,
                 poll_s: float = 1.0) -> float:
        """Poll `promql` until its value satisfies `predicate`; return that value or fail with the last one."""
        deadline = time.monotonic() + timeout_s
        last: float | None = None
        while True:
            last = self.value(promql)
            if last is not None and not math.isnan(last) and predicate(last):
                return last
            if time.monotonic() > deadline:
                targets = [(t["scrapeUrl"], t["health"], t.get("lastError")) for t in self.targets()]
                raise AssertionError(f"{promql!r} never satisfied the predicate in {timeout_s:.0f}s; last value "
                                     f"{last}; scrape targets {targets}")
            time.sleep(poll_s)


@pytest.fixture(scope="module")
def prometheus(cluster) -> Iterator[PrometheusServer]:
    """A Prometheus scraping the session's local Ray cluster every second."""
    server = PrometheusServer(require_prometheus(), ray_service_discovery_file()).start()
    try:
        yield server
    finally:
        server.stop()
